"""Speech-to-text with faster-whisper (CTranslate2 int8), as a livekit-agents STT.

The stream segments speech with the session's VAD, sends interim transcripts while the
user talks, a final transcript at the end of each segment, and supports `flush()` so
`commit_user_turn()` (push-to-talk) gets the words spoken so far at once. Whisper runs on a
shared single-thread executor, never on the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
from faster_whisper import WhisperModel
from livekit import rtc
from livekit.agents import stt, utils, vad
from livekit.agents.language import LanguageCode
from livekit.agents.types import (
    DEFAULT_API_CONNECT_OPTIONS,
    NOT_GIVEN,
    APIConnectOptions,
    NotGivenOr,
)

from ..fileaudio import mono16, resample

logger = logging.getLogger("appliance.stt")

SAMPLE_RATE = 16000
_PREFIX_SECONDS = 0.6  # audio kept before VAD's start-of-speech (VAD decides late)
_MIN_SECONDS = 0.15  # shorter segments are not worth a Whisper call


def load_model(model_dir: str, *, threads: int) -> WhisperModel:
    """Load the CTranslate2 Whisper model once per process."""
    return WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads)


def transcribe(model: WhisperModel, audio: np.ndarray, language: str) -> tuple[str, float]:
    """Blocking greedy transcription of float32 16 kHz audio; returns (text, confidence)."""
    segments, _info = model.transcribe(
        audio,
        language=language,
        beam_size=1,
        best_of=1,
        temperature=0.0,
        condition_on_previous_text=False,
        without_timestamps=True,
        vad_filter=False,
    )
    texts, logprobs = [], []
    for seg in segments:
        if seg.no_speech_prob > 0.6 and seg.avg_logprob < -1.0:
            continue  # Whisper's hallucination on silence or noise
        texts.append(seg.text.strip())
        logprobs.append(seg.avg_logprob)
    text = " ".join(t for t in texts if t)
    confidence = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
    return text, confidence


class WhisperSTT(stt.STT):
    """A per-session STT over a shared WhisperModel. Construct inside the event loop."""

    def __init__(
        self,
        model: WhisperModel,
        executor: Executor,
        *,
        vad: vad.VAD | None,
        model_name: str = "tiny.en",
        language: str = "en",
        interim_interval: float = 0.0,
    ) -> None:
        super().__init__(
            capabilities=stt.STTCapabilities(
                streaming=True,
                interim_results=interim_interval > 0,
                manual_flush=True,
                offline_recognize=True,
            )
        )
        self._whisper = model
        self._executor = executor
        self._vad = vad
        self._model_name = model_name
        self._language = language
        self._interim_interval = interim_interval

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "whisper"

    async def transcribe_pcm(self, pcm: np.ndarray) -> stt.SpeechData:
        """Transcribe int16 16 kHz mono samples off the event loop."""
        audio = pcm.astype(np.float32) / 32768.0
        loop = asyncio.get_running_loop()
        text, confidence = await loop.run_in_executor(
            self._executor, transcribe, self._whisper, audio, self._language
        )
        return stt.SpeechData(
            language=LanguageCode(self._language),
            text=text,
            end_time=len(pcm) / SAMPLE_RATE,
            confidence=confidence,
        )

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        frame = rtc.combine_audio_frames(buffer)
        pcm = _mono16k(frame)
        data = await self.transcribe_pcm(pcm)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid(),
            alternatives=[data],
        )

    def stream(
        self,
        *,
        language: NotGivenOr[str] = NOT_GIVEN,
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> WhisperStream:
        return WhisperStream(self, conn_options=conn_options)


def _mono16k(frame: rtc.AudioFrame) -> np.ndarray:
    return resample(mono16(frame), frame.sample_rate, SAMPLE_RATE)


@dataclass
class _Job:
    kind: str  # "interim" or "final"
    pcm: np.ndarray
    speech_end_time: float | None = None


class WhisperStream(stt.RecognizeStream):
    """VAD-segmented streaming recognition with interim results and manual flush."""

    def __init__(self, owner: WhisperSTT, *, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=owner, conn_options=conn_options, sample_rate=SAMPLE_RATE)
        self._owner = owner
        self._segment: list[np.ndarray] = []
        self._segment_samples = 0
        self._prefix: collections.deque[np.ndarray] = collections.deque()
        self._prefix_samples = 0
        self._speaking = owner._vad is None  # without VAD, everything is one segment
        self._since_interim = 0
        self._interim_pending = False
        self._finals_pending = 0
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()

    def _queue_final(self, speech_end_time: float) -> None:
        self._finals_pending += 1
        self._jobs.put_nowait(_Job("final", self._take_segment(), speech_end_time))

    def _take_segment(self) -> np.ndarray:
        pcm = np.concatenate(self._segment) if self._segment else np.zeros(0, np.int16)
        self._segment, self._segment_samples, self._since_interim = [], 0, 0
        return pcm

    def _add_audio(self, pcm: np.ndarray) -> None:
        if self._speaking:
            self._segment.append(pcm)
            self._segment_samples += len(pcm)
            self._since_interim += len(pcm)
            interval = self._owner._interim_interval
            if (
                interval > 0
                and not self._interim_pending
                and self._since_interim >= interval * SAMPLE_RATE
            ):
                self._since_interim = 0
                self._interim_pending = True
                self._jobs.put_nowait(_Job("interim", np.concatenate(self._segment)))
            return
        self._prefix.append(pcm)
        self._prefix_samples += len(pcm)
        while self._prefix_samples - len(self._prefix[0]) >= _PREFIX_SECONDS * SAMPLE_RATE:
            self._prefix_samples -= len(self._prefix.popleft())

    def _on_vad_event(self, event: vad.VADEvent) -> None:
        if event.type == vad.VADEventType.START_OF_SPEECH and not self._speaking:
            self._speaking = True
            self._segment = list(self._prefix)
            self._segment_samples = self._prefix_samples
            self._prefix.clear()
            self._prefix_samples = 0
            self._event_ch.send_nowait(stt.SpeechEvent(stt.SpeechEventType.START_OF_SPEECH))
        elif event.type == vad.VADEventType.END_OF_SPEECH and self._speaking:
            self._speaking = False
            end = time.time() - event.silence_duration
            self._event_ch.send_nowait(
                stt.SpeechEvent(stt.SpeechEventType.END_OF_SPEECH, speech_end_time=end)
            )
            self._queue_final(end)

    async def _recognize(self) -> None:
        while (job := await self._jobs.get()) is not None:
            if job.kind == "interim":
                self._interim_pending = False
                if self._finals_pending or len(job.pcm) < _MIN_SECONDS * SAMPLE_RATE:
                    continue
            data = (
                await self._owner.transcribe_pcm(job.pcm)
                if len(job.pcm) >= _MIN_SECONDS * SAMPLE_RATE
                else stt.SpeechData(language=LanguageCode(self._owner._language), text="")
            )
            if job.kind == "interim":
                if data.text:
                    self._event_ch.send_nowait(
                        stt.SpeechEvent(stt.SpeechEventType.INTERIM_TRANSCRIPT, alternatives=[data])
                    )
                continue
            self._finals_pending -= 1
            # a final is sent even when empty: it releases commit_user_turn() at once
            self._event_ch.send_nowait(
                stt.SpeechEvent(
                    stt.SpeechEventType.FINAL_TRANSCRIPT,
                    request_id=utils.shortuuid(),
                    alternatives=[data],
                    speech_end_time=job.speech_end_time,
                )
            )

    async def _run(self) -> None:
        vad_stream = self._owner._vad.stream() if self._owner._vad is not None else None

        async def _forward() -> None:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    self._queue_final(time.time())
                    continue
                if vad_stream is not None:
                    vad_stream.push_frame(item)
                self._add_audio(np.frombuffer(item.data, dtype=np.int16).copy())
            self._jobs.put_nowait(None)

        async def _vad_events() -> None:
            assert vad_stream is not None
            async for event in vad_stream:
                self._on_vad_event(event)

        tasks = [asyncio.create_task(_forward()), asyncio.create_task(self._recognize())]
        if vad_stream is not None:
            tasks.append(asyncio.create_task(_vad_events()))
        try:
            await asyncio.gather(*tasks[:2])
        finally:
            await utils.aio.cancel_and_wait(*tasks)
            if vad_stream is not None:
                await vad_stream.aclose()
