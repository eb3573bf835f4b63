"""The faster-whisper engine as a livekit-agents STT (the adapter over `engine`).

The stream segments speech with the session's VAD, sends interim transcripts while the
user talks, a preflight transcript at the first short pause (livekit starts its preemptive
reply on it; the final reuses it when the user does not go on), a final transcript at the
end of each segment, and supports `flush()` so `commit_user_turn()` (push-to-talk) gets the
words spoken so far at once. With `segment=False` (push-to-talk) everything between two
flushes is one segment and the VAD only times the preflight: a flush after a pause finds
the words already transcribed. Whisper runs on a shared single-thread executor, never on
the event loop.
"""

from __future__ import annotations

import asyncio
import collections
import functools
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

from appliance.audio.pcm import mono16, resample
from appliance.observe import trace
from appliance.plugins.shared_vad import SPEECH_PROBABILITY, SharedVAD
from appliance.plugins.turn_text import TurnText
from appliance.plugins.whisper.engine import SAMPLE_RATE, transcribe

_PREFIX_SECONDS = 0.6  # audio kept before VAD's start-of-speech (VAD decides late)
_MIN_SECONDS = 0.15  # shorter segments are not worth a Whisper call
# no interims past this: each one transcribes the whole segment again, and the final
# waits for one that is running
_INTERIM_MAX_SECONDS = 8.0


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
        window: str = "fit",
        preflight_after: float = 0.0,
        segment: bool = True,
        turn_text: TurnText | None = None,
        beam_size: int = 1,
    ) -> None:
        """`segment=False`: `vad` (a `SharedVAD`) times preflights but does not cut segments:
        the audio between two flushes is one utterance (push-to-talk, manual turns).
        `turn_text` is told of each transcript of a turn (preflights and finals)."""
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
        self._window = window
        self._preflight_after = preflight_after
        self._segment = segment
        self._beam_size = beam_size
        self.turn_text = turn_text

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "whisper"

    @property
    def interim_interval(self) -> float:
        """Seconds of speech between interim transcripts (0: none); streams follow changes."""
        return self._interim_interval

    @interim_interval.setter
    def interim_interval(self, seconds: float) -> None:
        self._interim_interval = seconds

    async def transcribe_pcm(self, pcm: np.ndarray, *, interim: bool = False) -> stt.SpeechData:
        """Transcribe int16 16 kHz mono samples off the event loop. An ``interim``
        transcript that loops is empty (no full-window redo to delay the final)."""
        audio = pcm.astype(np.float32) / 32768.0
        loop = asyncio.get_running_loop()
        text, confidence = await loop.run_in_executor(
            self._executor,
            functools.partial(
                transcribe,
                self._whisper,
                audio,
                self._language,
                window=self._window,
                redo_loops=not interim,
                beam_size=self._beam_size,
            ),
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
        trace.mark("stt.transcript")
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
    kind: str  # "interim", "preflight" or "final"
    pcm: np.ndarray
    speech_end_time: float | None = None
    reuse: _Job | None = None  # a final whose words are this preflight's
    data: stt.SpeechData | None = None  # a preflight's result


class WhisperStream(stt.RecognizeStream):
    """VAD-segmented streaming recognition with interim results and manual flush."""

    def __init__(self, owner: WhisperSTT, *, conn_options: APIConnectOptions) -> None:
        super().__init__(stt=owner, conn_options=conn_options, sample_rate=SAMPLE_RATE)
        self._owner = owner
        self._segment: list[np.ndarray] = []
        self._segment_samples = 0
        self._prefix: collections.deque[np.ndarray] = collections.deque()
        self._prefix_samples = 0
        self._speaking = owner._vad is None or not owner._segment  # else the VAD cuts
        self._since_interim = 0
        self._interim_pending = False
        self._finals_pending = 0
        self._jobs: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._quiet_s = 0.0  # silence so far at the end of the segment (VAD's view)
        self._heard_speech = False  # the VAD has heard speech in this segment
        self._preflight: _Job | None = None  # transcribed at the first pause, if still valid
        self._resampler: rtc.AudioResampler | None = None  # a shared VAD's audio to 16 kHz

    def _queue_final(self, speech_end_time: float) -> None:
        self._finals_pending += 1
        if self._owner.turn_text is not None:
            self._owner.turn_text.transcribing()
        reuse, self._preflight = self._preflight, None
        self._jobs.put_nowait(_Job("final", self._take_segment(), speech_end_time, reuse=reuse))

    def _take_segment(self) -> np.ndarray:
        pcm = np.concatenate(self._segment) if self._segment else np.zeros(0, np.int16)
        self._segment, self._segment_samples, self._since_interim = [], 0, 0
        self._quiet_s, self._heard_speech = 0.0, False
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
                and self._segment_samples <= _INTERIM_MAX_SECONDS * SAMPLE_RATE
                and self._quiet_s == 0.0  # a pause gets its preflight instead
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
            self._heard_speech = True
            self._event_ch.send_nowait(stt.SpeechEvent(stt.SpeechEventType.START_OF_SPEECH))
        elif event.type == vad.VADEventType.INFERENCE_DONE and self._speaking:
            self._inference_done(event)
        elif event.type == vad.VADEventType.END_OF_SPEECH and self._speaking:
            self._speaking = False
            self._quiet_s = 0.0
            end = time.time() - event.silence_duration
            self._event_ch.send_nowait(
                stt.SpeechEvent(stt.SpeechEventType.END_OF_SPEECH, speech_end_time=end)
            )
            self._queue_final(end)

    def _inference_done(self, event: vad.VADEvent) -> None:
        """At the first pause of `preflight_after` seconds, transcribe what was said: the
        words go out as a preflight transcript (livekit starts its preemptive reply on
        them) and become the final one if the user does not speak again before the VAD
        ends the segment."""
        after = self._owner._preflight_after
        if event.probability >= SPEECH_PROBABILITY:
            self._quiet_s = 0.0
            self._heard_speech = True
            self._preflight = None  # more words came: the final is transcribed afresh
            return
        self._quiet_s += sum(f.duration for f in event.frames)
        due = after > 0 and self._quiet_s >= after and self._heard_speech
        if due and self._preflight is None:
            pcm = np.concatenate(self._segment) if self._segment else np.zeros(0, np.int16)
            if len(pcm) >= _MIN_SECONDS * SAMPLE_RATE:
                self._preflight = _Job("preflight", pcm)
                self._jobs.put_nowait(self._preflight)
                if self._owner.turn_text is not None:
                    self._owner.turn_text.transcribing()

    async def _recognize(self) -> None:
        while (job := await self._jobs.get()) is not None:
            if job.kind == "interim":
                self._interim_pending = False
                if self._finals_pending or len(job.pcm) < _MIN_SECONDS * SAMPLE_RATE:
                    continue
            turn_text = self._owner.turn_text
            if job.kind == "preflight" and job is not self._preflight:
                if turn_text is not None:
                    turn_text.heard(None, final=False)
                continue  # the user spoke again before it ran
            if job.reuse is not None and job.reuse.data is not None:
                data = job.reuse.data
            else:
                data = (
                    await self._owner.transcribe_pcm(job.pcm, interim=job.kind == "interim")
                    if len(job.pcm) >= _MIN_SECONDS * SAMPLE_RATE
                    else stt.SpeechData(language=LanguageCode(self._owner._language), text="")
                )
            if job.kind == "preflight":
                job.data = data
                if turn_text is not None:
                    turn_text.heard(data.text if job is self._preflight else None, final=False)
                if data.text and job is self._preflight:
                    trace.mark("stt.transcript")
                    self._event_ch.send_nowait(
                        stt.SpeechEvent(
                            stt.SpeechEventType.PREFLIGHT_TRANSCRIPT, alternatives=[data]
                        )
                    )
                continue
            if job.kind == "interim":
                if data.text:
                    self._event_ch.send_nowait(
                        stt.SpeechEvent(stt.SpeechEventType.INTERIM_TRANSCRIPT, alternatives=[data])
                    )
                continue
            self._finals_pending -= 1
            if turn_text is not None:
                turn_text.heard(data.text, final=True)
            trace.mark("stt.transcript")
            # a final is sent even when empty: it releases commit_user_turn() at once
            self._event_ch.send_nowait(
                stt.SpeechEvent(
                    stt.SpeechEventType.FINAL_TRANSCRIPT,
                    request_id=utils.shortuuid(),
                    alternatives=[data],
                    speech_end_time=job.speech_end_time,
                )
            )

    def _on_shared_vad_event(self, event: vad.VADEvent) -> None:
        """An event of the session's VAD stream. The audio comes from the events too (each
        inference carries its window's samples), so segments line up with the decisions
        exactly, even where the session's audio reaches this stream later (resampled)."""
        if event.type == vad.VADEventType.INFERENCE_DONE:
            for frame in event.frames:
                if frame.sample_rate != SAMPLE_RATE:
                    if self._resampler is None:
                        self._resampler = rtc.AudioResampler(frame.sample_rate, SAMPLE_RATE)
                    for out in self._resampler.push(frame):
                        self._add_audio(np.frombuffer(out.data, dtype=np.int16).copy())
                else:
                    self._add_audio(np.frombuffer(frame.data, dtype=np.int16).copy())
        self._on_vad_event(event)

    def _on_pause_event(self, event: vad.VADEvent) -> None:
        """An event of the session's VAD stream, when the VAD does not cut segments."""
        if event.type == vad.VADEventType.INFERENCE_DONE:
            self._inference_done(event)

    async def _run(self) -> None:
        owner_vad = self._owner._vad
        if isinstance(owner_vad, SharedVAD):  # the session runs it: listen to its events
            listener = self._on_shared_vad_event if self._owner._segment else self._on_pause_event
            owner_vad.listeners.append(listener)
            try:
                await self._run_with(None, audio_from_input=not self._owner._segment)
            finally:
                owner_vad.listeners.remove(listener)
        else:
            await self._run_with(owner_vad.stream() if owner_vad is not None else None)

    async def _run_with(
        self, vad_stream: vad.VADStream | None, *, audio_from_input: bool = True
    ) -> None:
        async def _forward() -> None:
            async for item in self._input_ch:
                if isinstance(item, self._FlushSentinel):
                    self._queue_final(time.time())
                    continue
                if vad_stream is not None:
                    vad_stream.push_frame(item)
                if audio_from_input:
                    self._add_audio(np.frombuffer(item.data, dtype=np.int16).copy())
            self._jobs.put_nowait(None)

        async def _vad_events() -> None:
            assert vad_stream is not None
            handle = self._on_vad_event if self._owner._segment else self._on_pause_event
            async for event in vad_stream:
                handle(event)

        tasks = [asyncio.create_task(_forward()), asyncio.create_task(self._recognize())]
        if vad_stream is not None:
            tasks.append(asyncio.create_task(_vad_events()))
        try:
            await asyncio.gather(*tasks[:2])
        finally:
            await utils.aio.cancel_and_wait(*tasks)
            if vad_stream is not None:
                await vad_stream.aclose()
