"""The benchmark's configurations, each a process of its own that plays corpus items.

- `appliance`: `build_session(config, models)` over one `ModelSet`, what the daemon runs.
- `livekit` (peer 1): livekit-agents as its documentation shows it, at 1.8.9's defaults:
  `AgentSession(vad=..., stt=..., llm=..., tts=...)` and nothing else (no turn options:
  livekit picks its own audio end-of-turn model, preemptive generation on, endpointing
  0.5-3.0 s, interruptions by VAD after 0.5 s). Its own model instances, each library at
  its default threading: faster-whisper's `WhisperModel(path, compute_type="int8")` (its
  README's CPU example; the file's own float16 would run as float32 here) called with
  `transcribe()`'s defaults (beam 5), as a batch STT that livekit wraps in its
  `StreamAdapter` with the session's VAD; the Piper voice on onnxruntime's default
  threads, one whole reply sentence per synthesis (livekit cuts the text into sentences
  for a batch TTS); the LLM through livekit's OpenAI plugin (`openai.LLM(base_url=...)`,
  the documented way to a local model) against llama-cpp-python's OpenAI-compatible
  server on the original GGUF, at its default settings.
- `pipecat` (peer 2): `bench/pipecat_peer.py` in its own virtual environment
  (`scripts/setup-pipecat-peer.sh`), against the same LLM server.

A runner reads one job per line on stdin, `{"id", "turns": [wav paths], "speech_end_s":
[seconds], "out": wav path}`, plays the turns in one fresh session (each turn after the
previous reply has played), writes the session's speaker recording (sample 0 = the
session's clock origin) to `out`, and answers one line: `{"id", "rate", "out", "turns":
[{"start_s", "heard", "reply", "user_turns", ...}], "error"}`. `python -m bench.peers
serve appliance|livekit` is that runner for the first two.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import gc
import json
import logging
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import psutil
from livekit import rtc
from livekit.agents import stt, tts, utils
from livekit.agents.types import DEFAULT_API_CONNECT_OPTIONS, APIConnectOptions, NotGivenOr

from appliance.audio.files import read_audio, write_wav
from appliance.audio.pcm import mono16, resample

if TYPE_CHECKING:
    from faster_whisper import WhisperModel
    from livekit.agents import Agent, AgentSession

    from appliance.config import Config
    from appliance.plugins.piper.engine import PiperVoice

logger = logging.getLogger("appliance.bench.peers")

TURN_TIMEOUT_S = 30.0
SERVER_START_S = 180.0
PIPECAT_PYTHON = Path(".venv-pipecat/bin/python")
PIPECAT_PEER = Path("bench/pipecat_peer.py")


# -- the LLM server of both peers --


class LlamaServer:
    """llama-cpp-python's OpenAI-compatible server (`python -m llama_cpp.server`) on
    loopback, at its default settings, for the peers' LLM requests."""

    def __init__(self, gguf: Path, port: int, instructions: str) -> None:
        self.gguf, self.port, self.instructions = gguf, port, instructions
        self.url = f"http://127.0.0.1:{port}/v1"
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LlamaServer:
        cmd = [sys.executable, "-m", "llama_cpp.server", "--model", str(self.gguf)]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + SERVER_START_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"llama_cpp.server exited with {self.proc.returncode}")
            try:
                with urllib.request.urlopen(f"{self.url}/models", timeout=2):
                    return self
            except OSError:
                time.sleep(0.5)
        self.__exit__()
        raise RuntimeError(f"llama_cpp.server did not answer within {SERVER_START_S:.0f} s")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    @property
    def model(self) -> str:
        """The model name the server answers to (its model path)."""
        return str(self.gguf)

    def prime(self) -> None:
        """Leave the server's prompt cache holding the system prompt and a neutral question,
        so that no peer finds the other's last question cached (llama.cpp reuses the
        longest cached prefix)."""
        body = {
            "model": self.model,
            "messages": [
                {"role": "system", "content": self.instructions},
                {"role": "user", "content": "Hello."},
            ],
            "max_tokens": 1,
            "temperature": 0.0,
        }
        request = urllib.request.Request(
            f"{self.url}/chat/completions",
            json.dumps(body).encode(),
            {"content-type": "application/json"},
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            response.read()


# -- peer 1: livekit-agents with a batch Whisper STT and a batch Piper TTS --


class PlainWhisperSTT(stt.STT):
    """faster-whisper as a batch livekit STT: `model.transcribe(audio, language=...)` with
    the library's defaults, off the event loop."""

    def __init__(self, model: WhisperModel, language: str = "en") -> None:
        super().__init__(capabilities=stt.STTCapabilities(streaming=False, interim_results=False))
        self._model, self._language = model, language

    async def _recognize_impl(
        self,
        buffer: utils.AudioBuffer,
        *,
        language: NotGivenOr[str] = "",
        conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS,
    ) -> stt.SpeechEvent:
        frame = rtc.combine_audio_frames(buffer)
        audio = resample(mono16(frame), frame.sample_rate, 16000).astype(np.float32) / 32768.0

        def run() -> str:
            segments, _ = self._model.transcribe(audio, language=self._language)
            return "".join(s.text for s in segments).strip()

        text = await asyncio.to_thread(run)
        return stt.SpeechEvent(
            type=stt.SpeechEventType.FINAL_TRANSCRIPT,
            request_id=utils.shortuuid(),
            alternatives=[stt.SpeechData(language=self._language, text=text)],  # type: ignore[arg-type]
        )


class PlainPiperTTS(tts.TTS):
    """A Piper voice as a batch livekit TTS: each text synthesized whole, off the event loop."""

    def __init__(self, voice: PiperVoice) -> None:
        super().__init__(
            capabilities=tts.TTSCapabilities(streaming=False),
            sample_rate=voice.sample_rate,
            num_channels=1,
        )
        self.voice = voice

    def synthesize(
        self, text: str, *, conn_options: APIConnectOptions = DEFAULT_API_CONNECT_OPTIONS
    ) -> tts.ChunkedStream:
        return _PlainPiperStream(tts=self, input_text=text, conn_options=conn_options)


class _PlainPiperStream(tts.ChunkedStream):
    async def _run(self, output_emitter: tts.AudioEmitter) -> None:
        voice = self._tts.voice  # type: ignore[attr-defined]
        output_emitter.initialize(
            request_id=utils.shortuuid(),
            sample_rate=voice.sample_rate,
            num_channels=1,
            mime_type="audio/pcm",
        )
        audio = await asyncio.to_thread(voice.synthesize, self.input_text)
        output_emitter.push(audio.tobytes())
        output_emitter.flush()


@dataclass
class LivekitPeerModels:
    """Peer 1's own model instances (not the appliance's ModelSet)."""

    whisper: WhisperModel
    voice: PiperVoice
    llm_url: str
    llm_model: str


def livekit_peer_models(config: Config, llm_url: str, llm_model: str) -> LivekitPeerModels:
    """Load Whisper and the Piper voice of `config`'s model files at library defaults."""
    from faster_whisper import WhisperModel

    from appliance.plugins.piper.engine import PiperVoice

    paths = model_paths(config)
    whisper = WhisperModel(str(paths["stt"]), device="cpu", compute_type="int8")
    voice = PiperVoice(paths["tts"], Path(f"{paths['tts']}.json"), threads=0)
    return LivekitPeerModels(whisper, voice, llm_url, llm_model)


def livekit_peer_session(models: LivekitPeerModels, *, manual: bool = False) -> AgentSession:
    """Peer 1's session: 1.8.9's defaults (`manual`: push-to-talk turns, as livekit's own
    example sets them). Call inside the running event loop."""
    from livekit.agents import AgentSession, inference
    from livekit.plugins import openai

    extra: dict[str, Any] = {"turn_handling": {"turn_detection": "manual"}} if manual else {}
    return AgentSession(
        vad=inference.VAD(),
        stt=PlainWhisperSTT(models.whisper),
        llm=openai.LLM(model=models.llm_model, base_url=models.llm_url, api_key="local"),
        tts=PlainPiperTTS(models.voice),
        **extra,
    )


LIVEKIT_PEER_SETTINGS = {
    "framework": "livekit-agents 1.8.9, AgentSession(vad, stt, llm, tts), no other option",
    "turn_detection": "unset: livekit's own audio end-of-turn model (local inference)",
    "endpointing_s": "0.5 min, 3.0 max (defaults)",
    "preemptive_generation": "on (default), LLM only",
    "interruption": "VAD, 0.5 s (defaults); 3 s AEC warm-up (default)",
    "vad": "livekit.agents.inference.VAD() (Silero, local)",
    "stt": "faster-whisper WhisperModel(path, device='cpu', compute_type='int8') as its "
    "README shows for CPUs (cpu_threads 0: the library's default), transcribe(language='en') "
    "defaults (beam 5), batch: livekit's StreamAdapter",
    "llm": "livekit-plugins-openai 1.8.9 openai.LLM(base_url) to llama_cpp.server "
    "(llama-cpp-python 0.3.36, default settings: n_ctx 2048, threads cpu_count/2), the "
    "original GGUF",
    "tts": "Piper voice on onnxruntime default threads, one synthesis per sentence "
    "(livekit's sentence tokenizer for a batch TTS)",
}


APPLIANCE_SETTINGS = {
    "session": "build_session(config, models) over one ModelSet: what the daemon runs, "
    "with the config given (the embedded defaults without --config)",
}


def model_paths(config: Config) -> dict[str, Path]:
    """The verified files of `config`'s STT directory, Piper voice and original GGUF."""
    from appliance.store.disk import file_path, models_dir
    from appliance.store.integrity import require
    from appliance.store.manifest import load as load_manifest

    cfg = config.models
    root = models_dir(cfg.dir)
    manifest = load_manifest(cfg.manifest)
    entries = {i: manifest.models[i] for i in (cfg.stt, cfg.llm, cfg.tts)}
    require(entries.values(), root)

    def path(model_id: str, suffix: str) -> Path:
        entry = entries[model_id]
        return file_path(entry, entry.file(suffix).name, root)

    return {
        "stt": path(cfg.stt, "model.bin").parent,
        "llm": path(cfg.llm, ".gguf"),
        "tts": path(cfg.tts, ".onnx"),
    }


# -- the runner --


class Button(Protocol):
    """A push-to-talk button's two edges, on a started session."""

    def press(self, at: float) -> None: ...

    def release(self, at: float) -> None: ...


class DocsPushToTalk:
    """Push-to-talk as livekit-agents' own example does it: press interrupts the agent,
    clears the user turn and opens the input; release closes it and commits the turn."""

    def __init__(self, session: AgentSession) -> None:
        self.session = session
        session.input.set_audio_enabled(False)

    def press(self, at: float) -> None:
        self.session.interrupt()
        self.session.clear_user_turn()
        self.session.input.set_audio_enabled(True)

    def release(self, at: float) -> None:
        self.session.input.set_audio_enabled(False)
        self.session.commit_user_turn(transcript_timeout=10.0)


PRESS_LEAD_S = 0.2  # the button goes down this long before the user speaks


async def play_item(
    session: AgentSession,
    agent: Agent,
    turns: list[Path],
    *,
    button: Callable[[AgentSession], Button] | None = None,
    releases: list[float] | None = None,
) -> tuple[list[dict[str, Any]], np.ndarray, int, float]:
    """Play `turns` to `session`, each after the previous reply; returns per-turn records
    (start_s, heard, reply, user_turns; released_s with a button), the speaker's
    recording, its rate and the clock origin (event-loop time). With `button`, each turn
    is spoken with the button held, released `releases[i]` seconds after the turn's audio
    began."""
    from appliance.converse import greeting_played, wire
    from appliance.session.builder import end_session

    clock, mic, speaker, _, sync = wire(session, np.zeros(0, np.int16))
    records: list[dict[str, Any]] = []
    await session.start(agent, record=False)
    ptt = button(session) if button is not None else None
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(greeting_played(session), TURN_TIMEOUT_S)
        for index, path in enumerate(turns):
            before = len(session.history.items)
            record: dict[str, Any] = {}
            if ptt is not None:
                ptt.press(time.monotonic())
                await asyncio.sleep(PRESS_LEAD_S)
            mic.play(read_audio(path))
            assert mic.start_at is not None
            start = mic.start_at
            if ptt is not None and releases is not None:
                await asyncio.sleep(max(0.0, start + releases[index] - clock.now()))
                record["released_s"] = clock.now()
                ptt.release(time.monotonic())
            await asyncio.wait_for(mic.finished.wait(), TURN_TIMEOUT_S)
            deadline = loop.time() + TURN_TIMEOUT_S
            while loop.time() < deadline:
                items = session.history.items[before:]
                replied = any(i.type == "message" and i.role == "assistant" for i in items)
                if replied and session.agent_state == "listening" and not speaker.playing:
                    break
                await asyncio.sleep(0.05)
            new = [i for i in session.history.items[before:] if i.type == "message"]
            users = [i.text_content or "" for i in new if i.role == "user"]
            replies = [i.text_content or "" for i in new if i.role == "assistant"]
            records.append(
                {
                    "start_s": start,
                    **record,
                    "heard": " ".join(users),
                    "reply": " ".join(replies),
                    "user_turns": len(users),
                }
            )
    finally:
        end_session(session, "benchmark item finished")
        await session.aclose()
        await sync.aclose()
    return records, speaker.recording(until=clock.now()), speaker.rate or 16000, clock.origin


def _trace_figures(
    rec: dict[str, Any], end: float, recording: np.ndarray, rate: int, origin: float
) -> None:
    """The appliance's critical path and turn decisions for one turn (its trace marks)."""
    from appliance.converse import first_loud
    from appliance.observe import trace

    first = first_loud(recording, rate, end)
    if first is not None and (parts := trace.critical_path(origin + end, origin + first)):
        rec["breakdown_ms"] = {k: round(v * 1000, 1) for k, v in parts.items()}
    until = first if first is not None else end + TURN_TIMEOUT_S
    rec["turn_decisions"] = [
        {"at_ms": round((t - origin - end) * 1000, 1), **fields}
        for t, fields in trace.decisions_between(origin + rec["start_s"], origin + until)
    ]


async def _serve(name: str, config: Config, llm_url: str, llm_model: str) -> None:
    from livekit.agents import Agent

    from appliance.ptt.turns import PushToTalk
    from appliance.session.builder import ApplianceAgent, build_session
    from appliance.session.modelset import ModelSet

    if name == "appliance":
        models = ModelSet(config)
        models.warm()
    else:
        peer = livekit_peer_models(config, llm_url, llm_model)
        await asyncio.to_thread(peer.voice.synthesize, "Ready.")
    settings = LIVEKIT_PEER_SETTINGS if name == "livekit" else APPLIANCE_SETTINGS
    print(json.dumps({"ready": name, "settings": settings}), flush=True)
    loop = asyncio.get_running_loop()
    while line := await loop.run_in_executor(None, sys.stdin.readline):
        job = json.loads(line)
        if job == "quit":
            break
        reply: dict[str, Any] = {"id": job["id"], "out": job["out"], "error": None}
        try:
            releases = job.get("release_s")
            button: Callable[[AgentSession], Button] | None = None
            if name == "appliance":
                from bench.latency import _prime_llm

                await loop.run_in_executor(models.llm_executor, _prime_llm, models, config)
                run_config = push_to_talk_config(config) if releases else config
                session = build_session(run_config, models)
                agent: Agent = ApplianceAgent(config.agent)
                if releases:
                    button = functools.partial(_attached, PushToTalk(run_config.ptt))
            else:
                session = livekit_peer_session(peer, manual=bool(releases))
                agent = Agent(instructions=config.agent.instructions)
                if releases:
                    button = DocsPushToTalk
            turns = [Path(p) for p in job["turns"]]
            records, recording, rate, origin = await play_item(
                session, agent, turns, button=button, releases=releases
            )
            if name == "appliance" and not releases:
                for rec, end in zip(records, job.get("speech_end_s") or [], strict=False):
                    _trace_figures(rec, rec["start_s"] + end, recording, rate, origin)
            write_wav(job["out"], recording, rate)
            reply.update(rate=rate, turns=records)
        except Exception as exc:  # a failed item is reported, the runner goes on
            logger.exception("%s: item %s failed", name, job["id"])
            reply.update(error=repr(exc), turns=[])
        print(json.dumps(reply), flush=True)
        gc.collect()  # between sessions: the last one's cycles go now, not mid-item


def push_to_talk_config(config: Config) -> Config:
    """`config` with a push-to-talk button: manual turns (the button is driven directly)."""
    return config.model_copy(update={"ptt": config.ptt.model_copy(update={"backend": "evdev"})})


def _attached(ptt: Any, session: AgentSession) -> Any:
    ptt.attach(session)
    return ptt


def serve_main(argv: list[str] | None = None) -> int:
    """`python -m bench.peers serve NAME`: the runner of the appliance or peer 1."""
    from appliance import config as config_mod
    from appliance import logs

    parser = argparse.ArgumentParser(prog="python -m bench.peers")
    parser.add_argument("command", choices=["serve"])
    parser.add_argument("name", choices=["appliance", "livekit"])
    parser.add_argument("--config", default=None)
    parser.add_argument("--llm-url", default="")
    parser.add_argument("--llm-model", default="")
    args = parser.parse_args(argv)
    logs.setup(logging.WARNING)
    config = config_mod.load_or_exit(args.config)
    asyncio.run(_serve(args.name, config, args.llm_url, args.llm_model))
    return 0


# -- the harness's side of a runner --


class Runner:
    """One configuration's runner process, driven one job at a time."""

    def __init__(self, name: str, cmd: list[str], *, server: LlamaServer | None = None) -> None:
        self.name, self.server = name, server
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
        )
        ready = self._read()
        if "ready" not in ready:
            raise RuntimeError(f"{name}: runner did not start: {ready}")
        self.settings: dict[str, Any] = ready.get("settings") or {}

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        while line := self.proc.stdout.readline():
            line = line.strip()
            if line.startswith("{"):
                return dict(json.loads(line))
        raise RuntimeError(f"{self.name}: runner exited ({self.proc.poll()})")

    def run(self, job: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def pids(self) -> list[int]:
        """The runner's process and, for a peer, the LLM server's."""
        pids = [self.proc.pid]
        if self.server is not None and self.server.proc is not None:
            pids.append(self.server.proc.pid)
        return pids

    def cpu_seconds(self) -> float:
        """CPU time of the runner, its live and finished children, and the LLM server."""
        return sum(process_cpu_seconds(pid) for pid in self.pids())

    def peak_rss_mb(self) -> float:
        """Peak RSS (VmHWM) of the runner and its children, plus the LLM server's."""
        return round(sum(peak_rss_mb(pid) for pid in self.pids()), 1)

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            try:
                self.proc.stdin.write('"quit"\n')
                self.proc.stdin.flush()
                self.proc.wait(20)
            except (OSError, subprocess.TimeoutExpired):
                self.proc.kill()


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU of a process, its finished children and its live descendants."""
    try:
        proc = psutil.Process(pid)
        t = proc.cpu_times()
        total = t.user + t.system + t.children_user + t.children_system
        for child in proc.children(recursive=True):
            with contextlib.suppress(psutil.Error, OSError):
                c = child.cpu_times()
                total += c.user + c.system
        return float(total)
    except psutil.Error:
        return 0.0


def peak_rss_mb(pid: int) -> float:
    """VmHWM of a process and its live descendants, in MB."""
    try:
        procs = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.Error:
        return 0.0
    return sum(memory_mb(proc.pid)["peak"] for proc in procs)


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """A process's resident memory in MB: all of it (`rss`), its own (`anon`: heap, the
    repacked LLM weights) and mapped files (`file`: model files read through mmap, which
    the kernel may drop and read again under memory pressure), and the peak RSS (`peak`)."""
    fields = {
        "VmRSS:": "rss",
        "RssAnon:": "anon",
        "RssFile:": "file",
        "RssShmem:": "shmem",
        "VmHWM:": "peak",
    }
    out = dict.fromkeys(fields.values(), 0.0)
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            parts = line.split()
            if parts and parts[0] in fields:
                out[fields[parts[0]]] = round(int(parts[1]) / 1024, 1)
    except (OSError, ValueError, IndexError):
        pass
    return out


if __name__ == "__main__":
    raise SystemExit(serve_main())
