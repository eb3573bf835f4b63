"""The Pipecat peer: Pipecat's own local voice pipeline on the appliance's model files.

Run in its own environment (`scripts/setup-pipecat-peer.sh` makes `.venv-pipecat/`):

    .venv-pipecat/bin/python bench/pipecat_peer.py --llm-url http://127.0.0.1:8765/v1 \
        --whisper DIR --piper VOICE.onnx [--instructions-file F]

A long-running process: one JSON job per line on stdin, one JSON reply per job on stdout,
logs on stderr. A job is `{"id": ..., "turns": [WAV, ...], "out": WAV}` (16 kHz mono int16
WAVs); `"quit"` or EOF ends the process. Each job runs a fresh Pipecat pipeline
(a new conversation) built as Pipecat's examples build a local voice bot: Silero VAD in the
user aggregator, the default turn strategy (smart-turn v3, local ONNX), faster-whisper STT,
the OpenAI LLM service pointed at llama_cpp.server, Piper TTS, context aggregators and
default interruptions. The only non-Pipecat parts are the two transports: a virtual
microphone that plays the turn WAVs in real time and a virtual sound card that plays and
records the bot's audio. Every non-default choice is listed in the reply's "settings".

Imports only the standard library, numpy and Pipecat (with what Pipecat installs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import wave
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import soxr
from loguru import logger
from pipecat.audio.vad.silero import SileroVADAnalyzer
from pipecat.frames.frames import (
    BotStartedSpeakingFrame,
    BotStoppedSpeakingFrame,
    CancelFrame,
    EndFrame,
    Frame,
    InputAudioRawFrame,
    InterruptionFrame,
    OutputAudioRawFrame,
    StartFrame,
)
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.worker import PipelineParams, PipelineWorker
from pipecat.processors.aggregators.llm_context import LLMContext
from pipecat.processors.aggregators.llm_response_universal import (
    LLMContextAggregatorPair,
    LLMUserAggregatorParams,
)
from pipecat.processors.frame_processor import FrameDirection
from pipecat.services.openai.llm import OpenAILLMService
from pipecat.services.piper.tts import PiperTTSService
from pipecat.services.whisper.stt import WhisperSTTService
from pipecat.transports.base_input import BaseInputTransport
from pipecat.transports.base_output import BaseOutputTransport
from pipecat.transports.base_transport import TransportParams
from pipecat.workers.runner import WorkerRunner

FRAME_SECS = 0.02  # the virtual microphone delivers 20 ms frames
LEAD_IN_SECS = 0.5  # silence before the first turn
TURN_TIMEOUT_SECS = 30.0  # longest wait for the bot's reply to a turn
POLL_SECS = 0.01
RECORD_RATE = 16000
# Pipecat's example prompt, used when no --instructions-file is given
DEFAULT_INSTRUCTIONS = (
    "You are a helpful assistant in a voice conversation. Your responses will be spoken "
    "aloud, so avoid emojis, bullet points, or other formatting that can't be spoken. "
    "Respond to what the user said in a creative, helpful, and brief way."
)


class Clock:
    """The job's timeline: seconds since the origin (the microphone's first frame)."""

    def __init__(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.origin: float | None = None
        self.started = asyncio.Event()

    def start(self) -> None:
        """Set the origin to now."""
        self.origin = self._loop.time()
        self.started.set()

    def now(self) -> float:
        """Seconds since the origin (0 before it is set)."""
        return 0.0 if self.origin is None else self._loop.time() - self.origin

    async def sleep_until(self, t: float) -> None:
        """Sleep until timeline second `t`."""
        delay = t - self.now()
        if delay > 0:
            await asyncio.sleep(delay)


@dataclass
class Playback:
    """One WAV the microphone plays, and when it did."""

    samples: np.ndarray
    first_frame: int  # index of the frame holding its first sample
    done: asyncio.Event = field(default_factory=asyncio.Event)
    position: int = 0


class WavMicInput(BaseInputTransport):
    """A virtual microphone: silence, and the turn WAVs when asked, as 20 ms frames.

    Frame i covers timeline [i*20 ms, (i+1)*20 ms) and is pushed at (i+1)*20 ms, the way a
    capture device delivers a buffer once it is full. It runs from the transport's start
    to its stop, whatever the pipeline is doing.
    """

    def __init__(self, params: TransportParams, clock: Clock) -> None:
        super().__init__(params)
        self._clock = clock
        self._queue: deque[Playback] = deque()
        self._mic_task: asyncio.Task[None] | None = None

    async def start(self, frame: StartFrame) -> None:
        """Start the transport and the microphone's clock."""
        await super().start(frame)
        await self.set_transport_ready(frame)
        if self._mic_task is None:
            self._clock.start()
            self._mic_task = self.create_task(self._run_mic(), "wav_mic")

    async def stop(self, frame: EndFrame) -> None:
        """Stop the microphone, then the transport."""
        await self._stop_mic()
        await super().stop(frame)

    async def cancel(self, frame: CancelFrame) -> None:
        """Stop the microphone, then cancel the transport."""
        await self._stop_mic()
        await super().cancel(frame)

    async def _stop_mic(self) -> None:
        if self._mic_task is not None:
            await self.cancel_task(self._mic_task)
            self._mic_task = None

    def play(self, samples: np.ndarray) -> Playback:
        """Queue `samples` (int16 at the input rate) to start at the next frame boundary."""
        playback = Playback(samples, first_frame=int(self._clock.now() / FRAME_SECS) + 1)
        self._queue.append(playback)
        return playback

    def _frame(self, index: int) -> tuple[np.ndarray, Playback | None]:
        """The samples of frame `index`, and the playback it finished, if any."""
        n = int(self.sample_rate * FRAME_SECS)
        out = np.zeros(n, dtype=np.int16)
        if not self._queue or self._queue[0].first_frame > index:
            return out, None
        playback = self._queue[0]
        chunk = playback.samples[playback.position : playback.position + n]
        out[: len(chunk)] = chunk
        playback.position += n
        if playback.position < len(playback.samples):
            return out, None
        self._queue.popleft()
        return out, playback

    async def _run_mic(self) -> None:
        index = 0
        while True:
            await self._clock.sleep_until((index + 1) * FRAME_SECS)
            samples, finished = self._frame(index)
            frame = InputAudioRawFrame(
                audio=samples.tobytes(), sample_rate=self.sample_rate, num_channels=1
            )
            await self.push_audio_frame(frame)
            if finished is not None:
                finished.done.set()
            index += 1


