"""The SIP user agent: inbound and outbound calls, dialogs, registration, transfer.

Inbound INVITE: scanners are dropped silently; the caller must be on the allow-list or
answer a digest challenge; beyond `max_calls` the answer is 486, while stopping 503, and
an offer without PCMU/PCMA 488. Otherwise 100, 180, (ring_time), 200 with our SDP answer,
resent until the ACK. In a call: BYE either way, re-INVITE (hold, unhold, a new address),
INFO and RFC 4733 DTMF, OPTIONS, REFER (transfer) with its NOTIFYs, and a media timeout
that hangs up a dead call. Outbound: `dial()`. Registration: REGISTER with digest
authentication, refreshed before it expires, removed at shutdown.

The UA knows nothing about AgentSessions: `on_call(call)` gets each answered call, and the
bridge (`appliance.sip.bridge`) connects its audio, DTMF and end to a session.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.sip import digest, sdp
from appliance.sip.message import (
    Address,
    Message,
    SipError,
    new_branch,
    new_call_id,
    new_tag,
    number,
    param,
    parse_address,
    parse_uri,
    response,
)
from appliance.sip.rtp import RtpSession
from appliance.sip.transaction import Transport

if TYPE_CHECKING:
    from appliance.config import SipConfig

logger = logging.getLogger("appliance.sip")

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, REFER, NOTIFY"
Peer = tuple[str, int]


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


def local_address_for(peer: str) -> str:
    """The local IP the kernel would use to reach `peer` (for SDP and Contact)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


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
        self.rtp = RtpSession(
            lambda pcm: self.on_audio(pcm), lambda d: self.on_dtmf(d), lambda n: self.source(n)
        )
        self.inbound = True
        self.caller = parse_address(str(dialog.remote))
        self.headers: dict[str, str] = {}
        self.answered_at = 0.0
        self.invite_received_at = 0.0
        self.ended = asyncio.Event()
        self.end_reason = ""
        self.on_hold = False
        # set by the bridge
        self.on_audio: Callable[[np.ndarray], None] = lambda pcm: None
        self.on_dtmf: Callable[[str], None] = lambda digit: None
        self.source: Callable[[int], np.ndarray] = lambda n: np.zeros(n, np.int16)
        self.on_end: Callable[[str], None] = lambda reason: None
        self._sdp_version = 0
        self._session_id = int(time.time())
        self._ack = asyncio.Event()
        self._watch: asyncio.Task[None] | None = None
        self._transfer: asyncio.Future[bool] | None = None

    @property
    def call_id(self) -> str:
        return self.dialog.call_id

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
        self.on_end(reason)

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


