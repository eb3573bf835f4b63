"""Registration with a PBX or trunk (RFC 3261 section 10): REGISTER with digest
authentication, refreshed at half the granted time, retried with backoff, removed at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from typing import TYPE_CHECKING

from appliance.sip import digest
from appliance.sip.message import (
    Message,
    SipError,
    new_branch,
    new_call_id,
    new_tag,
    number,
    param,
    parse_uri,
)
from appliance.sip.transaction import Peer

if TYPE_CHECKING:
    from appliance.sip.ua import UserAgent

logger = logging.getLogger("appliance.sip")


class Registration:
    """The appliance's registration as `[sip] register_uri` (see the module docstring)."""

    def __init__(self, ua: UserAgent, password: str) -> None:
        self.ua, self.password = ua, password
        self.registered = False
        self._call_id, self._tag, self._cseq = "", new_tag(), 0

    def answer_challenge(self, res: Message, method: str, uri: str) -> tuple[str, str]:
        header = "Authorization" if res.status == 401 else "Proxy-Authorization"
        challenge = res.get("WWW-Authenticate" if res.status == 401 else "Proxy-Authenticate")
        user = self.ua.config.register_user or parse_uri(self.ua.config.register_uri).user
        return header, digest.authorization(challenge, user, self.password, method, uri)

    async def register(self, expires: int) -> int:
        """One REGISTER (with the digest answer if challenged); the granted expiry."""
        aor = self.ua.config.register_uri
        uri = parse_uri(aor)
        proxy = parse_uri(self.ua.config.outbound_proxy) if self.ua.config.outbound_proxy else uri
        peer: Peer = (socket.gethostbyname(proxy.host), proxy.port)
        registrar = f"sip:{uri.host}" + (f":{uri.port}" if uri.port != 5060 else "")
        if not self._call_id:
            self._call_id = new_call_id(self.ua.via(peer[0]))
        call_id, tag = self._call_id, self._tag
        auth: tuple[str, str] | None = None
        for _ in range(2):
            self._cseq += 1
            msg = Message(method="REGISTER", uri=registrar)
            msg.add("Via", f"SIP/2.0/UDP {self.ua.via(peer[0])};branch={new_branch()};rport")
            msg.add("Max-Forwards", "70")
            msg.add("From", f"<{aor}>;tag={tag}")
            msg.add("To", f"<{aor}>")
            msg.add("Call-ID", call_id)
            msg.add("CSeq", f"{self._cseq} REGISTER")
            msg.add("Contact", self.ua.contact(peer[0]))
            msg.add("Expires", str(expires))
            msg.add("User-Agent", self.ua.config.user_agent)
            if auth:
                msg.add(*auth)
            res = await self.ua.transport.request(msg, peer)
            if res.status in (401, 407) and auth is None and self.password:
                auth = self.answer_challenge(res, "REGISTER", registrar)
                continue
            if res.status >= 300:
                raise PermissionError(f"REGISTER {aor}: {res.status} {res.reason}")
            granted = param(res.get("Contact"), "expires") or res.get("Expires") or str(expires)
            with contextlib.suppress(SipError):
                return number(granted, "Expires", 1)
            return expires
        raise PermissionError(f"REGISTER {aor}: the credentials were refused")

    async def keep(self) -> None:
        """Register, refresh at half the granted time, retry with backoff on failure."""
        backoff = 5.0
        logged = False
        while True:
            try:
                granted = await self.register(self.ua.config.register_expires)
            except (TimeoutError, OSError, PermissionError, ValueError) as exc:  # + SipError
                self.registered = False
                if not logged:
                    logger.error("registration failed: %s; retrying", exc)
                    logged = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            if not self.registered or logged:
                logger.info("registered %s for %d s", self.ua.config.register_uri, granted)
            self.registered, logged, backoff = True, False, 5.0
            await asyncio.sleep(max(granted / 2, 10.0))
