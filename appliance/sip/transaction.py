"""SIP transactions over UDP (RFC 3261 section 17): retransmissions and matching.

`Transport` is the UDP socket: it parses datagrams and hands them to the user agent.
Client transactions (`request()`) retransmit with timer A/E (T1 doubling, capped at T2
for non-INVITE) until a final response, and time out after 64*T1. Server transactions
remember their last response, so a retransmitted request gets it again; final responses
to INVITE are retransmitted until the ACK arrives (`respond_reliably()`).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.observe.badinput import BadInput
from appliance.sip.message import MANDATORY, Message, SipError, parse, parse_address, response

logger = logging.getLogger("appliance.sip")

T1, T2 = 0.5, 4.0
TIMEOUT = 64 * T1
SERVER_MEMORY = 32.0  # seconds a server transaction's last response is kept
MAX_SERVERS = 8192  # server transactions remembered; the oldest go first beyond this
MAX_RESENDING = 16  # refusals to INVITE resent until ACKed at once; beyond, sent once
SCANNERS = re.compile(
    r"friendly-scanner|sipvicious|sipcli|sip-scan|sundayddr|iwar|vaxsipuseragent|pplsip|"
    r"sipsak|smap|svwar|svcrack",
    re.IGNORECASE,
)

Peer = tuple[str, int]  # (host, port) of a datagram
Key = tuple[str, str, Peer]  # branch, method, source (RFC 3261 17.2.3, with the address)


@dataclass
class _Server:
    response: Message | None = None
    expires: float = field(default_factory=lambda: time.monotonic() + SERVER_MEMORY)
    acked: asyncio.Event | None = None  # for INVITE final responses


class Transport(asyncio.DatagramProtocol):
    """The UDP socket, client transactions, and the server transactions' memory.

    Bad input never raises out of here and never logs more than `BadInput` allows:
    malformed requests get a plain 400 (no echo of what was wrong), scanners (by their
    User-Agent) get nothing at all, and a request with no Via branch is refused (the
    branch is the transaction key).
    """

    def __init__(self, handler: Callable[[Message, Peer], None]) -> None:
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Peer = ("0.0.0.0", 0)
        self.bad = BadInput(logger)
        self._clients: dict[tuple[str, str], asyncio.Queue[Message]] = {}
        self._servers: dict[Key, _Server] = {}  # oldest first: expiry is insertion order
        self._resending = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def send(self, message: Message, addr: Peer) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(message.to_bytes(), addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        addr = addr[:2]
        if data.strip() == b"":
            return  # a CRLF keepalive
        try:
            message = parse(data)
        except SipError as exc:
            self._bad(addr, str(exc), exc.partial)
            return
        if message.is_request and SCANNERS.search(message.get("User-Agent")):
            self.bad("scanner", "dropped a SIP scanner's request from %s", addr[0])
            return  # scanners get nothing, not even an error
        try:
            if message.is_request:
                self._request(message, addr)
            else:
                self._response(message, addr)
        except SipError as exc:  # something inside did not parse after all
            self._bad(addr, str(exc), message)
        except Exception:  # a defect of ours: logged (throttled), the socket keeps serving
            what = message.method or f"{message.status} response"
            self.bad(
                "internal",
                "SIP %s from %s:%d failed",
                what,
                *addr,
                level=logging.ERROR,
                exc_info=True,
            )

    def _bad(self, addr: Peer, why: str, message: Message | None = None) -> None:
        """Count, log now and then, and answer 400 when the request can be answered."""
        if message is not None and SCANNERS.search(message.get("User-Agent")):
            self.bad("scanner", "dropped a SIP scanner's request from %s", addr[0])
            return
        self.bad("malformed", "malformed SIP from %s:%d (%s)", *addr, why)
        if message is None or not message.is_request or message.method == "ACK":
            return
        try:  # answered only if the answer's own headers (copied from the request) are sound
            if not all(message.get(h) for h in MANDATORY):
                return
            message.cseq, parse_address(message.get("From")), parse_address(message.get("To"))
        except SipError:
            return
        self.send(response(message, 400), addr)

    # -- server side --

    def _request(self, message: Message, addr: Peer) -> None:
        if not message.branch:
            raise SipError("no Via branch")
        if message.method == "ACK":
            server = self._servers.get((message.branch, "INVITE", addr))
            if server is not None and server.acked is not None:
                server.acked.set()  # ACK of a non-2xx final response (same transaction)
                return
            self.handler(message, addr)  # ACK of a 2xx: the dialog's business
            return
        key = (message.branch, message.cseq[1], addr)
        server = self._servers.get(key)
        if server is not None:
            if server.response is not None:
                self.send(server.response, addr)  # a retransmission: answer again
            return
        self._remember(key, _Server())
        self.handler(message, addr)

    def _remember(self, key: Key, server: _Server) -> _Server:
        """Keep `server` as the newest entry; forget the expired and the surplus oldest."""
        self._servers.pop(key, None)
        self._servers[key] = server
        now = time.monotonic()
        for old in list(itertools.islice(self._servers, 64)):
            if self._servers[old].expires >= now and len(self._servers) <= MAX_SERVERS:
                break
            del self._servers[old]
        return server

    def respond(self, request: Message, response: Message, addr: Peer) -> None:
        """Send a response and remember it for retransmitted requests."""
        server = self._servers.get((request.branch, request.cseq[1], addr))
        if server is not None:
            server.response = response
        self.send(response, addr)

    async def respond_reliably(
        self, request: Message, response: Message, addr: Peer, acked: asyncio.Event
    ) -> bool:
        """A final response to INVITE, resent (T1 doubling to T2) until `acked` is set.

        A refusal (>= 300) is sent once only while `MAX_RESENDING` others are being resent:
        a flood of INVITEs gets one answer each (a retransmitted INVITE still gets it again).
        """
        server = self._remember((request.branch, "INVITE", addr), _Server(response))
        refusal = response.status >= 300
        if refusal:
            server.acked = acked
            if self._resending >= MAX_RESENDING:
                self.send(response, addr)
                return False
            self._resending += 1
        interval, deadline = T1, time.monotonic() + TIMEOUT
        try:
            self.send(response, addr)
            while time.monotonic() < deadline:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(acked.wait(), interval)
                if acked.is_set():
                    return True
                self.send(response, addr)
                interval = min(interval * 2, T2)
            return False
        finally:
            if refusal:
                self._resending -= 1

    # -- client side --

    def _response(self, message: Message, addr: Peer) -> None:
        queue = self._clients.get((message.branch, message.cseq[1]))
        if queue is not None:
            queue.put_nowait(message)
        else:
            self.handler(message, addr)  # e.g. a retransmitted 2xx to INVITE: ACK it again

    async def request(
        self,
        message: Message,
        addr: Peer,
        *,
        on_provisional: Callable[[Message], None] | None = None,
        timeout: float = TIMEOUT,
    ) -> Message:
        """Send a request and return its final response; raises TimeoutError."""
        key = (message.branch, message.cseq[1])
        queue: asyncio.Queue[Message] = asyncio.Queue()
        self._clients[key] = queue
        invite = message.method == "INVITE"
        interval, deadline = T1, time.monotonic() + timeout
        provisional = False
        try:
            self.send(message, addr)
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{message.method}: no response from {addr[0]}:{addr[1]}")
                try:
                    response = await asyncio.wait_for(queue.get(), min(interval, left))
                except asyncio.TimeoutError:
                    if not (invite and provisional):
                        self.send(message, addr)
                        interval = interval * 2 if invite else min(interval * 2, T2)
                    continue
                if response.status < 200:
                    provisional = True
                    interval = T2 if not invite else interval
                    if on_provisional is not None:
                        on_provisional(response)
                    continue
                return response
        finally:
            self._clients.pop(key, None)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