class UserAgent:
    """The SIP endpoint of the appliance (see the module docstring)."""

    def __init__(
        self,
        config: SipConfig,
        on_call: Callable[[Call], None],
        *,
        users: dict[str, str] | None = None,
        register_password: str = "",
    ) -> None:
        self.config = config
        self.on_call = on_call
        self.transport = Transport(self._handle)
        self.calls: dict[str, Call] = {}  # answered calls, by Call-ID
        self.stopping = False
        self.registered = False
        self.verifier = digest.Verifier("appliance", users) if users else None
        self.register_password = register_password
        self._allow = [ipaddress.ip_network(n, strict=False) for n in config.allow]
        self._pending: dict[str, _Pending] = {}  # INVITEs being answered, by Call-ID
        self._tasks: set[asyncio.Task[None]] = set()
        self._register_task: asyncio.Task[None] | None = None
        self._reg_call_id, self._reg_tag, self._reg_cseq = "", new_tag(), 0
        self._auth_header: tuple[str, str] | None = None
        self.bad = self.transport.bad  # one count and log throttle for the socket and us

    # -- life cycle --

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self.transport, local_addr=(self.config.listen, self.config.port)
        )
        logger.info("SIP listening on udp %s:%d", *self.transport.local)
        if self.config.register_uri:
            self._register_task = asyncio.create_task(self._keep_registered(), name="sip-register")

    async def stop(self) -> None:
        """No new calls (503); hang up the rest; unregister; close the socket."""
        self.stopping = True
        for pending in list(self._pending.values()):
            pending.task.cancel()  # ringing callers get 487
        await asyncio.gather(
            *(call.hangup("the appliance is stopping") for call in list(self.calls.values()))
        )
        if self._register_task is not None:
            self._register_task.cancel()
            if self.registered:
                with contextlib.suppress(TimeoutError, OSError):
                    await self._register(expires=0)
        for task in list(self._tasks):
            task.cancel()
        self.transport.close()

    def _spawn(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    # -- addresses --

    def media_address(self, peer: str) -> str:
        return self.config.public_address or local_address_for(peer)

    def contact(self, peer: str) -> str:
        return f"<sip:appliance@{self.media_address(peer)}:{self.transport.local[1]}>"

    def via(self, peer: str) -> str:
        return f"{self.media_address(peer)}:{self.transport.local[1]}"

    async def send_request(self, msg: Message, peer: Peer, *, timeout: float = 32.0) -> Message:
        """Run a client transaction; the final response (raises TimeoutError)."""
        return await self.transport.request(msg, peer, timeout=timeout)

    def _respond(self, request: Message, status: int, peer: Peer, **headers: str) -> Message:
        """Answer to the request's source address (rport style: works through NAT)."""
        res = response(request, status, to_tag=headers.pop("to_tag", ""))
        for name, value in headers.items():
            res.add(name.replace("_", "-"), value)
        res.add("User-Agent", self.config.user_agent)
        self.transport.respond(request, res, peer)
        return res

    # -- incoming messages --

    def _handle(self, msg: Message, peer: Peer) -> None:
        if not msg.is_request:
            self._stray_response(msg, peer)
            return
        method = msg.method
        if method == "OPTIONS":
            self._respond(msg, 200, peer, Allow=ALLOW, Accept="application/sdp")
            return
        if method == "CANCEL":
            self._cancel(msg, peer)
            return
        call = self.calls.get(msg.call_id)
        if method == "INVITE" and not parse_address(msg.get("To")).tag:
            if call is not None or msg.call_id in self._pending:
                self._respond(msg, 482, peer)  # a second INVITE for one Call-ID (RFC 8.2.2.2)
            else:
                self._spawn(self._inbound(msg, peer), f"invite {msg.call_id}")
            return
        if call is None or not call.dialog.matches(msg) or not call.comes_from(peer[0]):
            if call is not None:
                self.bad("dialog", "%s from %s:%d does not match its call", method, *peer)
            if method != "ACK":
                self._respond(msg, 481, peer)
            return
        if method == "ACK":
            call._ack.set()
            return
        seq = msg.cseq[0]
        if seq <= call.dialog.remote_cseq:
            self._respond(msg, 500, peer)  # out of order or replayed (RFC 3261 12.2.2)
            return
        call.dialog.remote_cseq = seq
        if method == "BYE":
            self._respond(msg, 200, peer)
            call._end("the caller hung up" if call.inbound else "the callee hung up")
        elif method == "INVITE":
            self._spawn(self._reinvite(call, msg, peer), f"re-invite {msg.call_id}")
        elif method == "INFO":
            self._info(call, msg, peer)
        elif method == "NOTIFY":
            self._respond(msg, 200, peer)
            call.notified(msg.body)
        else:
            self._respond(
                msg,
                405 if method in ("REGISTER", "SUBSCRIBE", "MESSAGE", "UPDATE", "PRACK") else 501,
                peer,
                Allow=ALLOW,
            )

    def _stray_response(self, msg: Message, peer: Peer) -> None:
        """A 2xx to INVITE outside its transaction: our ACK was lost; send it again."""
        call = self.calls.get(msg.call_id)
        seq, method = msg.cseq
        if call is None or method != "INVITE" or not 200 <= msg.status < 300:
            return
        if (
            not call.comes_from(peer[0])
            or parse_address(msg.get("From")).tag != call.dialog.local_tag
        ):
            return
        ack = call.dialog.request("ACK", self, cseq=seq)
        self.transport.send(ack, call.dialog.peer())

    def _allowed(self, msg: Message, peer: Peer) -> tuple[bool, str]:
        """(may call, why not); with credentials, a caller off the allow-list is challenged."""
        try:
            source = ipaddress.ip_address(peer[0])
        except ValueError:
            return False, "bad source address"
        if any(source in net for net in self._allow):
            return True, ""
        if self.verifier is not None:
            header = msg.get("Authorization")
            if header and self.verifier.check(header, msg.method, msg.uri, peer[0]):
                return True, ""
            return False, "challenge"
        return False, "not on the allow-list"

    async def _inbound(self, invite: Message, peer: Peer) -> None:
        """A new INVITE: admit it (or refuse), ring, answer; the call is kept only once
        everything about it has parsed, and it is watched from then on."""
        allowed, why = self._allowed(invite, peer)
        if not allowed:
            if why == "challenge" and self.verifier is not None:
                challenge = self.verifier.challenge(peer[0])
                self._respond(invite, 401, peer, WWW_Authenticate=challenge)
            else:
                self.bad("refused", "INVITE from %s:%d refused: %s", *peer, why)
                self._respond(invite, 403, peer)
            return
        if self.stopping:
            self._respond(invite, 503, peer, Retry_After="30")
            return
        if len(self.calls) + len(self._pending) >= self.config.max_calls:
            self.bad("busy", "INVITE from %s:%d: busy (%d calls)", *peer, len(self.calls))
            await self._final(invite, 486, peer)
            return
        try:
            offer = sdp.parse(invite.body)
            sdp.choose_codec(offer)
            caller = parse_address(invite.get("From"))
            target = parse_address(invite.get("Contact") or invite.get("From")).uri
            parse_uri(target)
            dialog = Dialog(
                call_id=invite.call_id,
                local_tag=new_tag(),
                remote_tag=caller.tag,
                local=parse_address(invite.get("To")),
                remote=caller,
                remote_target=target,
                route_set=invite.get_all("Record-Route"),
                remote_cseq=invite.cseq[0],
            )
            dialog.peer()
            call = Call(self, dialog, peer)
            number = call.number
        except (sdp.SdpError, SipError) as exc:
            self.bad("unacceptable", "INVITE from %s:%d not acceptable: %s", *peer, exc)
            await self._final(invite, 488 if isinstance(exc, sdp.SdpError) else 400, peer)
            return
        task = asyncio.current_task()
        assert task is not None
        self._pending[invite.call_id] = _Pending(task, invite.branch, peer)
        self._respond(invite, 100, peer)
        call.invite_received_at = time.monotonic()
        call.headers = {h: invite.get(h) for h in self.config.headers if invite.get(h)}
        try:
            await call.rtp.open(self.config.listen, self.config.rtp_ports)
            self._respond(invite, 180, peer, to_tag=dialog.local_tag, Contact=self.contact(peer[0]))
            if self.config.ring_time:
                await asyncio.sleep(self.config.ring_time)
            answer = call.answer_sdp(offer)
        except asyncio.CancelledError:
            call.rtp.close()
            await self._final(invite, 487, peer, to_tag=dialog.local_tag)
            return
        except OSError as exc:
            logger.error("call %s: %s", invite.call_id, exc)
            call.rtp.close()
            await self._final(invite, 503, peer, to_tag=dialog.local_tag)
            return
        finally:
            self._pending.pop(invite.call_id, None)
        ok = response(invite, 200, to_tag=dialog.local_tag)
        ok.add("Contact", self.contact(peer[0]))
        ok.add("Allow", ALLOW)
        ok.add("User-Agent", self.config.user_agent)
        ok.add("Content-Type", "application/sdp")
        ok.body = answer
        self.calls[call.call_id] = call
        call.answered_at = time.monotonic()
        call.start_watch()
        logger.info(
            "call %s from %s answered",
            call.call_id,
            number or peer[0],
            extra={"call_id": call.call_id},
        )
        try:
            self.on_call(call)  # the greeting starts as soon as the call is answered
        except Exception:
            logger.exception("call %s could not start", call.call_id)
            await call.hangup("internal error")
            return
        if not await self.transport.respond_reliably(invite, ok, peer, call._ack):
            logger.warning("call %s: no ACK for our 200 OK", call.call_id)
            await call.hangup("no ACK")

    async def _final(self, invite: Message, status: int, addr: Peer, *, to_tag: str = "") -> None:
        res = response(invite, status, to_tag=to_tag or new_tag())
        res.add("User-Agent", self.config.user_agent)
        await self.transport.respond_reliably(invite, res, addr, asyncio.Event())

    def _cancel(self, cancel: Message, peer: Peer) -> None:
        """CANCEL of an INVITE being answered: same Call-ID, branch and source (RFC 9.2)."""
        pending = self._pending.get(cancel.call_id)
        if pending is None or (pending.branch, pending.peer) != (cancel.branch, peer):
            self._respond(cancel, 481, peer)
            return
        self._respond(cancel, 200, peer)
        pending.task.cancel()  # the INVITE gets 487 Request Terminated

    async def _reinvite(self, call: Call, invite: Message, peer: Peer) -> None:
        try:
            offer = sdp.parse(invite.body)
            sdp.choose_codec(offer)
            target = invite.get("Contact")
            if target:
                parse_uri(parse_address(target).uri)
        except (sdp.SdpError, SipError) as exc:
            self._respond(invite, 488 if isinstance(exc, sdp.SdpError) else 400, peer)
            self.bad("unacceptable", "call %s: re-INVITE not acceptable: %s", call.call_id, exc)
            return
        was_held = call.on_hold
        body = call.answer_sdp(offer)
        if call.on_hold != was_held:
            logger.info("call %s %s", call.call_id, "on hold" if call.on_hold else "resumed")
        if not call.on_hold:
            call.rtp.last_received = time.monotonic()
        if target:
            call.dialog.remote_target = parse_address(target).uri
        ok = response(invite, 200)
        ok.add("Contact", self.contact(peer[0]))
        ok.add("Content-Type", "application/sdp")
        ok.body = body
        ack = asyncio.Event()
        call._ack = ack
        await self.transport.respond_reliably(invite, ok, peer, ack)

    def _info(self, call: Call, info: Message, peer: Peer) -> None:
        kind = info.get("Content-Type").lower()
        text = info.body.decode(errors="replace").strip()
        digit = ""
        if kind.startswith("application/dtmf-relay"):
            for line in text.splitlines():
                key, _, value = line.partition("=")
                if key.strip().lower() == "signal":
                    digit = value.strip()
        elif kind.startswith("application/dtmf"):
            digit = text
        if len(digit) != 1 or digit.upper() not in "0123456789*#ABCD":
            self._respond(info, 415 if not digit else 400, peer)
            return
        self._respond(info, 200, peer)
        call.on_dtmf(digit.upper())

    # -- outbound --

    async def dial(self, target: str, *, timeout: float = 60.0) -> Call:
        """Call `target` (sip:user@host[:port]); returns the answered call."""
        uri = parse_uri(target)
        proxy = parse_uri(self.config.outbound_proxy) if self.config.outbound_proxy else uri
        peer: Peer = (socket.gethostbyname(proxy.host), proxy.port)
        local = Address("", f"sip:appliance@{self.media_address(peer[0])}", "")
        dialog = Dialog(
            new_call_id(self.media_address(peer[0])),
            new_tag(),
            "",
            local,
            Address("", target, ""),
            target,
        )
        call = Call(self, dialog, peer)
        rtp = call.rtp
        await rtp.open(self.config.listen, self.config.rtp_ports)
        call.inbound = False
        call.caller = dialog.remote
        offer = sdp.build(
            self.media_address(peer[0]),
            rtp.local_port,
            [0, 8],
            sdp.DTMF_PT,
            session_id=call._session_id,
        )
        authorized = False
        while True:
            invite = dialog.request("INVITE", self)
            invite.add("Content-Type", "application/sdp")
            invite.body = offer
            if authorized and self._auth_header is not None:
                invite.add(*self._auth_header)
            try:
                res = await self.send_request(invite, peer, timeout=timeout)
            except TimeoutError:
                rtp.close()
                raise
            if res.status in (401, 407) and not authorized and self.register_password:
                self._auth_header = self._answer_challenge(res, "INVITE", target)
                authorized = True
                await self._ack_failure(invite, res, peer)
                continue
            break
        if res.status >= 300:
            await self._ack_failure(invite, res, peer)
            rtp.close()
            raise ConnectionRefusedError(f"{target}: {res.status} {res.reason}")
        answer = sdp.parse(res.body)
        pt = sdp.choose_codec(answer)
        dialog.remote_tag = parse_address(res.get("To")).tag
        dialog.remote_target = parse_address(res.get("Contact") or res.get("To")).uri
        dialog.route_set = list(reversed(res.get_all("Record-Route")))
        ack = dialog.request("ACK", self, cseq=invite.cseq[0])
        self.transport.send(ack, dialog.peer())
        call.apply(answer, pt, answer.dtmf_pt())
        call.answered_at = time.monotonic()
        self.calls[call.call_id] = call
        call.start_watch()
        self.on_call(call)
        return call

    async def _ack_failure(self, invite: Message, res: Message, peer: Peer) -> None:
        """ACK a non-2xx final response (same transaction: same branch and CSeq)."""
        ack = Message(method="ACK", uri=invite.uri)
        ack.add("Via", invite.get("Via"))
        ack.add("From", invite.get("From"))
        ack.add("To", res.get("To"))
        ack.add("Call-ID", invite.call_id)
        ack.add("CSeq", f"{invite.cseq[0]} ACK")
        ack.add("Max-Forwards", "70")
        self.transport.send(ack, peer)

    # -- registration --

    def _answer_challenge(self, res: Message, method: str, uri: str) -> tuple[str, str]:
        header = "Authorization" if res.status == 401 else "Proxy-Authorization"
        challenge = res.get("WWW-Authenticate" if res.status == 401 else "Proxy-Authenticate")
        user = self.config.register_user or parse_uri(self.config.register_uri).user
        return header, digest.authorization(challenge, user, self.register_password, method, uri)

    async def _register(self, expires: int) -> int:
        """One REGISTER (with the digest answer if challenged); the granted expiry."""
        aor = self.config.register_uri
        uri = parse_uri(aor)
        proxy = parse_uri(self.config.outbound_proxy) if self.config.outbound_proxy else uri
        peer: Peer = (socket.gethostbyname(proxy.host), proxy.port)
        registrar = f"sip:{uri.host}" + (f":{uri.port}" if uri.port != 5060 else "")
        if not self._reg_call_id:
            self._reg_call_id = new_call_id(self.via(peer[0]))
        call_id, tag = self._reg_call_id, self._reg_tag
        auth: tuple[str, str] | None = None
        for _ in range(2):
            self._reg_cseq += 1
            msg = Message(method="REGISTER", uri=registrar)
            msg.add("Via", f"SIP/2.0/UDP {self.via(peer[0])};branch={new_branch()};rport")
            msg.add("Max-Forwards", "70")
            msg.add("From", f"<{aor}>;tag={tag}")
            msg.add("To", f"<{aor}>")
            msg.add("Call-ID", call_id)
            msg.add("CSeq", f"{self._reg_cseq} REGISTER")
            msg.add("Contact", self.contact(peer[0]))
            msg.add("Expires", str(expires))
            msg.add("User-Agent", self.config.user_agent)
            if auth:
                msg.add(*auth)
            res = await self.transport.request(msg, peer)
            if res.status in (401, 407) and auth is None and self.register_password:
                auth = self._answer_challenge(res, "REGISTER", registrar)
                continue
            if res.status >= 300:
                raise PermissionError(f"REGISTER {aor}: {res.status} {res.reason}")
            granted = param(res.get("Contact"), "expires") or res.get("Expires") or str(expires)
            with contextlib.suppress(SipError):
                return number(granted, "Expires", 1)
            return expires
        raise PermissionError(f"REGISTER {aor}: the credentials were refused")

    async def _keep_registered(self) -> None:
        """Register, refresh at half the granted time, retry with backoff on failure."""
        backoff = 5.0
        logged = False
        while True:
            try:
                granted = await self._register(self.config.register_expires)
            except (TimeoutError, OSError, PermissionError, ValueError) as exc:  # + SipError
                self.registered = False
                if not logged:
                    logger.error("registration failed: %s; retrying", exc)
                    logged = True
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 300.0)
                continue
            if not self.registered or logged:
                logger.info("registered %s for %d s", self.config.register_uri, granted)
            self.registered, logged, backoff = True, False, 5.0
            await asyncio.sleep(max(granted / 2, 10.0))


@dataclass
class _Pending:
    """An INVITE being answered: its task (cancelled by CANCEL), branch and source."""

    task: asyncio.Task[Any]
    branch: str
    peer: Peer


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("SIP task %s failed", task.get_name(), exc_info=task.exception())
