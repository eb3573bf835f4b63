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
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from appliance.sip import digest, sdp
from appliance.sip.call import Call, Dialog
from appliance.sip.message import (
    Address,
    Message,
    SipError,
    new_call_id,
    new_tag,
    parse_address,
    parse_uri,
    response,
)
from appliance.sip.register import Registration
from appliance.sip.transaction import Peer, Transport

if TYPE_CHECKING:
    from appliance.config import SipConfig

logger = logging.getLogger("appliance.sip")

ALLOW = "INVITE, ACK, BYE, CANCEL, OPTIONS, INFO, REFER, NOTIFY"


def local_address_for(peer: str) -> str:
    """The local IP the kernel would use to reach `peer` (for SDP and Contact)."""
    family = socket.AF_INET6 if ":" in peer else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((peer, 9))
            return str(s.getsockname()[0])
        except OSError:
            return "127.0.0.1"


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
        self.verifier = digest.Verifier("appliance", users) if users else None
        self.registration = Registration(self, register_password)
        self._allow = [ipaddress.ip_network(n, strict=False) for n in config.allow]
        self._pending: dict[str, _Pending] = {}  # INVITEs being answered, by Call-ID
        self._tasks: set[asyncio.Task[None]] = set()
        self._register_task: asyncio.Task[None] | None = None
        self._auth_header: tuple[str, str] | None = None
        self.bad = self.transport.bad  # one count and log throttle for the socket and us

    @property
    def registered(self) -> bool:
        return self.registration.registered

    # -- life cycle --

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(
            lambda: self.transport, local_addr=(self.config.listen, self.config.port)
        )
        logger.info("SIP listening on udp %s:%d", *self.transport.local)
        if self.config.register_uri:
            self._register_task = asyncio.create_task(self.registration.keep(), name="sip-register")

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
            if self.registration.registered:
                with contextlib.suppress(TimeoutError, OSError):
                    await self.registration.register(expires=0)
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
        call.media.pressed(digit.upper())

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
            if res.status in (401, 407) and not authorized and self.registration.password:
                self._auth_header = self.registration.answer_challenge(res, "INVITE", target)
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


@dataclass
class _Pending:
    """An INVITE being answered: its task (cancelled by CANCEL), branch and source."""

    task: asyncio.Task[Any]
    branch: str
    peer: Peer


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.error("SIP task %s failed", task.get_name(), exc_info=task.exception())
