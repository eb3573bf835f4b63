"""Local end-of-turn detection with pipecat's smart-turn v3.2 audio model (ONNX, BSD-2).

`SmartTurnDetector` is a livekit-agents *streaming audio* turn detector, a drop-in for
``inference.TurnDetector(version="v1-mini")``: pass it as ``turn_detection=`` to an
AgentSession (which also needs a VAD with ``min_silence_duration >= 0.25`` s). Each stream
keeps the last 8 s of 16 kHz audio since its last flush; when the session asks for a
prediction (after 200 ms of VAD silence) the model runs on an executor, never on the loop.

Given the session's `SharedVAD`, a stream starts the model at the first sign of a pause
instead (a VAD window below `EARLY_BELOW`, about 70 ms after the last word, before
Whisper's preflight at the first quiet window), and answers the session's request with
that result if no speech came in between and it says the turn is complete: the model then
runs while the CPU waits for the VAD, not beside Whisper, the LLM or the reply's first
audio. A "not complete" early verdict is checked again on the whole pause when the session
asks, as without the head start.

The model reads 8 s of audio as a Whisper log-mel spectrogram (80 x 800) and outputs
P(turn complete); the session treats a probability below 0.5 as "the user is not done".
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import numpy as np
from livekit import rtc
from livekit.agents import vad
from livekit.agents.inference.eot.base import TurnDetectorOptions
from livekit.agents.inference.eot.languages import ThresholdOptions, TurnDetectorModels
from livekit.agents.metrics import EOTInferenceMetrics
from livekit.agents.metrics.base import Metadata
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from appliance.observe import trace
from appliance.plugins import compat
from appliance.plugins.compat import BaseStreamingTurnDetector, BaseStreamingTurnDetectorStream
from appliance.plugins.smart_turn.engine import (
    MODEL_NAME,
    PROVIDER,
    SAMPLE_RATE,
    UNLIKELY_THRESHOLD,
    WINDOW_SAMPLES,
    WINDOW_SECONDS,
    SmartTurnModel,
)
from appliance.plugins.turn_text import TurnText, decide, settle

if TYPE_CHECKING:
    from numpy.typing import NDArray

    from appliance.plugins.shared_vad import SharedVAD

logger = logging.getLogger("appliance.turn")

EARLY_BELOW = 0.9
"""Silero's speech probability under which a window after speech starts the early
prediction (at or above: speech, which drops it). Silero falls below 0.9 30-50 ms before
it falls below its 0.5 threshold; the model running in that gap gained 22-33 ms of
voice-to-voice p50 on the 2-core bench machine (bench/README.md, commit f4cdff1)."""
_MAX_DRAIN_YIELDS = 20
_FAILURE_PROBABILITY = 1.0  # a failed prediction commits after the min endpointing delay


@dataclass
class WordsJudge:
    """The words' part of a decision: the session's `TurnText` and how far it may overrule
    the audio model (`turn_text.decide`)."""

    text: TurnText
    unfinished_below: float
    finished_above: float
    timeout: float = 0.5
    unsure_wait: float = 1.0
    """Seconds after the request to wait when the audio model and the words disagree or
    the words are unsure, before `settle` decides (with the words heard by then)."""

    def decide(self, audio: float, text: float | None) -> float | None:
        return decide(audio, text, self.unfinished_below, self.finished_above, UNLIKELY_THRESHOLD)

    def settle(self, audio: float, text: float | None) -> float:
        return settle(audio, text, self.unfinished_below, UNLIKELY_THRESHOLD)


class _SmartTurnTransport:
    """Local transport: buffers 16 kHz audio and runs `SmartTurnModel` off the event loop.

    With a `SharedVAD`, the first VAD window below `EARLY_BELOW` after speech starts an
    early prediction on the audio so far; the session's next request takes its result
    unless the user spoke again (or the stream was flushed) in between, or it was below
    the threshold.
    """

    def __init__(
        self,
        *,
        model: SmartTurnModel,
        detector: SmartTurnDetector,
        executor: concurrent.futures.Executor | None,
        vad: SharedVAD | None = None,
        words: WordsJudge | None = None,
    ) -> None:
        self._model = model
        self._words = words
        self._detector_ref = weakref.ref(detector)
        self._executor = executor
        self._vad = vad
        self._buf = np.zeros(2 * WINDOW_SAMPLES, dtype=np.int16)
        self._len = 0
        self._stream_ref: weakref.ref[BaseStreamingTurnDetectorStream] | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._warned_failure = False
        self._heard_speech = False
        self._early: asyncio.Task[float | None] | None = None  # valid while set
        self._generation = 0  # counts speech and flushes: what an early prediction outlives

    @property
    def session_id(self) -> str | None:
        return None

    def attach(self, stream: BaseStreamingTurnDetectorStream) -> None:
        self._stream_ref = weakref.ref(stream)
        if self._vad is not None and self._on_vad_event not in self._vad.listeners:
            self._vad.listeners.append(self._on_vad_event)

    def detach(self) -> None:
        if self._vad is not None and self._on_vad_event in self._vad.listeners:
            self._vad.listeners.remove(self._on_vad_event)
        self._drop_early()
        for task in list(self._tasks):
            task.cancel()
        self._tasks.clear()

    async def run(self) -> None:
        stream = self._stream()
        if stream is not None:
            await compat.drain_audio(stream)

    def push_frame(self, frame: rtc.AudioFrame) -> None:
        n = frame.samples_per_channel
        if n == 0:
            return
        pcm = np.frombuffer(frame.data, dtype=np.int16, count=n * frame.num_channels)
        if frame.num_channels > 1:
            pcm = pcm.reshape(-1, frame.num_channels).mean(axis=1).astype(np.int16)
        pcm = pcm[-WINDOW_SAMPLES:]
        n = len(pcm)
        if self._len + n > len(self._buf):  # keep only the newest window, then append
            keep = min(self._len, WINDOW_SAMPLES - n)
            self._buf[:keep] = self._buf[self._len - keep : self._len]
            self._len = keep
        self._buf[self._len : self._len + n] = pcm
        self._len += n

    def flush(self) -> None:
        self._len = 0
        self._drop_early()  # a new turn: an early result belongs to the last one

    def _drop_early(self) -> None:
        self._early = None
        self._generation += 1

    def buffered(self) -> NDArray[np.int16]:
        """A copy of the audio a prediction would see now (at most 8 s)."""
        return self._buf[max(0, self._len - WINDOW_SAMPLES) : self._len].copy()

    def _on_vad_event(self, event: vad.VADEvent) -> None:
        """Speech drops an early prediction; the first window after it below `EARLY_BELOW`
        starts one."""
        speech = event.type == vad.VADEventType.START_OF_SPEECH or (
            event.type == vad.VADEventType.INFERENCE_DONE and event.probability >= EARLY_BELOW
        )
        if speech:
            self._heard_speech = True
            self._drop_early()
        elif (
            event.type == vad.VADEventType.INFERENCE_DONE
            and self._heard_speech
            and self._stream() is not None
        ):
            self._heard_speech = False
            generation = self._generation
            early = asyncio.ensure_future(self._infer(lambda: self._generation == generation))
            self._early = early
            self._tasks.add(early)
            early.add_done_callback(self._tasks.discard)

    def run_inference(self, request_id: str) -> None:
        early, self._early = self._early, None  # one request per early prediction
        task = asyncio.create_task(self._predict(request_id, time.monotonic(), early))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _stream(self) -> BaseStreamingTurnDetectorStream | None:
        return self._stream_ref() if self._stream_ref is not None else None

    def _is_current(self, request_id: str) -> bool:
        stream = self._stream()
        return stream is not None and compat.request_id(stream) == request_id

    async def _infer(self, wanted: Callable[[], bool]) -> float | None:
        """P(turn complete) for the audio buffered now, or None when no longer `wanted`
        by the time the executor gets to it (superseded while queued: the model is skipped)."""
        # Audio pushed just before this may still sit in the stream's channel: let the
        # drain task (which empties it without yielding) catch up before taking the snapshot.
        for _ in range(_MAX_DRAIN_YIELDS):
            stream = self._stream()
            if stream is None or not compat.audio_pending(stream):
                break
            await asyncio.sleep(0)
        pcm = self.buffered()

        def blocking() -> float | None:
            return self._model.predict(pcm) if wanted() else None

        try:
            if self._executor is not None:
                return await asyncio.get_running_loop().run_in_executor(self._executor, blocking)
            return await asyncio.to_thread(blocking)
        except Exception:
            if not self._warned_failure:
                logger.exception("smart-turn prediction failed; committing turns on VAD alone")
                self._warned_failure = True
            return _FAILURE_PROBABILITY

    async def _predict(
        self, request_id: str, requested_at: float, early: asyncio.Task[float | None] | None
    ) -> None:
        t0 = time.monotonic()
        # the words' judgement runs beside the audio model (on the LLM's worker)
        words = (
            asyncio.ensure_future(self._words.text.probability(self._words.timeout))
            if self._words is not None
            else None
        )
        prob = await early if early is not None else None
        # no early prediction, it was dropped before it ran, or it said "not done": ask
        # again now, on the audio with the whole pause (a user held up by an early verdict
        # would wait the max endpointing delay for nothing)
        if prob is None or prob < UNLIKELY_THRESHOLD:
            t0 = time.monotonic()
            prob = await self._infer(lambda: self._is_current(request_id))
        if prob is None:
            if words is not None:
                words.cancel()
            return
        audio_prob, text_prob, text, waited = prob, None, None, False
        if words is not None and self._words is not None:
            text_prob, text = await words, self._words.text.text
            decided = self._words.decide(prob, text_prob)
            if decided is None:
                # the audio and the words disagree, or the words are unsure: rather than
                # the max endpointing delay, wait a little, then settle on both
                later = await self._unsure(request_id, requested_at, prob)
                if later is None:
                    return
                decided, text_prob, text = *later, self._words.text.text
                waited = True
            prob = decided
            logger.debug(
                "end of turn: audio %.3f, words %s -> %.3f%s (%r)",
                audio_prob,
                "none" if text_prob is None else f"{text_prob:.3g}",
                prob,
                " after a wait" if waited else "",
                text,
            )
        trace.decision(audio=audio_prob, words=text_prob, decided=prob, text=text, waited=waited)
        now = time.monotonic()
        inference_duration, delay = now - t0, now - requested_at

        stream = self._stream()
        if stream is None:
            return
        compat.resolve_prediction(
            stream, request_id, prob, inference_duration=inference_duration, detection_delay=delay
        )
        detector = self._detector_ref()
        if detector is not None:
            detector.emit(
                "metrics_collected",
                EOTInferenceMetrics(
                    timestamp=time.time(),
                    total_duration=delay,
                    prediction_duration=inference_duration,
                    detection_delay=delay,
                    num_requests=1,
                    metadata=Metadata(model_name=MODEL_NAME, model_provider=PROVIDER),
                ),
            )

    async def _unsure(
        self, request_id: str, requested_at: float, audio: float
    ) -> tuple[float, float | None] | None:
        """The settled decision `unsure_wait` s after the request, and the words'
        probability then; None when the request was superseded (the user spoke)."""
        assert self._words is not None
        await asyncio.sleep(max(0.0, requested_at + self._words.unsure_wait - time.monotonic()))
        if not self._is_current(request_id):
            return None
        text_prob = await self._words.text.probability(self._words.timeout)
        if not self._is_current(request_id):
            return None
        return self._words.settle(audio, text_prob), text_prob


class SmartTurnStream(BaseStreamingTurnDetectorStream):
    """One session's audio stream into the detector. Create inside the running event loop."""

    def __init__(
        self,
        *,
        detector: SmartTurnDetector,
        opts: TurnDetectorOptions,
        model: SmartTurnModel,
        executor: concurrent.futures.Executor | None,
        vad: SharedVAD | None = None,
        words: WordsJudge | None = None,
    ) -> None:
        self._smart_transport = _SmartTurnTransport(
            model=model, detector=detector, executor=executor, vad=vad, words=words
        )
        super().__init__(
            detector=detector,
            opts=opts,
            transport=self._smart_transport,
            model=cast(TurnDetectorModels, MODEL_NAME),
            local_fallback=False,
        )

    @property
    def model(self) -> str:  # type: ignore[override]
        return MODEL_NAME

    @property
    def prediction_timeout(self) -> float:
        """How long the session waits for a decision: longer than an unsure one takes."""
        words = self._smart_transport._words
        base = super().prediction_timeout
        return base if words is None else base + words.unsure_wait + words.timeout

    def buffered_audio(self) -> NDArray[np.int16]:
        """The 16 kHz audio received since the last flush and already buffered (<= 8 s)."""
        return self._smart_transport.buffered()