class VirtualCardOutput(BaseOutputTransport):
    """A virtual sound card that plays in real time and records what it played.

    Each chunk Pipecat writes is played at max(now, end of what is already scheduled);
    the write returns when the chunk starts playing (one chunk of device buffer), so
    Pipecat's media sender is paced as with a real device. An interruption drops the
    audio not played yet.
    """

    def __init__(self, params: TransportParams, clock: Clock) -> None:
        super().__init__(params)
        self._clock = clock
        self._chunks: list[tuple[int, np.ndarray]] = []  # (start sample, samples)
        self._end = 0  # first sample after what is scheduled
        self.bot_speaking = False

    async def start(self, frame: StartFrame) -> None:
        """Start the transport; the card is ready at once."""
        await super().start(frame)
        await self.set_transport_ready(frame)

    def _now_sample(self) -> int:
        return int(self._clock.now() * self.sample_rate)

    def busy(self) -> bool:
        """Whether audio is still playing or scheduled."""
        return self._end > self._now_sample()

    async def write_audio_frame(self, frame: OutputAudioRawFrame) -> bool:
        """Schedule the chunk after what is playing; return when it starts playing."""
        samples = np.frombuffer(frame.audio, dtype=np.int16)
        if frame.num_channels > 1:
            samples = samples.reshape(-1, frame.num_channels)[:, 0]
        start = max(self._now_sample(), self._end)
        self._chunks.append((start, samples.copy()))
        self._end = start + len(samples)
        await self._clock.sleep_until(start / self.sample_rate)
        return True

    def _drop_unplayed(self) -> None:
        now = self._now_sample()
        kept: list[tuple[int, np.ndarray]] = []
        for start, samples in self._chunks:
            if start + len(samples) <= now:
                kept.append((start, samples))
            elif start < now:
                kept.append((start, samples[: now - start]))
        self._chunks = kept
        self._end = min(self._end, now)

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        """Drop the unplayed audio on an interruption, then let Pipecat handle the frame."""
        if isinstance(frame, InterruptionFrame):
            self._drop_unplayed()
        await super().process_frame(frame, direction)

    async def push_frame(
        self, frame: Frame, direction: FrameDirection = FrameDirection.DOWNSTREAM
    ) -> None:
        """Note the bot speaking state the base class reports, then push the frame."""
        if direction == FrameDirection.DOWNSTREAM:
            if isinstance(frame, BotStartedSpeakingFrame):
                self.bot_speaking = True
            elif isinstance(frame, BotStoppedSpeakingFrame):
                self.bot_speaking = False
        await super().push_frame(frame, direction)

    def recording(self, seconds: float) -> np.ndarray:
        """What the card played over [0, seconds), int16 at RECORD_RATE."""
        rate = self.sample_rate
        track = np.zeros(int(seconds * rate), dtype=np.int16)
        for start, samples in self._chunks:
            part = samples[: max(0, len(track) - start)]
            track[start : start + len(part)] = part
        if rate == RECORD_RATE:
            return track
        out = np.asarray(soxr.resample(track, rate, RECORD_RATE))
        return out[: int(seconds * RECORD_RATE)].astype(np.int16)


