"""The local model set: verified, loaded and warmed once per process, shared by sessions.

Heavy objects (Whisper, the GGUF model, the Piper voice, the smart-turn session) live
here; each session gets light livekit plugin objects over them (built inside the running
event loop, as livekit's plugin bases require). Each model has its own one-thread
executor, so inference never runs on the event loop and two sessions queue per model
instead of oversubscribing the CPU.
"""

from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from appliance.config import Config
from appliance.native.selftest import LLAMA_TIMEOUT, start_llama
from appliance.plugins.priority import Priority
from appliance.store.disk import ModelError, cache_dir, file_path, models_dir, sha256_of
from appliance.store.integrity import TrustStore, expected_digest, require
from appliance.store.manifest import load as load_manifest

if TYPE_CHECKING:
    from livekit.agents import vad as vad_mod
    from livekit.agents.inference import VAD
    from livekit.agents.llm import ToolChoice

    from appliance.plugins.compat import StreamingTurnDetector
    from appliance.plugins.llama.llm import LlamaLLM
    from appliance.plugins.piper.tts import PiperTTS
    from appliance.plugins.shared_vad import SharedVAD
    from appliance.plugins.smart_turn.detector import WordsJudge
    from appliance.plugins.turn_text import TurnText
    from appliance.plugins.whisper.stt import WhisperSTT

logger = logging.getLogger("appliance.models")

# The hub libraries must never reach for the network on the appliance.
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")


class NativeBuildError(ModelError):
    """A native library crashed or failed its self-test on this CPU."""


@dataclass
class LoadTimes:
    verify_s: float = 0.0
    load_s: dict[str, float] = field(default_factory=dict)
    warm_s: float = 0.0
    # the process's RSS (MB) before loading and after each step: what each model costs
    rss_mb: dict[str, float] = field(default_factory=dict)


