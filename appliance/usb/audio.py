"""USB audio bridge for kiosks: a livekit AudioInput/AudioOutput pair over PyAudio (PortAudio).

Capture and playback each run on their own thread with blocking PortAudio streams; the
microphone hands 20 ms frames to the event loop with `call_soon_threadsafe`. The capture path runs
WebRTC's audio processing (echo cancellation fed with what the speaker really played,
noise suppression, high-pass, gain control) at 16 kHz before the session hears it.

Devices are opened by name (an ALSA PCM such as `voice_in`, or part of a card's name), at
the first rate they accept; audio is converted to and from what the session uses. When a
device disappears (unplugged, audio server gone), or PortAudio cannot list the devices
(an ALSA config that would abort the process, caught by a child first: see `portaudio`), its
thread logs one message, keeps retrying every half second and resumes when it is back; the
session and the rest of the daemon keep running. While the speaker is gone, replies are
reported as not played.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from livekit import rtc

from appliance.audio import processing
from appliance.audio.live import LiveInput, Playout, Rechunker
from appliance.audio.pcm import SESSION_RATE
from appliance.audio.processing import AudioProcessor
from appliance.usb import portaudio
from appliance.usb.portaudio import (
    PA_LOCK,
    AudioDeviceError,
    find_device,
    list_devices,
    load_pyaudio,
)

if TYPE_CHECKING:
    import pyaudio

    from appliance.config import AudioConfig

logger = logging.getLogger("appliance.usbaudio")


FRAME_MS = 10
# frames handed to the session: every frame costs the session's Python pipeline the same,
# so 20 ms frames (as RTP's) take about 1.5 % of a core less than 10 ms ones while idle
SESSION_FRAME_MS = 20
RATES = (48000, 16000, 44100, 32000, 22050, 8000)  # tried in this order when rate = 0
RETRY_S = 0.5
AHEAD_S = 0.2  # a device that runs ahead of the wall clock by more is paced (ALSA file PCMs)


class Pacer:
    """Keeps a device thread from running ahead of the wall clock (file-backed PCMs)."""

    def __init__(self, rate: int) -> None:
        self._rate, self._t0, self._samples = rate, time.monotonic(), 0

    def advance(self, samples: int) -> None:
        self._samples += samples
        ahead = self._samples / self._rate - (time.monotonic() - self._t0)
        if ahead > AHEAD_S:
            time.sleep(ahead - AHEAD_S / 2)


class _DeviceThread:
    """One direction's device: open by name, run, and reopen after the device is lost."""

    def __init__(
        self,
        name: str,
        direction: str,
        rate: int,
        what: str,
        serve: Callable[[Any], None],
        on_lost: Callable[[], object] = lambda: None,
        *,
        priority: int = 0,
    ) -> None:
        self.name, self.direction, self.what = name, direction, what
        self.serve, self.on_lost = serve, on_lost
        self.priority = priority
        self.requested_rate = rate
        self.rate = 0
        self.running = False
        self.connected = threading.Event()
        self._thread: threading.Thread | None = None
        self._lost_logged = False

    def start(self) -> None:
        self.running = True
        self._thread = threading.Thread(target=self._run, name=f"audio-{self.what}", daemon=True)
        self._thread.start()

    @property
    def native_id(self) -> int | None:
        """The thread's id as the OS knows it (for per-thread CPU figures)."""
        return self._thread.native_id if self._thread is not None else None

    def stop(self) -> None:
        self.running = False
        if self._thread is not None:
            self._thread.join(timeout=2.0)

    def _open(self, pa: pyaudio.PyAudio) -> Any:
        pyaudio = load_pyaudio()
        device = find_device(list_devices(pa), self.name, self.direction)
        rates = [self.requested_rate] if self.requested_rate else list(RATES)
        last: Exception | None = None
        for rate in rates:
            try:
                stream = pa.open(
                    format=pyaudio.paInt16,
                    channels=1,
                    rate=rate,
                    input=self.direction == "inputs",
                    output=self.direction == "outputs",
                    input_device_index=device["index"] if self.direction == "inputs" else None,
                    output_device_index=device["index"] if self.direction == "outputs" else None,
                    frames_per_buffer=rate * FRAME_MS // 1000,
                )
            except (OSError, ValueError) as exc:
                last = exc
                continue
            self.rate = rate
            return stream
        raise AudioDeviceError(f"{self.what} {device['name']!r}: no usable rate ({last})")

    def _raise_priority(self) -> None:
        """Run this thread SCHED_FIFO at `priority` (needs RLIMIT_RTPRIO, as the unit sets).

        The PortAudio probes it starts run at normal priority (SCHED_RESET_ON_FORK).
        """
        if self.priority <= 0:
            return
        policy = os.SCHED_FIFO | os.SCHED_RESET_ON_FORK
        try:
            os.sched_setscheduler(0, policy, os.sched_param(self.priority))
        except OSError as exc:
            logger.info(
                "audio %s thread: real-time priority %d not permitted (%s); normal priority",
                self.what,
                self.priority,
                exc.strerror,
            )
        else:
            logger.debug("audio %s thread: SCHED_FIFO priority %d", self.what, self.priority)

    def _run(self) -> None:
        self._raise_priority()
        while self.running:
            try:
                self._connect()
            except (OSError, AudioDeviceError) as exc:
                if not self._lost_logged:
                    logger.error(
                        "audio %s %r unavailable: %s; retrying every %.1f s",
                        self.what,
                        self.name,
                        exc,
                        RETRY_S,
                    )
                    self._lost_logged = True
                    self.on_lost()
            if self.running:
                time.sleep(RETRY_S)

    def _connect(self) -> None:
        """Initialise PortAudio (re-enumerating the devices), open the device and serve it."""
        portaudio.require(max_age=RETRY_S)  # a child shows first that it cannot abort us
        pyaudio = load_pyaudio()
        with PA_LOCK:
            pa = pyaudio.PyAudio()
        stream = None
        try:
            with PA_LOCK:
                stream = self._open(pa)
            if self._lost_logged:
                logger.warning("audio %s %r is back (%d Hz)", self.what, self.name, self.rate)
            else:
                logger.info("audio %s %r open at %d Hz", self.what, self.name, self.rate)
            self._lost_logged = False
            self.connected.set()
            self.serve(stream)
        finally:
            self.connected.clear()
            with PA_LOCK:
                if stream is not None:
                    with contextlib.suppress(OSError):
                        stream.close()
                pa.terminate()


