"""One SIP call: its dialog (RFC 3261 section 12), its RTP session, and its media object.

A `Call` does not know what listens: the bridge attaches a `CallMedia` (the caller's audio
in, the agent's audio out, keypad digits, the end), and until then the caller hears
silence and is heard by nobody. The `UserAgent` (`appliance.sip.ua`) creates calls and
routes their in-dialog requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import numpy as np

from appliance.sip import sdp
from appliance.sip.message import (
    Address,
    Message,
    SipError,
    new_branch,
    number,
    parse_address,
    parse_uri,
)
from appliance.sip.rtp import RtpSession
from appliance.sip.transaction import Peer

if TYPE_CHECKING:
    from appliance.sip.ua import UserAgent

logger = logging.getLogger("appliance.sip")


class CallMedia(Protocol):
    """The other side of a call's media (the bridge's session, a benchmark's phone)."""

    def heard(self, pcm8k: np.ndarray) -> None:
        """20 ms of the caller, 8 kHz (silence while they send nothing)."""

    def next_audio(self, n: int) -> np.ndarray:
        """The next `n` samples (8 kHz) for the caller."""

    def pressed(self, digit: str) -> None:
        """A keypad digit (RFC 4733 or SIP INFO)."""

    def ended(self, reason: str) -> None:
        """The call is over (either side)."""


class Silence:
    """The media of a call nobody has attached to: hears nothing, says nothing."""

    def heard(self, pcm8k: np.ndarray) -> None:
        pass

    def next_audio(self, n: int) -> np.ndarray:
        return np.zeros(n, np.int16)

    def pressed(self, digit: str) -> None:
        pass

    def ended(self, reason: str) -> None:
        pass


SILENCE = Silence()


@dataclass
class Dialog:
    call_id: str
    local_tag: str
    remote_tag: str
    local: Address  # our From (UAC) / To (UAS)
    remote: Address
    remote_target: str  # the peer's Contact URI
    route_set: list[str] = field(default_factory=list)
    local_cseq: int = 0
    remote_cseq: int = -1

    def matches(self, msg: Message) -> bool:
        """Is `msg` a request of this dialog (RFC 3261 12.2.2: Call-ID and both tags)?"""
        return (
            msg.call_id == self.call_id
            and parse_address(msg.get("From")).tag == self.remote_tag
            and parse_address(msg.get("To")).tag == self.local_tag
        )

    def peer(self) -> Peer:
        """Where in-dialog requests go: the first loose route, else the remote target."""
        target = parse_address(self.route_set[0]).uri if self.route_set else self.remote_target
        uri = parse_uri(target)
        return uri.host, uri.port

    def request(self, method: str, ua: UserAgent, *, cseq: int = 0) -> Message:
        """A request inside the dialog (a new CSeq unless `cseq` is given, as for ACK)."""
        if not cseq:
            self.local_cseq += 1
        peer = self.peer()[0]
        msg = Message(method=method, uri=self.remote_target)
        msg.add("Via", f"SIP/2.0/UDP {ua.via(peer)};branch={new_branch()};rport")
        msg.add("Max-Forwards", "70")
        msg.add("From", f"{_untagged(self.local)};tag={self.local_tag}")
        remote = _untagged(self.remote)
        msg.add("To", f"{remote};tag={self.remote_tag}" if self.remote_tag else remote)
        msg.add("Call-ID", self.call_id)
        msg.add("CSeq", f"{cseq or self.local_cseq} {method}")
        for route in self.route_set:
            msg.add("Route", route)
        msg.add("Contact", ua.contact(peer))
        msg.add("User-Agent", ua.config.user_agent)
        return msg


def _untagged(address: Address) -> str:
    params = ";".join(p for p in address.params.split(";") if p and not p.startswith("tag="))
    return str(Address(address.display, address.uri, f";{params}" if params else ""))


