"""RTP (RFC 3550/3551) for one call: packets, a jitter buffer, RFC 4733 DTMF, the session.

`RtpSession` owns a UDP port. It sends one 20 ms G.711 packet every 20 ms, on the event
loop's clock with drift correction (silence when there is nothing to say), with a
continuous sequence number and timestamp, one SSRC, and the marker bit on the first
packet of each talkspurt. It receives strictly: the first packet must come from the
negotiated peer (the SDP's address, or the address its SIP came from: phones behind NAT
put a private address in their SDP); its source address and port are then latched, and
our packets go back there (symmetric RTP). Packets from anywhere else, or with a payload
type that was not negotiated, are counted and dropped. Received audio goes through a
jitter buffer that reorders, drops late packets and conceals losses, played out every
20 ms.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import struct
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from appliance.sip.g711 import CODECS

logger = logging.getLogger("appliance.sip.rtp")

RATE = 8000
FRAME = 160  # samples in 20 ms
PTIME = 0.02
DTMF_EVENTS = "0123456789*#ABCD"


@dataclass
class Packet:
    pt: int
    seq: int
    ts: int
    ssrc: int
    payload: bytes
    marker: bool = False


def parse(data: bytes) -> Packet:
    """An RTP packet; raises ValueError if it is not one."""
    if len(data) < 12:
        raise ValueError("shorter than an RTP header")
    b0, b1, seq, ts, ssrc = struct.unpack("!BBHII", data[:12])
    if b0 >> 6 != 2:
        raise ValueError("not RTP version 2")
    offset = 12 + 4 * (b0 & 0x0F)  # CSRCs
    if b0 & 0x10:  # header extension
        if len(data) < offset + 4:
            raise ValueError("truncated extension")
        (words,) = struct.unpack("!H", data[offset + 2 : offset + 4])
        offset += 4 + 4 * words
    end = len(data)
    if b0 & 0x20:  # padding
        end -= data[-1]
    if offset > end:
        raise ValueError("truncated packet")
    return Packet(b1 & 0x7F, seq, ts, ssrc, data[offset:end], bool(b1 & 0x80))


def build(packet: Packet) -> bytes:
    b1 = (0x80 if packet.marker else 0) | (packet.pt & 0x7F)
    return struct.pack("!BBHII", 0x80, b1, packet.seq, packet.ts, packet.ssrc) + packet.payload


def dtmf_event(payload: bytes) -> tuple[str, bool, int] | None:
    """(digit, end of event, duration) of an RFC 4733 payload, None if it is not one."""
    if len(payload) < 4 or payload[0] >= len(DTMF_EVENTS):
        return None
    return DTMF_EVENTS[payload[0]], bool(payload[1] & 0x80), int.from_bytes(payload[2:4], "big")


class JitterBuffer:
    """Reorders packets by sequence number; `pop()` gives one frame per 20 ms tick.

    Playout starts once `depth` frames are buffered. A missing frame is concealed: the
    last frame again at half level, then silence. Packets older than the playout point
    (late) and duplicates are dropped.
    """

    def __init__(self, depth: int = 3) -> None:
        self.depth = depth
        self._frames: dict[int, np.ndarray] = {}
        self._next: int | None = None  # sequence number to play next
        self._started = False
        self._last = np.zeros(FRAME, np.int16)
        self._concealed = 0
        self.late = self.lost = self.received = 0

    def push(self, seq: int, pcm: np.ndarray) -> None:
        self.received += 1
        if self._next is None:
            self._next = seq
        elif (seq - self._next) & 0xFFFF >= 0x8000:  # before the playout point
            self.late += 1
            return
        if len(self._frames) < 100:  # a peer flooding us cannot grow the buffer
            self._frames.setdefault(seq, pcm)

    def pop(self) -> np.ndarray | None:
        """The frame to play now; None before playout starts or when the peer is silent."""
        if self._next is None:
            return None
        if not self._started:
            if len(self._frames) < self.depth:
                return None
            self._started = True
        frame = self._frames.pop(self._next, None)
        if frame is None:
            if not self._frames:  # nothing queued: the peer paused (hold, silence)
                self._started = False
                return None
            self.lost += 1
            self._concealed += 1
            frame = (self._last // 2) if self._concealed == 1 else np.zeros(FRAME, np.int16)
        else:
            self._concealed = 0
        self._last = frame
        self._next = (self._next + 1) & 0xFFFF
        return frame


class RtpSession(asyncio.DatagramProtocol):
    """The media of one call (see the module docstring)."""

    def __init__(
        self,
        on_audio: Callable[[np.ndarray], None],
        on_dtmf: Callable[[str], None],
        source: Callable[[int], np.ndarray],
    ) -> None:
        self.on_audio, self.on_dtmf, self.source = on_audio, on_dtmf, source
        self.transport: asyncio.DatagramTransport | None = None
        self.local_port = 0
        self.remote: tuple[str, int] | None = None  # where our packets go
        self._peers: set[str] = set()  # addresses the first packet may come from
        self._latched: tuple[str, int] | None = None
        self.codec_pt = 0
        self.dtmf_pt: int | None = None
        self.sending = True  # False while the peer holds the call
        self.ssrc = secrets.randbits(32)
        self._seq = secrets.randbits(16)
        self._ts = secrets.randbits(32)
        self._talking = False
        self._last_dtmf_ts: int | None = None
        self.jitter = JitterBuffer()
        self.last_received = time.monotonic()
        self.dropped = 0
        self.sent = 0
        self.send_errors = 0
        self.send_times: deque[float] = deque(maxlen=3000)  # the last minute, for figures
        self._tasks: list[asyncio.Task[None]] = []

    async def open(self, host: str, ports: tuple[int, int]) -> int:
        """Bind the first free even port in `ports` (inclusive range)."""
        loop = asyncio.get_running_loop()
        first = ports[0] + ports[0] % 2
        for port in range(first, ports[1] + 1, 2):
            try:
                await loop.create_datagram_endpoint(lambda: self, local_addr=(host, port))
            except OSError:
                continue
            self.local_port = port
            return port
        raise OSError(f"no free RTP port in {ports[0]}-{ports[1]}")

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def error_received(self, exc: Exception) -> None:
        self.send_errors += 1  # e.g. an unreachable SDP address before the peer's first packet

    def start(
        self, remote: tuple[str, int], codec_pt: int, dtmf_pt: int | None, signalling: str = ""
    ) -> None:
        """Set (or change, on a re-INVITE) the peer and payload types; run the clocks.

        `signalling`: the address the call's SIP came from, also accepted as the source.
        """
        if remote != self.remote:
            self._latched = None
        self.remote, self.codec_pt, self.dtmf_pt = remote, codec_pt, dtmf_pt
        self._peers = {remote[0], signalling} - {""}
        if not self._tasks:
            self._tasks = [
                asyncio.create_task(self._clock(self._send_one), name="rtp-send"),
                asyncio.create_task(self._clock(self._play_one), name="rtp-play"),
            ]

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        self._tasks = []
        if self.transport is not None:
            self.transport.close()

    # -- receiving --

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        source = addr[:2]
        if self._latched is None:
            if source[0] not in self._peers:
                self.dropped += 1  # not the negotiated peer
                logger.debug("RTP from %s dropped: not the peer %s", source, self._peers)
                return
            self._latched = source
            if source[1] and self.remote is not None and source != self.remote:
                logger.debug("RTP: the peer sends from %s; replying there", source)
                self.remote = source  # symmetric RTP: answer where it comes from (NAT)
        elif source != self._latched:
            self.dropped += 1  # the peer's address, another port: not this stream
            logger.debug("RTP from %s dropped: the stream comes from %s", source, self._latched)
            return
        try:
            packet = parse(data)
        except ValueError:
            self.dropped += 1
            return
        if packet.pt == self.dtmf_pt and self.dtmf_pt is not None:
            self.last_received = time.monotonic()
            self._dtmf(packet)
            return
        if packet.pt != self.codec_pt or len(packet.payload) > 4 * FRAME:
            self.dropped += 1  # a payload type that was not negotiated
            logger.debug("RTP payload type %d dropped", packet.pt)
            return
        self.last_received = time.monotonic()
        decode = CODECS[self.codec_key][2]
        self.jitter.push(packet.seq, decode(packet.payload))

    @property
    def codec_key(self) -> int:
        return self.codec_pt if self.codec_pt in CODECS else 0

    def _dtmf(self, packet: Packet) -> None:
        event = dtmf_event(packet.payload)
        if event is None or packet.ts == self._last_dtmf_ts:
            return  # one digit per event: its repeats and end packets share a timestamp
        self._last_dtmf_ts = packet.ts
        self.on_dtmf(event[0])

    # -- clocks --

    async def _clock(self, tick: Callable[[], None]) -> None:
        """Call `tick` every 20 ms on the loop, catching up after a late wake-up."""
        loop = asyncio.get_running_loop()
        due = loop.time()
        while True:
            due += PTIME
            delay = due - loop.time()
            if delay < -0.2:  # far behind (a stalled loop): resynchronise, do not burst
                due = loop.time()
            elif delay > 0:
                await asyncio.sleep(delay)
            tick()

    def _play_one(self) -> None:
        frame = self.jitter.pop()
        self.on_audio(frame if frame is not None else np.zeros(FRAME, np.int16))

    def _send_one(self) -> None:
        pcm = self.source(FRAME)
        if self.transport is None or self.remote is None or not self.sending:
            return
        speaking = bool(np.any(pcm))
        encode = CODECS[self.codec_key][1]
        packet = Packet(
            self.codec_pt,
            self._seq,
            self._ts,
            self.ssrc,
            encode(pcm),
            marker=speaking and not self._talking,
        )
        self._talking = speaking
        self.transport.sendto(build(packet), self.remote)
        self._seq = (self._seq + 1) & 0xFFFF
        self._ts = (self._ts + FRAME) & 0xFFFFFFFF
        self.sent += 1
        self.send_times.append(time.monotonic())
