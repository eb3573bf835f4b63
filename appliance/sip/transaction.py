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
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from appliance.sip.message import MANDATORY, Message, SipError, parse, response

logger = logging.getLogger("appliance.sip")

T1, T2 = 0.5, 4.0
TIMEOUT = 64 * T1
SERVER_MEMORY = 32.0  # seconds a server transaction's last response is kept

Address = tuple[str, int]


@dataclass
class _Server:
    response: Message | None = None
    expires: float = field(default_factory=lambda: time.monotonic() + SERVER_MEMORY)
    acked: asyncio.Event | None = None  # for INVITE final responses


class Transport(asyncio.DatagramProtocol):
    """The UDP socket, client transactions, and the server transactions' memory."""

    def __init__(self, handler: Callable[[Message, Address], None]) -> None:
        self.handler = handler
        self.transport: asyncio.DatagramTransport | None = None
        self.local: Address = ("0.0.0.0", 0)
        self._clients: dict[tuple[str, str], asyncio.Queue[Message]] = {}
        self._servers: dict[tuple[str, str], _Server] = {}
        self.malformed = 0
        self._malformed_logged = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.local = transport.get_extra_info("sockname")[:2]

    def send(self, message: Message, addr: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(message.to_bytes(), addr)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        addr = addr[:2]
        if data.strip() == b"":
            return  # a CRLF keepalive
        try:
            message = parse(data)
        except SipError as exc:
            self._bad(data, addr, str(exc), exc.partial)
            return
        try:
            if message.is_request:
                self._request(message, addr)
            else:
                self._response(message, addr)
        except (SipError, ValueError) as exc:  # e.g. a bad CSeq number or URI inside
            self._bad(data, addr, str(exc), message)

    def _bad(self, data: bytes, addr: Address, why: str, message: Message | None = None) -> None:
        """Count, log now and then, and answer 400 when the request can be answered."""
        self.malformed += 1
        now = time.monotonic()
        if now - self._malformed_logged > 10:
            self._malformed_logged = now
            logger.warning("malformed SIP from %s:%d (%s); %d so far", *addr, why, self.malformed)
        answerable = message is not None and all(message.get(h) for h in MANDATORY)
        if answerable and message is not None and message.is_request and message.method != "ACK":
            with contextlib.suppress(SipError, ValueError):
                self.send(response(message, 400, f"Bad Request ({why[:60]})"), addr)

    # -- server side --

    def _request(self, message: Message, addr: Address) -> None:
        key = (message.branch, message.cseq[1])
        if message.method == "ACK":
            server = self._servers.get((message.branch, "INVITE"))
            if server is not None and server.acked is not None:
                server.acked.set()  # ACK of a non-2xx final response (same transaction)
                return
            self.handler(message, addr)  # ACK of a 2xx: the dialog's business
            return
        server = self._servers.get(key) if message.branch else None
        if server is not None:
            if server.response is not None:
                self.send(server.response, addr)  # a retransmission: answer again
            return
        self._expire()
        if message.branch:
            self._servers[key] = _Server()
        self.handler(message, addr)

    def respond(self, request: Message, response: Message, addr: Address) -> None:
        """Send a response and remember it for retransmitted requests."""
        server = self._servers.get((request.branch, request.cseq[1]))
        if server is not None:
            server.response = response
        self.send(response, addr)

    async def respond_reliably(
        self, request: Message, response: Message, addr: Address, acked: asyncio.Event
    ) -> bool:
        """A final response to INVITE, resent (T1 doubling to T2) until `acked` is set."""
        server = self._servers.setdefault((request.branch, "INVITE"), _Server())
        server.response = response
        if response.status >= 300:
            server.acked = acked
        interval, deadline = T1, time.monotonic() + TIMEOUT
        self.send(response, addr)
        while time.monotonic() < deadline:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(acked.wait(), interval)
            if acked.is_set():
                return True
            self.send(response, addr)
            interval = min(interval * 2, T2)
        return False

    def _expire(self) -> None:
        now = time.monotonic()
        if len(self._servers) > 64:
            for key in [k for k, s in self._servers.items() if s.expires < now]:
                del self._servers[key]

    # -- client side --

    def _response(self, message: Message, addr: Address) -> None:
        queue = self._clients.get((message.branch, message.cseq[1]))
        if queue is not None:
            queue.put_nowait(message)
        else:
            self.handler(message, addr)  # e.g. a retransmitted 2xx to INVITE: ACK it again

    async def request(
        self,
        message: Message,
        addr: Address,
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