class UsbMicrophone(LiveInput):
    """The session's microphone: 20 ms frames at 16 kHz, echo-cancelled in 10 ms blocks."""

    def __init__(self, cfg: AudioConfig, echo: AudioProcessor) -> None:
        super().__init__(f"usb-in:{cfg.input}")
        self._loop = asyncio.get_running_loop()
        self._echo = echo
        self.device = _DeviceThread(
            cfg.input,
            "inputs",
            cfg.input_rate,
            "input",
            self._serve,
            priority=cfg.realtime_priority,
        )
        self.frames = 0  # captured from the device
        self.latency_s = 0.0  # the device's input latency, as PortAudio reports it

    def start(self) -> None:
        self.device.start()

    def _serve(self, stream: Any) -> None:
        rate = self.device.rate
        block = SESSION_RATE * FRAME_MS // 1000
        chunker = Rechunker(rate, SESSION_RATE, block)
        pacer = Pacer(rate)
        step = rate * FRAME_MS // 1000
        self.latency_s = float(stream.get_input_latency())
        pending: list[np.ndarray] = []  # echo-cancelled 10 ms blocks not yet handed on
        while self.device.running:
            data = stream.read(step, exception_on_overflow=False)
            read_at = time.monotonic()
            pcm = np.frombuffer(data, np.int16)
            pacer.advance(len(pcm))
            for piece in chunker.push(pcm, rate):
                pending.append(self._echo.process(piece, SESSION_RATE))
                if len(pending) * FRAME_MS < SESSION_FRAME_MS:
                    continue
                cleaned = np.concatenate(pending)
                pending = []
                frame = rtc.AudioFrame(cleaned.tobytes(), SESSION_RATE, 1, len(cleaned))
                self._loop.call_soon_threadsafe(self._deliver, frame, read_at)

    def _deliver(self, frame: rtc.AudioFrame, read_at: float) -> None:
        self.frames += 1
        self.deliver(frame, read_at)

    def close(self) -> None:
        self.device.stop()


class UsbSpeaker(Playout):
    """The session's speaker: a Playout drained by the output device's thread.

    Playback starts when the segment's first sample is taken by the device, plus its
    output latency. Between replies the device plays silence, so the stream (and the echo
    canceller's reference) never stops. While the speaker is gone nothing is queued and
    a reply ends as interrupted.
    """

    def __init__(self, cfg: AudioConfig, echo: AudioProcessor) -> None:
        super().__init__(f"usb-out:{cfg.output}", padding_s=cfg.playback_padding_ms / 1000)
        self._echo = echo
        self.device = _DeviceThread(
            cfg.output,
            "outputs",
            cfg.output_rate,
            "output",
            self._serve,
            lambda: self._loop.call_soon_threadsafe(self.lost),
            priority=cfg.realtime_priority,
        )

    def start(self) -> None:
        self.device.start()

    def close(self) -> None:
        self.device.stop()

    def sink_rate(self) -> int:
        return self.device.rate

    def sink_ready(self) -> bool:
        return self.device.connected.is_set() and self.device.rate > 0

    def _serve(self, stream: Any) -> None:
        """The device thread: write blocks (silence between replies), feed the AEC."""
        rate = self.device.rate
        step = rate * FRAME_MS // 1000
        self.latency_s = float(stream.get_output_latency())
        to_echo = Rechunker(rate, SESSION_RATE, SESSION_RATE * FRAME_MS // 1000)
        pacer = Pacer(rate)
        while self.device.running:
            block, touched = self.take(step)
            stream.write(block.tobytes(), step)
            pacer.advance(step)
            for reference in to_echo.push(block, rate):
                self._echo.played(reference, SESSION_RATE)
            self.taken(touched)


class UsbAudio:
    """The kiosk's sound card: microphone and speaker sharing one echo canceller."""

    def __init__(self, cfg: AudioConfig) -> None:
        self.config = cfg
        self.echo = AudioProcessor(processing.kiosk(cfg))
        self.microphone = UsbMicrophone(cfg, self.echo)
        self.speaker = UsbSpeaker(cfg, self.echo)

    def start(self) -> None:
        self.speaker.start()
        self.microphone.start()

    async def wait_connected(self, timeout: float) -> bool:
        """Wait until both devices are open (False if not within `timeout`)."""
        waiter: Callable[[], bool] = lambda: (  # noqa: E731
            self.microphone.device.connected.is_set() and self.speaker.device.connected.is_set()
        )
        deadline = time.monotonic() + timeout
        while not waiter():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.05)
        return True

    def close(self) -> None:
        self.microphone.close()
        self.speaker.close()
