"""HTTP digest authentication for SIP (RFC 2617, RFC 8760): MD5 and SHA-256, qop=auth."""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import time
from pathlib import Path

from appliance.sip.message import SipError, parse_uri

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


def read_users(path: str) -> dict[str, str]:
    """`user:password` lines (the inbound digest credentials); raises OSError/ValueError."""
    users = {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, colon, password = line.partition(":")
        if not colon or not user or not password:
            raise ValueError(f"{path}:{n}: expected user:password")
        users[user.strip()] = password.strip()
    return users


class Verifier:
    """Challenges inbound requests and checks the answers (RFC 7616 with qop=auth).

    A nonce is `issued.random.mac`: it expires after `ttl` s and is bound to the source
    address it was issued to (the MAC covers both), so a captured answer is no use from
    anywhere else. Each answer must carry a nonce count above the last one seen for its
    nonce, so it is no use twice either. At most `MAX_NONCES` nonces are remembered (the
    oldest answered ones are forgotten, which only makes their holders ask again).
    """

    MAX_NONCES = 4096

    def __init__(self, realm: str, users: dict[str, str], ttl: float = 300.0) -> None:
        self.realm, self.users, self.ttl = realm, users, ttl
        self._secret = secrets.token_bytes(16)
        self._counts: dict[str, int] = {}  # nonce -> last nonce count, oldest first

    def _mac(self, issued: str, salt: str, source: str) -> str:
        text = f"{issued}.{salt}.{source}".encode()
        return hmac.new(self._secret, text, hashlib.sha256).hexdigest()[:24]

    def challenge(self, source: str, algorithm: str = "MD5") -> str:
        """A WWW-Authenticate value with a fresh nonce for `source` (the peer's IP)."""
        issued, salt = f"{int(time.time()):x}", secrets.token_hex(8)
        nonce = f"{issued}.{salt}.{self._mac(issued, salt, source)}"
        return f'Digest realm="{self.realm}", nonce="{nonce}", algorithm={algorithm}, qop="auth"'

    def _fresh(self, nonce: str, source: str) -> bool:
        issued, salt, mac = [*nonce.split("."), "", ""][:3]
        if not (0 < len(issued) <= 12 and _HEX.fullmatch(issued) and _HEX.fullmatch(salt)):
            return False
        if not hmac.compare_digest(mac.encode(), self._mac(issued, salt, source).encode()):
            return False
        return 0 <= time.time() - int(issued, 16) <= self.ttl

    def check(self, header: str, method: str, uri: str, source: str) -> str | None:
        """The user name if `header` answers a challenge made to `source` for a request
        to `uri`, else None (never raises on what a peer sends)."""
        scheme, p = parse_params(header)
        user, nonce, nc = p.get("username", ""), p.get("nonce", ""), p.get("nc", "")
        if scheme.lower() != "digest" or user not in self.users or not header.isascii():
            return None
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in ALGORITHMS or p.get("realm") != self.realm:
            return None
        if not _same_host(p.get("uri", ""), uri):  # some phones leave the user part out
            return None
        if p.get("qop") != "auth" or not _NC.fullmatch(nc) or not p.get("cnonce"):
            return None
        if not self._fresh(nonce, source) or int(nc, 16) <= self._counts.get(nonce, 0):
            return None
        expected = response(
            algorithm,
            user,
            self.realm,
            self.users[user],
            method,
            p.get("uri", ""),
            nonce,
            qop="auth",
            nc=nc,
            cnonce=p.get("cnonce", ""),
        )
        if not hmac.compare_digest(expected.encode(), p.get("response", "").encode()):
            return None
        self._counts.pop(nonce, None)
        self._counts[nonce] = int(nc, 16)
        while len(self._counts) > self.MAX_NONCES:
            del self._counts[next(iter(self._counts))]
        return user


_HEX = re.compile(r"[0-9a-f]+")
_NC = re.compile(r"[0-9a-fA-F]{8}")


def _same_host(digest_uri: str, request_uri: str) -> bool:
    """Does the answer's `uri` name the host and port the request was sent to?"""
    try:
        ours, theirs = parse_uri(request_uri), parse_uri(digest_uri)
    except SipError:
        return False
    return (ours.host.lower(), ours.port) == (theirs.host.lower(), theirs.port)
