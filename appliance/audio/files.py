"""Audio files as a session's microphone and speaker, for `converse` and the benchmark.

`WavAudioInput` plays a file into the session in real time (20 ms frames, then silence,
as a live microphone would). `RecordingAudioOutput` is a virtual sound card with an exact
clock: it "plays" the agent's audio in real time onto a timeline that starts at the same
instant as the input, so sample n of the recording and of the input are the same moment.
It follows the AudioOutput contract (playback started/finished, interruption, pause).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np
import soundfile
from livekit import rtc
from livekit.agents.voice import io

from appliance.audio.pcm import FRAME_MS, SESSION_RATE, mono16, resample


class AudioFileError(Exception):
    """The input audio file cannot be used."""


def read_audio(path: str | Path, rate: int = SESSION_RATE) -> np.ndarray:
    """Any readable audio file (any rate, mono or multi-channel) as int16 mono at `rate`."""
    try:
        data, file_rate = soundfile.read(str(path), dtype="float32", always_2d=True)
    except (OSError, RuntimeError, soundfile.LibsndfileError) as exc:
        raise AudioFileError(f"{path}: cannot read audio: {exc}") from None
    if data.size == 0:
        raise AudioFileError(f"{path}: the file has no audio samples")
    mono = data.mean(axis=1)
    pcm = np.clip(mono * 32768.0, -32768, 32767).astype(np.int16)
    return resample(pcm, file_rate, rate)


def write_wav(path: str | Path, pcm: np.ndarray, rate: int) -> None:
    soundfile.write(str(path), pcm, rate, subtype="PCM_16")


class Clock:
    """The shared timeline origin of an input and an output (event-loop time)."""

    def __init__(self) -> None:
        self.origin = asyncio.get_running_loop().time()

    def now(self) -> float:
        return asyncio.get_running_loop().time() - self.origin


class WavAudioInput(io.AudioInput):
    """Feeds int16 mono audio in real time from `start_at` on the clock, then silence; each
    20 ms frame is delivered when its last sample has been "captured"."""

    def __init__(self, pcm: np.ndarray, clock: Clock, *, rate: int = SESSION_RATE) -> None:
        super().__init__(label="wav-input")
        self._pcm = pcm
        self._clock = clock
        self._rate = rate
        self._step = rate * FRAME_MS // 1000
        self._index = 0
        self.start_at: float | None = None
        self.finished = asyncio.Event()

    def start(self) -> None:
        """Begin playing the file now (before that, the microphone hears silence)."""
        self.start_at = self._clock.now()

    def play(self, pcm: np.ndarray) -> None:
        """Play other audio from now on (a dialogue's next turn)."""
        self._pcm = pcm
        self.finished.clear()
        self.start()

    async def __anext__(self) -> rtc.AudioFrame:
        # a frame is delivered at the end of the 20 ms it covers, as a sound card does
        due = (self._index + 1) * FRAME_MS / 1000
        delay = due - self._clock.now()
        if delay > 0:
            await asyncio.sleep(delay)
        elif delay < -0.2:  # detached (nobody read) or stalled: drop what a live mic lost
            self._index = max(0, int(self._clock.now() * 1000 / FRAME_MS) - 1)
        chunk = np.zeros(self._step, np.int16)
        if self.start_at is not None:
            offset = self._index * self._step - int(self.start_at * self._rate)
            if 0 <= offset < len(self._pcm):
                part = self._pcm[offset : offset + self._step]
                chunk[: len(part)] = part
            elif offset >= len(self._pcm):
                self.finished.set()
        self._index += 1
        return rtc.AudioFrame(chunk.tobytes(), self._rate, 1, self._step)


class RecordingAudioOutput(io.AudioOutput):
    """A virtual sound card that records what it plays on the shared clock's timeline."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(
            label="recording-output", capabilities=io.AudioOutputCapabilities(pause=True)
        )
        self._clock = clock
        self.rate: int | None = None
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start sample, audio), in order
        self._tail = 0  # sample where scheduled audio ends
        self._segment_start: int | None = None
        self._flushed = False
        self._paused_at: int | None = None
        self._held: list[np.ndarray] = []
        self._finish_timer: asyncio.TimerHandle | None = None
        self.segments: list[dict[str, float | bool]] = []
        self.stops: list[float] = []  # timeline seconds where playback paused or was cut

    @property
    def playing(self) -> bool:
        """Whether a segment is being played (or is paused) right now."""
        return self._segment_start is not None

    def _now(self) -> int:
        assert self.rate is not None
        return int(self._clock.now() * self.rate)

    async def capture_frame(self, frame: rtc.AudioFrame) -> None:
        await super().capture_frame(frame)
        pcm = mono16(frame)
        if self.rate is None:
            self.rate = frame.sample_rate
        elif frame.sample_rate != self.rate:
            pcm = resample(pcm, frame.sample_rate, self.rate)
        if self._paused_at is not None:
            self._held.append(pcm)
            return
        if self._segment_start is None:
            start = max(self._now(), self._tail)
            self._segment_start, self._tail, self._flushed = start, start, False
            delay = (start - self._now()) / self.rate
            started = time.time() + max(delay, 0.0)
            loop = asyncio.get_running_loop()
            loop.call_later(max(delay, 0.0), lambda: self.on_playback_started(created_at=started))
        self._chunks.append((self._tail, pcm))
        self._tail += len(pcm)

    def flush(self) -> None:
        super().flush()
        if self._segment_start is None:
            return
        self._flushed = True
        self._arm_finish()

    def _arm_finish(self) -> None:
        if self._finish_timer is not None:
            self._finish_timer.cancel()
        if self._paused_at is not None or not self._flushed or self.rate is None:
            return
        delay = max(0.0, (self._tail - self._now()) / self.rate)
        self._finish_timer = asyncio.get_running_loop().call_later(delay, self._finish, False)

    def _truncate(self, at: int) -> None:
        """Drop scheduled audio from sample `at` on (it was never played)."""
        kept = []
        for start, pcm in self._chunks:
            if start >= at:
                continue
            kept.append((start, pcm[: at - start] if start + len(pcm) > at else pcm))
        self._chunks = kept
        self._tail = min(self._tail, at)

    def _finish(self, interrupted: bool) -> None:
        if self._segment_start is None or self.rate is None:
            return
        if self._finish_timer is not None:
            self._finish_timer.cancel()
            self._finish_timer = None
        end = min(self._now(), self._tail) if interrupted else self._tail
        if interrupted:
            if self._paused_at is None:
                self.stops.append(end / self.rate)
            self._truncate(max(end, self._segment_start))
        position = max(0, end - self._segment_start) / self.rate
        self.segments.append(
            {
                "start": self._segment_start / self.rate,
                "played": position,
                "interrupted": interrupted,
            }
        )
        self._segment_start, self._paused_at, self._held = None, None, []
        self.on_playback_finished(playback_position=position, interrupted=interrupted)

    def clear_buffer(self) -> None:
        self._finish(interrupted=True)

    def pause(self) -> None:
        if self._segment_start is None or self._paused_at is not None or self.rate is None:
            return
        self._paused_at = min(self._now(), self._tail)
        self.stops.append(self._paused_at / self.rate)
        cut = [
            pcm[max(0, self._paused_at - s) :]
            for s, pcm in self._chunks
            if s + len(pcm) > self._paused_at
        ]
        self._truncate(self._paused_at)
        self._held = cut + self._held
        if self._finish_timer is not None:
            self._finish_timer.cancel()

    def resume(self) -> None:
        if self._paused_at is None:
            return
        self._paused_at = None
        self._tail = max(self._now(), self._tail)
        for pcm in self._held:
            self._chunks.append((self._tail, pcm))
            self._tail += len(pcm)
        self._held = []
        self._arm_finish()

    def recording(self, until: float | None = None) -> np.ndarray:
        """The timeline so far (silence where nothing played), as int16."""
        rate = self.rate or SESSION_RATE
        end = max([s + len(p) for s, p in self._chunks] + [int((until or 0) * rate)])
        out = np.zeros(end, np.int16)
        for start, pcm in self._chunks:
            out[start : start + len(pcm)] = pcm
        return out