@dataclass
class TurnLog:
    """What the aggregators reported, in order, with a sequence number."""

    user_texts: list[tuple[int, str]] = field(default_factory=list)
    replies: list[tuple[int, str]] = field(default_factory=list)
    user_in_turn: bool = False
    last_user_stop: int = -1
    last_reply: int = -1
    seq: int = 0

    def tick(self) -> int:
        """The next sequence number."""
        self.seq += 1
        return self.seq


def read_wav(path: str) -> np.ndarray:
    """A 16 kHz mono int16 WAV's samples."""
    with wave.open(path, "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (16000, 1, 2):
            raise ValueError(f"{path}: need 16 kHz mono int16")
        return np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)


def write_wav(path: str, samples: np.ndarray, rate: int) -> None:
    """Write mono int16 `samples` to `path`."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with wave.open(path, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype(np.int16).tobytes())


class PipecatPeer:
    """Builds and drives one Pipecat pipeline per job."""

    def __init__(
        self, llm_url: str, llm_model: str, whisper: str, piper: str, instructions: str
    ) -> None:
        self.llm_url = llm_url
        self.llm_model = llm_model
        self.whisper = whisper
        self.piper = Path(piper)
        self.instructions = instructions

    def settings(self) -> dict[str, Any]:
        """The choices that differ from Pipecat's defaults (or that Pipecat leaves open)."""
        return {
            "pipecat": "1.14.0",
            "input_transport": "WavMicInput(BaseInputTransport): real-time 20 ms frames, each "
            "pushed at the end of its interval, silence between turns",
            "output_transport": "VirtualCardOutput(BaseOutputTransport): plays at max(now, "
            "end of scheduled), write returns when the chunk starts, drops unplayed "
            "audio on InterruptionFrame, records",
            "transport_params": "TransportParams(audio_in_enabled=True, audio_out_enabled=True)",
            "pipeline_params": "PipelineParams() (in 16000 Hz, out 24000 Hz)",
            "vad": "LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer())",
            "turn_strategies": "default (VAD+transcription start, "
            "TurnAnalyzerUserTurnStopStrategy(LocalSmartTurnAnalyzerV3()))",
            "stt": f"WhisperSTTService(device='cpu', compute_type='int8', "
            f"settings=Settings(model={self.whisper!r})): int8 as the appliance and peer 1 "
            "run it (Pipecat's default compute type would run this float16 file as float32 "
            "here)",
            "llm": f"OpenAILLMService(base_url={self.llm_url!r}, api_key='sk-local', "
            f"settings=Settings(model={self.llm_model!r}, system_instruction=...))",
            "tts": f"PiperTTSService(settings=Settings(voice={self.piper.stem!r}), "
            f"download_dir={str(self.piper.parent)!r})",
            "context": "LLMContext() (empty; the instructions are the LLM's system_instruction)",
            "turn_done": "an assistant turn stopped after the last user turn stopped, no user "
            "turn open, bot not speaking, nothing left to play (or turn_timeout_secs)",
            "system_instructions": self.instructions,
            "runner": "WorkerRunner(handle_sigint=False)",
            "recording": f"bot audio resampled to {RECORD_RATE} Hz with soxr",
            "lead_in_secs": LEAD_IN_SECS,
            "turn_timeout_secs": TURN_TIMEOUT_SECS,
        }

    async def run_job(self, job: dict[str, Any]) -> dict[str, Any]:
        """Run one job in a fresh pipeline; the reply (with "error" set on failure)."""
        reply: dict[str, Any] = {
            "id": job.get("id"),
            "rate": RECORD_RATE,
            "out": job.get("out"),
            "turns": [],
            "settings": self.settings(),
            "pipeline_errors": [],  # non-fatal ErrorFrames Pipecat reported during the job
            "error": None,
        }
        clock = Clock()
        card: VirtualCardOutput | None = None
        worker: PipelineWorker | None = None
        run: asyncio.Task[None] | None = None
        try:
            wavs = [read_wav(path) for path in job["turns"]]
            params = TransportParams(audio_in_enabled=True, audio_out_enabled=True)
            mic = WavMicInput(params, clock)
            card = VirtualCardOutput(params, clock)
            stt = WhisperSTTService(
                device="cpu",
                compute_type="int8",
                settings=WhisperSTTService.Settings(model=self.whisper),
            )
            llm = OpenAILLMService(
                api_key="sk-local",
                base_url=self.llm_url,
                settings=OpenAILLMService.Settings(
                    model=self.llm_model, system_instruction=self.instructions
                ),
            )
            tts = PiperTTSService(
                settings=PiperTTSService.Settings(voice=self.piper.stem),
                download_dir=self.piper.parent,
            )
            context = LLMContext()
            user_aggregator, assistant_aggregator = LLMContextAggregatorPair(
                context,
                user_params=LLMUserAggregatorParams(vad_analyzer=SileroVADAnalyzer()),
            )
            log = TurnLog()

            @user_aggregator.event_handler("on_user_turn_started")
            async def on_user_turn_started(aggregator: Any, strategy: Any) -> None:
                log.user_in_turn = True

            @user_aggregator.event_handler("on_user_turn_stopped")
            async def on_user_turn_stopped(aggregator: Any, strategy: Any, message: Any) -> None:
                log.user_in_turn = False
                log.last_user_stop = log.tick()
                if message.content:
                    log.user_texts.append((log.seq, message.content.strip()))

            @assistant_aggregator.event_handler("on_assistant_turn_stopped")
            async def on_assistant_turn_stopped(aggregator: Any, message: Any) -> None:
                log.last_reply = log.tick()
                if message.content:
                    log.replies.append((log.seq, message.content.strip()))

            pipeline = Pipeline([mic, stt, user_aggregator, llm, tts, card, assistant_aggregator])
            worker = PipelineWorker(pipeline, params=PipelineParams())

            @worker.event_handler("on_pipeline_error")
            async def on_pipeline_error(worker: Any, frame: Any) -> None:
                reply["pipeline_errors"].append(str(frame.error))

            runner = WorkerRunner(handle_sigint=False)
            await runner.add_workers(worker)
            run = asyncio.create_task(runner.run())
            await asyncio.wait_for(clock.started.wait(), timeout=60)
            await clock.sleep_until(LEAD_IN_SECS)

            for samples in wavs:
                mark = log.tick()
                playback = mic.play(samples)
                await playback.done.wait()
                deadline = clock.now() + TURN_TIMEOUT_SECS
                timed_out = True
                while clock.now() < deadline:
                    if run.done():
                        run.result()
                        raise RuntimeError("pipeline ended")
                    answered = log.last_reply > max(log.last_user_stop, mark)
                    if (
                        answered
                        and not log.user_in_turn
                        and not card.bot_speaking
                        and not card.busy()
                    ):
                        timed_out = False
                        break
                    await asyncio.sleep(POLL_SECS)
                reply["turns"].append(
                    {
                        "start_s": round(playback.first_frame * FRAME_SECS, 3),
                        "heard": " ".join(t for s, t in log.user_texts if s > mark),
                        "reply": " ".join(t for s, t in log.replies if s > mark),
                        "timed_out": timed_out,
                    }
                )
        except Exception as exc:  # report it and keep serving
            logger.exception(f"job {job.get('id')} failed")
            reply["error"] = repr(exc)
        finally:
            end = clock.now()
            if worker is not None:
                await worker.cancel()
            if run is not None:
                try:
                    await asyncio.wait_for(run, timeout=30)
                except Exception as exc:
                    logger.warning(f"runner did not end cleanly: {exc!r}")
            if card is not None and job.get("out") and card.sample_rate:
                try:
                    write_wav(job["out"], card.recording(end), RECORD_RATE)
                except Exception as exc:
                    reply["error"] = reply["error"] or repr(exc)
        return reply