class SmartTurnDetector(BaseStreamingTurnDetector):
    """Streaming audio end-of-turn detector over a shared `SmartTurnModel`.

    Every language resolves to the same 0.5 ``unlikely_threshold`` (the model is
    multilingual); there is no backchannel probability. Without an executor each
    prediction runs in ``asyncio.to_thread``. With `vad` (the session's `SharedVAD`) each
    stream starts its prediction early, at the first dip of the VAD's probability after
    speech (`EARLY_BELOW`).
    """

    def __init__(
        self,
        model: SmartTurnModel,
        *,
        executor: concurrent.futures.Executor | None = None,
        vad: SharedVAD | None = None,
        words: WordsJudge | None = None,
    ) -> None:
        # No shipped thresholds exist for this model name, so a scalar override is the
        # only value ThresholdOptions resolves: lookup(any language) -> 0.5.
        thresholds = ThresholdOptions(
            cast(TurnDetectorModels, MODEL_NAME), overrides=UNLIKELY_THRESHOLD
        )
        super().__init__(opts=TurnDetectorOptions(sample_rate=SAMPLE_RATE, thresholds=thresholds))
        self._smart_model = model
        self._executor = executor
        self._vad = vad
        self._words = words

    @property
    def model(self) -> str:  # type: ignore[override]
        return MODEL_NAME

    @property
    def provider(self) -> str:
        return PROVIDER

    def describe_options(self) -> dict[str, Any]:
        """What the session report shows for this detector (``telemetry.DescribesOptions``)."""
        return {
            "model": MODEL_NAME,
            "provider": PROVIDER,
            "sample_rate": SAMPLE_RATE,
            "window_seconds": WINDOW_SECONDS,
            "unlikely_threshold": UNLIKELY_THRESHOLD,
        }

    def stream(
        self,
        *,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> SmartTurnStream:
        """A new stream (call inside the running event loop); conn_options is unused."""
        return SmartTurnStream(
            detector=self,
            opts=self._opts,
            model=self._smart_model,
            executor=self._executor,
            vad=self._vad,
            words=self._words,
        )
