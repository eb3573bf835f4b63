"""Piper text-to-speech as a livekit-agents TTS: the adapter over `engine.PiperVoice`.

Each sentence is synthesized separately off the event loop, so that its audio can be played
while the next one is computed; with ``clauses`` a streamed reply is cut into clauses
(`ClauseTokenizer`), its first after a few words.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
from collections.abc import AsyncIterator, Callable

import numpy as np
import onnxruntime as ort
from livekit import rtc
from livekit.agents import APIError, tokenize, tts, utils
from livekit.agents.tokenize.token_stream import BufferedSentenceStream
from livekit.agents.tokenize.tokenizer import SentenceStream
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions

from appliance.observe import trace
from appliance.plugins.piper.engine import URGENT_PIECES, PiperVoice
from appliance.plugins.piper.text import split_first_words
from appliance.plugins.priority import Priority


class ClauseTokenizer(tokenize.SentenceTokenizer):
    """Cuts the LLM's streamed text at clauses rather than sentences, and a reply's first
    clause after `first_words` words, so the first words are spoken while the LLM still
    writes the rest. Clauses under `min_len` characters ride with the next one."""

    def __init__(self, min_len: int = 8, first_words: int = 3) -> None:
        self.min_len, self.first_words = min_len, first_words

    def tokenize(self, text: str, *, language: str | None = None) -> list[str]:
        return [clause for clause, _, _ in split_first_words(text, self.first_words)]

    def stream(self, *, language: str | None = None) -> SentenceStream:
        first = True  # one stream per reply: only its first clause is cut short

        def split(text: str) -> list[tuple[str, int, int]]:
            nonlocal first
            tokens = split_first_words(text, self.first_words if first else 0)
            if len(tokens) > 1:  # the stream takes the first token now
                first = False
            return tokens

        return BufferedSentenceStream(tokenizer=split, min_token_len=self.min_len, min_ctx_len=2)


class PiperTTS(tts.TTS):
    """Per-session livekit TTS over a shared PiperVoice. Construct inside a running event loop."""

    def __init__(
        self,
        voice: PiperVoice,
        *,
        model_name: str = "en_US-joe-medium",
        executor: concurrent.futures.Executor | None = None,
        clauses: bool = False,
        priority: Priority | None = None,
    ) -> None:
        """``executor`` runs the blocking synthesis; None uses the loop's default executor.

        ``clauses``: streamed text (a reply) is synthesized clause by clause, the first
        clause as soon as the LLM has written it; otherwise livekit cuts it into sentences.
        ``priority``: a streamed reply's first chunk is rendered as urgent (the LLM waits).
        """
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=clauses),
            sample_rate=voice.sample_rate,
            num_channels=1,
        )
        self._voice = voice
        self._model_name = model_name
        self._executor = executor
        self._adapter: tts.StreamAdapter | None = None
        self._priority = priority
        self._first_of_reply = False  # the next synthesize() is a streamed reply's first

    @property
    def model(self) -> str:
        return self._model_name

    @property
    def provider(self) -> str:
        return "piper"

    @property
    def voice(self) -> PiperVoice:
        return self._voice

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        urgent, self._first_of_reply = self._first_of_reply, False
        return _PiperChunkedStream(
            tts=self, input_text=text, conn_options=conn_options, urgent=urgent
        )

    async def rendered(self, text: str) -> AsyncIterator[rtc.AudioFrame]:
        """`text` as audio frames from the voice's kept renderings (`PiperVoice.rendered`;
        synthesized on the executor the first time): for `AgentSession.say(audio=...)`."""
        loop = asyncio.get_running_loop()
        audio = await loop.run_in_executor(self._executor, self._voice.rendered, text)
        step = self._voice.sample_rate // 10  # 100 ms frames
        for start in range(0, len(audio), step):
            piece = audio[start : start + step]
            yield rtc.AudioFrame(piece.tobytes(), self._voice.sample_rate, 1, len(piece))

    def stream(
        self, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.SynthesizeStream:
        if not self.capabilities.streaming:
            return super().stream(conn_options=conn_options)
        if self._adapter is None:
            self._adapter = tts.StreamAdapter(tts=self, sentence_tokenizer=ClauseTokenizer())
        self._first_of_reply = True  # the adapter synthesizes the reply's chunks in order
        return self._adapter.stream(conn_options=conn_options)

    async def aclose(self) -> None:
        if self._adapter is not None:
            await self._adapter.aclose()
        await super().aclose()


class _PiperChunkedStream(tts.ChunkedStream):
    """Synthesizes sentence by sentence off the event loop, pushing each one when ready."""

    def __init__(
        self,
        *,
        tts: PiperTTS,
        input_text: str,
        conn_options: APIConnectOptions,
        urgent: bool = False,
    ) -> None:
        super().__init__(tts=tts, input_text=input_text, conn_options=conn_options)
        self._piper = tts
        self._priority = tts._priority if urgent else None  # until its first audio is out

    def _render(
        self, phonemes: str, run_options: ort.RunOptions, deliver: Callable[[np.ndarray], None]
    ) -> None:
        """Executor job: one sentence, each piece given to `deliver` as it is decoded (in
        one job, so other sessions' sentences do not come between its pieces); the first
        audio of an urgent chunk keeps the LLM waiting."""
        urgent = self._priority is not None
        pieces = self._piper.voice.pieces(phonemes, run_options=run_options, urgent=urgent)
        if self._priority is not None:
            # the first two pieces: the second must be out before the first has played
            out = False
            with self._priority.urgent():
                for piece in itertools.islice(pieces, URGENT_PIECES):
                    deliver(piece)
                    out = out or bool(piece.size)
            if out:  # the first audio is out: the rest is not urgent
                self._priority = None
        for piece in pieces:
            deliver(piece)

    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        voice, executor = self._piper.voice, self._piper._executor
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=voice.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        loop = asyncio.get_running_loop()
        pushed = cancelled = False

        def push(audio: np.ndarray) -> None:  # on the loop
            nonlocal pushed
            if cancelled or not audio.size:
                return
            if not pushed:
                trace.mark("tts.first_audio")
            output_emitter.push(audio.tobytes())
            pushed = True

        def deliver(audio: np.ndarray) -> None:  # on the executor's thread
            loop.call_soon_threadsafe(push, audio)

        trace.mark("tts.start")
        try:
            sentences = await loop.run_in_executor(executor, voice.phonemize, self.input_text)
            for phonemes in sentences:
                # one executor job per sentence: once cancelled, no further sentence starts,
                # and the one being computed is aborted through its RunOptions
                run_options = ort.RunOptions()
                try:
                    await loop.run_in_executor(
                        executor, self._render, phonemes, run_options, deliver
                    )
                except asyncio.CancelledError:
                    run_options.terminate = True
                    cancelled = True
                    raise
        except Exception as e:  # espeak-ng or onnxruntime: retrying would fail the same way
            raise APIError(f"piper synthesis failed: {e}", retryable=False) from e
        if not pushed and self.input_text.strip():
            # nothing speakable (e.g. "..."): a short silence, which the framework requires
            output_emitter.push(bytes(2 * voice.sample_rate // 50))
        output_emitter.flush()