def rss_mb() -> float:
    """This process's resident set size in MB (0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0.0
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class ModelSet:
    """Everything the sessions of one process share."""

    def __init__(self, config: Config) -> None:
        from appliance.plugins.llama.engine import LocalLlama, requantized
        from appliance.plugins.piper.engine import PiperVoice, split_voice
        from appliance.plugins.whisper.engine import load_model

        self.config = config
        cfg = config.models
        self.root = models_dir(cfg.dir)
        manifest = load_manifest(cfg.manifest)
        self.entries = {model_id: manifest.models[model_id] for model_id in config.models_in_use()}
        self.times = LoadTimes()
        self.times.rss_mb["before"] = rss_mb()

        t0 = time.perf_counter()
        if cfg.verify:
            require(self.entries.values(), self.root)
        self.times.verify_s = time.perf_counter() - t0

        def path(model_id: str, suffix: str) -> Path:
            entry = self.entries[model_id]
            return file_path(entry, entry.file(suffix).name, self.root)

        def sha256(model_id: str, suffix: str) -> str:
            entry = self.entries[model_id]
            trust = TrustStore(self.root)  # the digest verification just checked
            digest = expected_digest(entry, entry.file(suffix), trust)
            return digest or sha256_of(path(model_id, suffix))  # unverified

        def timed(name: str, start: float) -> None:
            self.times.load_s[name] = round(time.perf_counter() - start, 3)
            self.times.rss_mb[name] = rss_mb()

        t = time.perf_counter()
        gguf = path(cfg.llm, ".gguf")
        if cfg.llm_requantize:
            digest = sha256(cfg.llm, ".gguf")
            gguf = requantized(gguf, digest, cfg.llm_requantize, cache_dir())
        timed("llm_requantize", t)
        # llama.cpp decodes in a child first (while Whisper loads here): a build that
        # crashes on this CPU stops the start-up with its fix instead of killing a call
        selftest = start_llama(gguf)
        t = time.perf_counter()
        self.whisper = load_model(str(path(cfg.stt, "model.bin").parent), threads=cfg.threads)
        timed("stt", t)
        t = time.perf_counter()
        checked = selftest.result(LLAMA_TIMEOUT)
        timed("llm_selftest", t)
        if not checked.ok:
            raise NativeBuildError(
                f"llama.cpp self-test on {gguf.name}: {checked.detail}; {checked.fix}"
            )
        logger.info("llama.cpp self-test: %s (%.2f s)", checked.detail, checked.seconds)
        t = time.perf_counter()
        self.llama = LocalLlama(
            str(gguf),
            n_ctx=cfg.llm_context,
            threads=cfg.llm_threads or cfg.threads,
            gpu_layers=cfg.llm_gpu_layers,
            first_threads=cfg.llm_first_threads,
        )
        timed("llm", t)
        t = time.perf_counter()
        voice = path(cfg.tts, ".onnx")
        self.voice = PiperVoice(
            voice,
            path(cfg.tts, ".onnx.json"),
            threads=cfg.threads,
            urgent_threads=cfg.tts_first_threads,
            parts=split_voice(voice, sha256(cfg.tts, ".onnx"), cache_dir()),
        )
        timed("tts", t)
        self.smart_turn = None
        if cfg.turn_model.startswith("smart-turn/") and cfg.turn_model in self.entries:
            from appliance.plugins.smart_turn.engine import SmartTurnModel

            t = time.perf_counter()
            self.smart_turn = SmartTurnModel(path(cfg.turn_model, ".onnx"), threads=1)
            timed("turn", t)

        self.priority = Priority()  # a reply's first audio renders while the LLM waits
        self.stt_executor = ThreadPoolExecutor(1, thread_name_prefix="stt")
        self.llm_executor = ThreadPoolExecutor(1, thread_name_prefix="llm")
        self.tts_executor = ThreadPoolExecutor(1, thread_name_prefix="tts")
        self.turn_executor = ThreadPoolExecutor(1, thread_name_prefix="turn")

    def warm(self) -> None:
        """Run each model once so the first conversation pays no first-call costs."""
        from appliance.plugins.whisper.engine import transcribe

        t = time.perf_counter()
        transcribe(self.whisper, np.zeros(16000, np.float32), "en")
        self.llama.warm()
        if self.config.agent.greeting:  # rendered once, played from memory at every call
            self.voice.rendered(self.config.agent.greeting)
        else:
            self.voice.synthesize("Ready.")
        if self.smart_turn is not None:
            self.smart_turn.predict(np.zeros(16000, np.int16))
        self.times.warm_s = time.perf_counter() - t
        self.times.rss_mb["warm"] = rss_mb()

    # -- per-session plugin objects (call inside the running event loop) --

    def vad(self) -> VAD:
        from livekit.agents import inference

        return inference.VAD(model="silero")

    def stt(
        self,
        *,
        vad: vad_mod.VAD | None = None,
        window: str | None = None,
        segment: bool = True,
        turn_text: TurnText | None = None,
    ) -> WhisperSTT:
        """Whisper STT for one session, segmenting speech with `vad` (a `SharedVAD` that
        the session also runs, or a VAD of its own), or one segment per flush without it or
        with `segment=False` (then the VAD only times the preflight, and interim transcripts
        come every [models] stt_interim_manual seconds: push-to-talk).
        `window` ("fit" or "full") overrides [models] stt_window."""
        from appliance.plugins.whisper.stt import WhisperSTT

        return WhisperSTT(
            self.whisper,
            self.stt_executor,
            vad=vad,
            model_name=self.config.models.stt.split("/", 1)[1],
            interim_interval=(
                self.config.models.stt_interim_interval
                if segment
                else self.config.models.stt_interim_manual
            ),
            window=window or self.config.models.stt_window,
            preflight_after=self.config.models.stt_preflight if vad is not None else 0.0,
            segment=segment,
            turn_text=turn_text,
            beam_size=self.config.models.stt_beam_size,
        )

    def llm(self, tool_choice: ToolChoice | None = None) -> LlamaLLM:
        from appliance.plugins.llama.llm import LlamaLLM

        cfg = self.config.models
        return LlamaLLM(
            self.llama,
            self.llm_executor,
            model_name=cfg.llm.split("/", 1)[1],
            max_tokens=cfg.llm_max_tokens,
            temperature=cfg.llm_temperature,
            tool_choice=tool_choice,
            priority=self.priority,
        )

    def tts(self, *, chunks: str | None = None) -> PiperTTS:
        """`chunks` ("clause" or "sentence") overrides [models] tts_chunks."""
        from appliance.plugins.piper.tts import PiperTTS

        return PiperTTS(
            self.voice,
            model_name=self.config.models.tts.split("/", 1)[1],
            executor=self.tts_executor,
            clauses=(chunks or self.config.models.tts_chunks) == "clause",
            priority=self.priority,
        )

    def turn_detector(
        self,
        name: str | None = None,
        *,
        vad: SharedVAD | None = None,
        words: WordsJudge | None = None,
    ) -> StreamingTurnDetector:
        """An end-of-turn model: `name`, or [models] turn_model. Given the session's `vad`,
        smart-turn starts each prediction at the first dip of its probability after speech;
        given `words`, the LLM's reading of the transcript may overrule it."""
        name = name or self.config.models.turn_model
        if name.startswith("smart-turn/"):
            from appliance.plugins.smart_turn.detector import SmartTurnDetector

            if self.smart_turn is None:
                raise ModelError(f"{name} was not loaded by this model set")
            return SmartTurnDetector(
                self.smart_turn, executor=self.turn_executor, vad=vad, words=words
            )
        from livekit.agents import inference

        return inference.TurnDetector(version="v1-mini")

    def close(self) -> None:
        for executor in (
            self.stt_executor,
            self.llm_executor,
            self.tts_executor,
            self.turn_executor,
        ):
            executor.shutdown(wait=False, cancel_futures=True)
        self.voice.close()