async def serve(peer: PipecatPeer, replies: TextIO) -> None:
    """Read jobs from stdin, one per line; write one reply per line to `replies`."""
    loop = asyncio.get_running_loop()
    print(json.dumps({"ready": "pipecat", "settings": peer.settings()}), file=replies, flush=True)
    while True:
        line = await loop.run_in_executor(None, sys.stdin.readline)
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        try:
            job = json.loads(line)
        except json.JSONDecodeError as exc:
            print(json.dumps({"id": None, "error": repr(exc)}), file=replies, flush=True)
            continue
        if job == "quit":
            break
        if not isinstance(job, dict):
            error = f"not a job: {job!r}"
            print(json.dumps({"id": None, "error": error}), file=replies, flush=True)
            continue
        reply = await peer.run_job(job)
        print(json.dumps(reply), file=replies, flush=True)
        # between conversations: each pipeline's services (and their models) form reference
        # cycles that CPython's collector reaches only rarely; without this the process
        # grows by about 230 MB per conversation
        gc.collect()


def main(argv: list[str] | None = None) -> int:
    """Parse the arguments and serve jobs until EOF or "quit"."""
    parser = argparse.ArgumentParser(description="The Pipecat peer (JSON jobs on stdin).")
    parser.add_argument("--llm-url", required=True, help="llama_cpp.server base URL (…/v1)")
    parser.add_argument("--llm-model", default="local", help="the model name to ask for")
    parser.add_argument("--whisper", required=True, help="CTranslate2 Whisper model folder")
    parser.add_argument("--piper", required=True, help="Piper voice .onnx (+ .onnx.json)")
    parser.add_argument("--instructions-file", help="system instructions (text file)")
    parser.add_argument("--log-level", default="INFO", help="loguru level for stderr")
    args = parser.parse_args(argv)
    logger.remove()
    logger.add(sys.stderr, level=args.log_level)
    instructions = DEFAULT_INSTRUCTIONS
    if args.instructions_file:
        instructions = Path(args.instructions_file).read_text().strip()
    peer = PipecatPeer(args.llm_url, args.llm_model, args.whisper, args.piper, instructions)
    # replies go to the real stdout; anything else printed (even by C code) goes to stderr
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    asyncio.run(serve(peer, replies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