class Call:
    """One phone call: its dialog, its media, and what happened in it."""

    def __init__(self, ua: UserAgent, dialog: Dialog, peer: Peer) -> None:
        self.ua, self.dialog, self.peer = ua, dialog, peer
        self.media: CallMedia = SILENCE
        self.rtp = RtpSession(
            lambda pcm: self.media.heard(pcm),
            lambda digit: self.media.pressed(digit),
            lambda n: self.media.next_audio(n),
        )
        self.inbound = True
        self.caller = parse_address(str(dialog.remote))
        self.headers: dict[str, str] = {}
        self.answered_at = 0.0
        self.invite_received_at = 0.0
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.on_hold = False
        self._sdp_version = 0
        self._session_id = int(time.time())
        self._ack = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._transfer: asyncio.Future[bool] | None = None

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

    def attach(self, media: CallMedia) -> None:
        """Who hears the caller, speaks to them, gets their keys and the call's end."""
        self.media = media

    def comes_from(self, source: str) -> bool:
        """May `source` speak for the other end: the address the call's signalling came
        from, or where in-dialog requests go (the route's first hop, else the Contact)."""
        if source == self.peer[0]:
            return True
        with contextlib.suppress(SipError):
            return source == self.dialog.peer()[0]
        return False

    @property
    def number(self) -> str:
        """The caller's (or callee's) user part: usually the phone number."""
        try:
            return parse_uri(self.caller.uri).user
        except SipError:
            return ""

    def answer_sdp(self, offer: sdp.Media) -> bytes:
        body, pt, dtmf = sdp.answer(
            offer,
            self.ua.media_address(self.peer[0]),
            self.rtp.local_port,
            session_id=self._session_id,
            version=self._sdp_version,
        )
        self._sdp_version += 1
        self.apply(offer, pt, dtmf)
        return body

    def apply(self, media: sdp.Media, pt: int, dtmf: int | None) -> None:
        self.on_hold = media.on_hold
        self.rtp.sending = not media.on_hold
        if media.address != "0.0.0.0" and media.port:
            self.rtp.start((media.address, media.port), pt, dtmf, signalling=self.peer[0])

    def start_watch(self) -> None:
        self._watch = asyncio.create_task(self._media_watch(), name=f"media-watch {self.call_id}")

    async def _media_watch(self) -> None:
        """Hang up a call whose media stopped (peer crashed, network gone); not while held."""
        timeout = self.ua.config.media_timeout
        while not self.ended.is_set():
            await asyncio.sleep(min(1.0, timeout / 4))
            quiet = time.monotonic() - self.rtp.last_received
            if quiet > timeout and not self.on_hold:
                logger.warning("call %s: no media for %.0f s; hanging up", self.call_id, quiet)
                await self.hangup("media timeout")
                return

    async def hangup(self, reason: str = "hung up") -> None:
        """Send BYE (if the call is up) and end the call."""
        if self.ended.is_set():
            return
        self._end(reason)
        bye = self.dialog.request("BYE", self.ua)
        bye.add("Reason", f'Q.850;cause=16;text="{reason}"')
        with contextlib.suppress(TimeoutError):
            await self.ua.send_request(bye, self.dialog.peer(), timeout=8.0)

    def _end(self, reason: str) -> None:
        if self.ended.is_set():
            return
        self.end_reason = reason
        self.ended.set()
        self.rtp.close()
        if self._watch is not None:
            self._watch.cancel()
        self.ua.calls.pop(self.call_id, None)
        logger.info("call %s ended: %s", self.call_id, reason, extra={"call_id": self.call_id})
        self.media.ended(reason)

    async def transfer(self, target: str) -> bool:
        """Blind transfer (REFER, RFC 3515); True once the target answered (then BYE)."""
        refer = self.dialog.request("REFER", self.ua)
        refer.add("Refer-To", f"<{target}>")
        refer.add("Referred-By", str(self.dialog.local).split(";tag=")[0])
        self._transfer = asyncio.get_running_loop().create_future()
        try:
            res = await self.ua.send_request(refer, self.dialog.peer(), timeout=8.0)
        except TimeoutError:
            return False
        if res.status >= 300:
            logger.warning("call %s: transfer to %s refused: %d", self.call_id, target, res.status)
            return False
        try:
            ok = await asyncio.wait_for(asyncio.shield(self._transfer), 30.0)
        except asyncio.TimeoutError:
            ok = False
        if ok:
            await self.hangup(f"transferred to {target}")
        return ok

    def notified(self, body: bytes) -> None:
        """A NOTIFY about our REFER: `SIP/2.0 200 OK` in a sipfrag ends the transfer."""
        line = body.decode(errors="replace").strip().splitlines()[:1]
        if not line or self._transfer is None or self._transfer.done():
            return
        parts = line[0].split()
        try:
            status = number(parts[1], "status", 100, 699) if len(parts) >= 2 else 0
        except SipError:
            return
        if status >= 200:
            self._transfer.set_result(200 <= status < 300)
