"""HTTP digest authentication for SIP (RFC 2617, RFC 8760): MD5 and SHA-256, qop=auth."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time

ALGORITHMS = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}
_PARAM = re.compile(r'(\w+)\s*=\s*("([^"]*)"|[^,\s]+)')


def parse_params(value: str) -> tuple[str, dict[str, str]]:
    """`Digest realm="x", nonce="y"` -> ("Digest", {"realm": "x", ...})."""
    scheme, _, rest = value.strip().partition(" ")
    params = {
        m.group(1).lower(): m.group(3) if m.group(3) is not None else m.group(2)
        for m in _PARAM.finditer(rest)
    }
    return scheme, params


def _h(algorithm: str, text: str) -> str:
    return ALGORITHMS[algorithm](text.encode()).hexdigest()


def response(
    algorithm: str,
    user: str,
    realm: str,
    password: str,
    method: str,
    uri: str,
    nonce: str,
    *,
    qop: str = "",
    nc: str = "",
    cnonce: str = "",
) -> str:
    ha1 = _h(algorithm, f"{user}:{realm}:{password}")
    ha2 = _h(algorithm, f"{method}:{uri}")
    if qop:
        return _h(algorithm, f"{ha1}:{nonce}:{nc}:{cnonce}:{qop}:{ha2}")
    return _h(algorithm, f"{ha1}:{nonce}:{ha2}")


def authorization(challenge: str, user: str, password: str, method: str, uri: str) -> str:
    """The Authorization header answering a WWW-/Proxy-Authenticate challenge."""
    scheme, p = parse_params(challenge)
    if scheme.lower() != "digest":
        raise ValueError(f"unsupported authentication scheme {scheme!r}")
    algorithm = p.get("algorithm", "MD5").upper()
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unsupported digest algorithm {algorithm!r}")
    qop = "auth" if "auth" in [q.strip() for q in p.get("qop", "").split(",")] else ""
    nc, cnonce = ("00000001", secrets.token_hex(8)) if qop else ("", "")
    digest = response(
        algorithm,
        user,
        p.get("realm", ""),
        password,
        method,
        uri,
        p.get("nonce", ""),
        qop=qop,
        nc=nc,
        cnonce=cnonce,
    )
    fields = [
        f'username="{user}"',
        f'realm="{p.get("realm", "")}"',
        f'nonce="{p.get("nonce", "")}"',
        f'uri="{uri}"',
        f'response="{digest}"',
        f"algorithm={algorithm}",
    ]
    if "opaque" in p:
        fields.append(f'opaque="{p["opaque"]}"')
    if qop:
        fields += [f"qop={qop}", f"nc={nc}", f'cnonce="{cnonce}"']
    return "Digest " + ", ".join(fields)


class Verifier:
    """Challenges inbound requests and checks the answers (nonces expire after `ttl` s)."""

    def __init__(self, realm: str, users: dict[str, str], ttl: float = 300.0) -> None:
        self.realm, self.users, self.ttl = realm, users, ttl
        self._secret = secrets.token_bytes(16)

    def _nonce(self, at: int) -> str:
        mac = hmac.new(self._secret, str(at).encode(), hashlib.sha256).hexdigest()[:16]
        return f"{at:x}{mac}"

    def challenge(self, algorithm: str = "MD5") -> str:
        nonce = self._nonce(int(time.time()))
        return f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"'

    def check(self, header: str, method: str) -> str | None:
        """The authenticated user name, or None."""
        try:
            scheme, p = parse_params(header)
        except ValueError:
            return None
        user, nonce = p.get("username", ""), p.get("nonce", "")
        if scheme.lower() != "digest" or user not in self.users or len(nonce) < 17:
            return None
        try:
            issued = int(nonce[:-16], 16)
        except ValueError:
            return None
        if not hmac.compare_digest(nonce, self._nonce(issued)) or time.time() - issued > self.ttl:
            return None
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in ALGORITHMS or p.get("realm") != self.realm:
            return None
        expected = response(
            algorithm,
            user,
            self.realm,
            self.users[user],
            method,
            p.get("uri", ""),
            nonce,
            qop=p.get("qop", ""),
            nc=p.get("nc", ""),
            cnonce=p.get("cnonce", ""),
        )
        return user if hmac.compare_digest(expected, p.get("response", "")) else None
