"""Live audio for the bridges: a microphone that delivers frames as they come, and an
AudioOutput that a sink drains in fixed blocks.

`LiveInput`: frames reach the session only while it listens (attached); what arrives
while it does not is dropped, as a live microphone's audio is lost, and a stalled reader
loses the oldest frames, not the newest. Used by the USB microphone and a phone call.

`Playout`: drained by the USB speaker's device thread or a phone call's RTP clock. It
follows livekit's AudioOutput contract (DESIGN.md section 5).

The session's frames are converted to the sink's rate and queued per segment (one reply);
each segment's resampling ends with it, so its last samples play with it.
The sink calls `take()` for each block it plays, silence when there is nothing to play or
when paused, and then `taken()`. `on_playback_started` fires when a segment's first
sample has been taken (plus `latency_s`, the sink's own delay); `on_playback_finished`
once per segment, with the position really played; `clear_buffer` drops the rest of the
segment at once. After a segment a `padding_s` pause lets its last syllable out.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from livekit import rtc
from livekit.agents.voice import io

from appliance.audio.pcm import mono16


class Upsampler2x:
    """Streaming 2x upsampling (8 -> 16 kHz) with a windowed-sinc FIR, sample by sample.

    soxr (livekit's `AudioResampler`, every quality but "quick") works in chunks: 8 ->
    16 kHz comes out in 108 ms bursts (measured), so a phone caller's end of speech reached
    the VAD up to 108 ms late; "quick" (cubic) passes each packet at once but misheard one
    question in 12 where this did not. Here each packet comes out whole, 1.5 ms late.
    """

    TAPS = 48  # 24 per output phase; Kaiser beta 8: images below -60 dB

    def __init__(self) -> None:
        t = np.arange(self.TAPS) - (self.TAPS - 1) / 2
        h = np.sinc(t / 2) * np.kaiser(self.TAPS, 8.0)
        h *= 2 / h.sum()
        self._phases = (h[0::2].astype(np.float32), h[1::2].astype(np.float32))
        self._history = np.zeros(self.TAPS // 2 - 1, np.float32)

    def push(self, pcm: np.ndarray) -> np.ndarray:
        x = np.concatenate([self._history, pcm.astype(np.float32)])
        self._history = x[len(x) - len(self._history) :]
        out = np.empty(2 * len(pcm), np.float32)
        out[0::2] = np.convolve(x, self._phases[0], "valid")
        out[1::2] = np.convolve(x, self._phases[1], "valid")
        return np.clip(np.round(out), -32768, 32767).astype(np.int16)


class Rechunker:
    """Streaming resampler to a fixed rate, re-cut into fixed-size int16 blocks."""

    def __init__(self, src: int, dst: int, block: int) -> None:
        self._upsampler = Upsampler2x() if dst == 2 * src else None
        self._resampler = (
            rtc.AudioResampler(src, dst) if src != dst and self._upsampler is None else None
        )
        self._dst, self._block = dst, block
        self._pending: np.ndarray = np.zeros(0, np.int16)

    def push(self, pcm: np.ndarray, src: int) -> list[np.ndarray]:
        if self._upsampler is not None:
            pcm = self._upsampler.push(pcm)
        elif self._resampler is not None:
            frame = rtc.AudioFrame(pcm.astype(np.int16).tobytes(), src, 1, len(pcm))
            parts = [mono16(f) for f in self._resampler.push(frame)]
            pcm = np.concatenate(parts) if parts else np.zeros(0, np.int16)
        self._pending = np.concatenate([self._pending, pcm]).astype(np.int16)
        if self._block <= 0:  # no re-cutting: everything resampled so far
            out, self._pending = self._pending, np.zeros(0, np.int16)
            return [out] if len(out) else []
        n = len(self._pending) // self._block
        blocks = [self._pending[i * self._block : (i + 1) * self._block] for i in range(n)]
        self._pending = self._pending[n * self._block :]
        return blocks

    def flush(self) -> np.ndarray:
        """The end of the stream: everything still inside, at `dst` (the last partial block
        too). The resampler holds back up to 80 ms (soxr works in chunks: 22.05 -> 8 kHz,
        measured); a new stream starts clean."""
        held = [mono16(f) for f in self._resampler.flush()] if self._resampler is not None else []
        out = np.concatenate([self._pending, *held]).astype(np.int16)
        self._pending = np.zeros(0, np.int16)
        return out


class LiveInput(io.AudioInput):
    """A live source's frames for the session (call `deliver` on the event loop)."""

    def __init__(self, label: str, *, queue_frames: int = 50) -> None:
        super().__init__(label=label)
        self._queue: asyncio.Queue[tuple[rtc.AudioFrame, float]] = asyncio.Queue(
            maxsize=queue_frames
        )
        self.attached = False  # frames reach the session only while it listens
        self._diverted_to: Callable[[rtc.AudioFrame], None] | None = None
        # seconds from capture to the session taking the frame, last 1000 frames
        self.handoff_s: deque[float] = deque(maxlen=1000)

    def divert(self, to: Callable[[rtc.AudioFrame], None] | None) -> None:
        """Send the frames to `to` instead of the session (while the conversation is in a
        LiveKit room, the room hears this source); None gives them back to the session."""
        self._diverted_to = to

    @property
    def diverted(self) -> bool:
        return self._diverted_to is not None

    def on_attached(self) -> None:
        self.attached = True

    def on_detached(self) -> None:
        """The session stopped listening (closed, or its audio input disabled): drop audio."""
        self.attached = False
        while not self._queue.empty():
            self._queue.get_nowait()

    def deliver(self, frame: rtc.AudioFrame, captured_at: float | None = None) -> bool:
        """Queue a frame for the session; False if nobody listens (it is dropped)."""
        diverted_to = self._diverted_to
        if diverted_to is not None:
            diverted_to(frame)
            return False
        if not self.attached:
            return False
        if self._queue.full():  # the reader stalled: keep the newest audio
            self._queue.get_nowait()
        self._queue.put_nowait((frame, time.monotonic() if captured_at is None else captured_at))
        return True

    async def __anext__(self) -> rtc.AudioFrame:
        frame, captured_at = await self._queue.get()
        self.handoff_s.append(time.monotonic() - captured_at)
        return frame


@dataclass
class _Segment:
    id: int
    queued: int = 0  # samples handed to the sink, at its rate
    written: int = 0  # samples the sink has taken
    flushed: bool = False
    started: bool = False
    done: bool = False


Touched = list[tuple[_Segment, bool]]  # segments a block came from; True: its first block


class Playout(io.AudioOutput):
    """Segments queued on the event loop, drained by a sink in blocks (thread-safe)."""

    def __init__(self, label: str, *, padding_s: float = 0.1) -> None:
        super().__init__(label=label, capabilities=io.AudioOutputCapabilities(pause=True))
        self._loop = asyncio.get_running_loop()
        self._padding_s = padding_s
        self._lock = threading.Lock()
        self._queue: deque[tuple[_Segment, np.ndarray]] = deque()
        self._paused = False
        self._segment: _Segment | None = None
        self._next_id = 0
        self._resampler: Rechunker | None = None
        self._src_rate = 0
        self.latency_s = 0.0  # from a block being taken to it being heard
        self.segments: list[dict[str, float | bool]] = []
        self.samples_taken = 0  # reply samples the sink has taken, at its rate
        self._diverted_from: Callable[[int], np.ndarray] | None = None

    def divert(self, source: Callable[[int], np.ndarray] | None) -> None:
        """Play `source(n)` instead of the session's replies (while the conversation is in a
        LiveKit room, the room's mix); None gives the sink back to the session."""
        self._diverted_from = source

    # -- what a sink defines --

    def sink_rate(self) -> int:
        """The sink's sample rate (0 while there is no sink)."""
        raise NotImplementedError

    def sink_ready(self) -> bool:
        """Whether audio can be played now (a device that is gone plays nothing)."""
        return self.sink_rate() > 0

    @property
    def playing(self) -> bool:
        return self._segment is not None

    # -- event-loop side --

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        if self._segment is None:
            self._segment = _Segment(self._next_id)
            self._next_id += 1
        segment = self._segment
        rate = self.sink_rate()
        if not self.sink_ready():
            return  # no sink: nothing is queued; flush reports it as not played
        if self._resampler is None or self._src_rate != frame.sample_rate:
            self._resampler = Rechunker(frame.sample_rate, rate, 0)
            self._src_rate = frame.sample_rate
        pcm = mono16(frame)
        if frame.sample_rate != rate:
            blocks = self._resampler.push(pcm, frame.sample_rate)
            pcm = np.concatenate(blocks) if blocks else np.zeros(0, np.int16)
        self._enqueue(segment, pcm)

    def _enqueue(self, segment: _Segment, pcm: np.ndarray) -> None:
        with self._lock:
            self._queue.append((segment, pcm))
            segment.queued += len(pcm)

    def flush(self) -> None:
        super().flush()
        segment = self._segment
        if segment is None:
            return
        if self._resampler is not None:  # the reply's last samples play now, not before the next
            tail = self._resampler.flush()
            self._resampler = None
            if len(tail) and self.sink_ready():
                self._enqueue(segment, tail)
        segment.flushed = True
        if segment.queued == 0 or not self.sink_ready():
            self._start(segment)  # nothing to play (or no sink): report it at once
            self._finish(segment, interrupted=not self.sink_ready())
        else:
            self._check_drained(segment)

    def clear_buffer(self) -> None:
        self._resampler = None  # what it holds belongs to the reply being cut off
        if self._segment is not None:
            self._finish(self._segment, interrupted=True)

    def pause(self) -> None:
        with self._lock:
            self._paused = True

    def resume(self) -> None:
        with self._lock:
            self._paused = False

    def lost(self) -> None:
        """The sink went away: the segment ends as interrupted (nothing waits for it)."""
        if self._segment is not None:
            self._finish(self._segment, interrupted=True)

    def _position(self, segment: _Segment) -> float:
        rate = self.sink_rate() or 1
        return max(0.0, segment.written / rate - self.latency_s)

    def _start(self, segment: _Segment) -> None:
        if not segment.started and not segment.done:
            segment.started = True
            self.on_playback_started(created_at=time.time())

    def _check_drained(self, segment: _Segment) -> None:
        if segment.flushed and segment.written >= segment.queued and not segment.done:
            # the last samples are in the sink: finish when they have left it
            self._loop.call_later(self.latency_s + self._padding_s, self._finish, segment, False)

    def _finish(self, segment: _Segment, interrupted: bool) -> None:
        if segment.done:
            return
        with self._lock:
            if interrupted:
                self._queue = deque((s, p) for s, p in self._queue if s is not segment)
            position = (
                self._position(segment)
                if interrupted
                else segment.written / (self.sink_rate() or 1)
            )
        if not segment.started:
            self._start(segment)
        segment.done = True
        if self._segment is segment:
            self._segment = None
        self.segments.append({"played": position, "interrupted": interrupted})
        self.on_playback_finished(playback_position=position, interrupted=interrupted)

    def _start_later(self, segment: _Segment) -> None:
        self._loop.call_later(self.latency_s, self._start, segment)

    # -- sink side (any thread) --

    def take(self, step: int) -> tuple[np.ndarray, Touched]:
        """The next block of `step` samples (silence when idle or paused)."""
        source = self._diverted_from
        if source is not None:
            return source(step), []
        with self._lock:
            if self._paused or not self._queue:
                return np.zeros(step, np.int16), []
            out = np.zeros(step, np.int16)
            filled = 0
            touched: Touched = []
            while filled < step and self._queue:
                segment, pcm = self._queue[0]
                n = min(step - filled, len(pcm))
                out[filled : filled + n] = pcm[:n]
                if not touched or touched[-1][0] is not segment:
                    touched.append((segment, segment.written == 0))
                segment.written += n
                self.samples_taken += n
                filled += n
                if n == len(pcm):
                    self._queue.popleft()
                else:
                    self._queue[0] = (segment, pcm[n:])
            return out, touched

    def taken(self, touched: Touched) -> None:
        """After the sink played a block: report starts and drained segments (thread-safe)."""
        for segment, first in touched:
            if first:
                self._loop.call_soon_threadsafe(self._start_later, segment)
            self._loop.call_soon_threadsafe(self._check_drained, segment)
