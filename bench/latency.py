"""`python -m bench latency`: the appliance's voice-to-voice latency, stage by stage.

The tuning benchmark: spoken questions synthesized with the appliance's own Piper voice
(the speech its latency work was tuned on; `python -m bench eval` measures on other
voices, against the peers), each put to `build_session(config, models)`, the session the
daemon runs. Voice-to-voice latency is read off the converse timeline: the first non-silent
reply sample after the exact end of the question's speech. Per-stage figures come from
livekit's per-message metrics and the plugins' trace marks. Results go to JSON, a summary
to stdout, optionally a PNG chart of the critical path.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import importlib.metadata
import json
import logging
import os
import platform
import re
import resource
import shlex
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from appliance.config import Config
from appliance.observe import trace
from appliance.observe.metrics import STAGES as METRIC_STAGES
from appliance.observe.metrics import stage_figures

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from appliance.session.modelset import ModelSet

logger = logging.getLogger("appliance.bench")

QUESTIONS = (
    "What is the capital of France?",
    "How many days are in a week?",
    "What color is the sky on a clear day?",
    "How many legs does a spider have?",
    "What is the boiling point of water?",
    "Which planet is closest to the sun?",
    "What do bees make?",
    "How many minutes are in an hour?",
    "What is the largest ocean on Earth?",
    "Who wrote Romeo and Juliet?",
    "What is two plus three?",
    "What language is spoken in Spain?",
)
RATE = 16000
LEAD_SILENCE_S = 0.3
SPEECH_THRESHOLD = 300  # int16 amplitude: Piper's trailing near-silence stays below it
TIMEOUT_S = 30.0
IDLE_SECONDS = 5.0
IDLE_SETTLE_S = 1.0
CONFIGS = ("appliance",)
STAGES = tuple(stage for names in METRIC_STAGES.values() for stage in names.values())

SessionFactory = Callable[[], "AgentSession"]


@dataclass
class Utterance:
    """One spoken question: 16 kHz int16 audio and where its speech ends in it."""

    text: str
    pcm: np.ndarray
    speech_end: float  # seconds from the first sample of `pcm`


def speech_end_of(pcm: np.ndarray, threshold: int = SPEECH_THRESHOLD) -> float:
    """Seconds to just after the last sample louder than `threshold` (0 if none is)."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    return (int(loud[-1]) + 1) / RATE if len(loud) else 0.0


def spoken_questions(models: ModelSet, count: int, rate: int = RATE) -> list[np.ndarray]:
    """`count` questions (cycling through QUESTIONS) spoken by the shared Piper voice, at
    `rate`, each after LEAD_SILENCE_S of silence."""
    from appliance.audio.pcm import resample

    lead = np.zeros(int(LEAD_SILENCE_S * rate), np.int16)
    voice = models.voice
    return [
        np.concatenate([lead, resample(voice.synthesize(text), voice.sample_rate, rate)])
        for text in (QUESTIONS[i % len(QUESTIONS)] for i in range(count))
    ]


def make_utterances(models: ModelSet, count: int) -> list[Utterance]:
    """The questions as Utterances (16 kHz), with where each one's speech ends."""
    return [
        Utterance(QUESTIONS[i % len(QUESTIONS)], pcm, speech_end_of(pcm))
        for i, pcm in enumerate(spoken_questions(models, count))
    ]


class LogTally(logging.Handler):
    """Counts warnings and errors logged anywhere, by bench phase, logger and message."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.phase = "load"
        self.counts: Counter[tuple[str, str, str, str]] = Counter()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().splitlines()[0][:300]
        except Exception:  # a malformed record must not break the bench
            message = str(record.msg)[:300]
        self.counts[(self.phase, record.levelname, record.name, message)] += 1

    def report(self) -> list[dict[str, Any]]:
        return [
            {"phase": p, "level": lvl, "logger": name, "message": msg, "count": n}
            for (p, lvl, name, msg), n in sorted(self.counts.items())
        ]


def _cpu_seconds(proc: psutil.Process) -> float:
    """CPU time of this process and its finished children (espeak-ng), in seconds."""
    t = proc.cpu_times()
    return t.user + t.system + t.children_user + t.children_system


def stage_seconds(metrics: list[dict[str, Any]]) -> dict[str, float | None]:
    """livekit's figures for the question's turn: its user message and the reply after it."""
    users = [i for i, m in enumerate(metrics) if m.get("role") == "user"]
    user = metrics[users[-1]] if users else {}
    after = metrics[users[-1] + 1 :] if users else metrics
    replies = [m for m in after if m.get("role") == "assistant"]
    reply = replies[0] if replies else {}
    figures = {**stage_figures("user", user), **stage_figures("assistant", reply)}
    return {stage: figures.get(stage) for stage in STAGES}


BREAKDOWN = (
    ("stt", "STT: the transcript the reply is built on", "#4e79a7"),
    ("llm_first_token", "LLM first token", "#f28e2b"),
    ("llm_first_chunk", "LLM first chunk for the TTS", "#ffbe7d"),
    ("tts_first_audio", "TTS first audio", "#59a14f"),
    ("turn_and_playout", "end-of-turn wait, playout", "#bab0ac"),
)


_WORD_RE = re.compile(r"[a-z0-9']+")


_ONES = [
    *("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"),
    *("eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen"),
    *("eighteen", "nineteen"),
]
_TENS = ["_", "_", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def _number_words(n: int) -> list[str]:
    """0-999 as spoken words ("365": three hundred sixty five)."""
    if n < 20:
        return [_ONES[n]]
    if n < 100:
        return [_TENS[n // 10]] + (_number_words(n % 10) if n % 10 else [])
    return [_ONES[n // 100], "hundred"] + (_number_words(n % 100) if n % 100 else [])


def _words(text: str) -> list[str]:
    """Lower-case words without punctuation, numbers under 1000 spelt out (Whisper writes
    "6" where the speaker said "six"), "and" after "hundred" dropped."""
    out: list[str] = []
    for word in _WORD_RE.findall(text.lower()):
        out += _number_words(int(word)) if word.isdigit() and int(word) < 1000 else [word]
    return [w for i, w in enumerate(out) if not (w == "and" and i and out[i - 1] == "hundred")]


def word_error_rate(reference: str, hypothesis: str) -> float | None:
    """Word-level edit distance / reference words (lower case, punctuation ignored,
    numbers compared as words)."""
    ref, hyp = _words(reference), _words(hypothesis)
    if not ref:
        return None
    row = list(range(len(hyp) + 1))
    for i, word in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, other in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (word != other))
    return row[-1] / len(ref)


def _heard_back(models: ModelSet, pcm: np.ndarray, rate: int) -> str:
    """The reply's audio transcribed with Whisper's full window (the garble check)."""
    from appliance.audio.pcm import resample
    from appliance.plugins.whisper.engine import transcribe

    audio = resample(pcm, rate, RATE).astype(np.float32) / 32768.0
    return transcribe(models.whisper, audio, "en", window="full")[0]


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 1)


def _prime_llm(models: ModelSet, config: Config) -> None:
    """Leave llama.cpp's KV cache holding the system prompt and a neutral question.

    llama.cpp reuses the longest cached prompt prefix, so without this the second of two
    runs of the same question would skip its prefill; now every run starts alike.
    """
    messages = [
        {"role": "system", "content": config.agent.instructions},
        {"role": "user", "content": "Hello."},
    ]
    tokens, _ = models.llama.prompt(messages, None)
    models.llama.llama.create_completion(tokens, max_tokens=1, temperature=0.0)


async def run_once(
    name: str, models: ModelSet, config: Config, utt: Utterance, factory: SessionFactory
) -> dict[str, Any]:
    """One question through one configuration; a per-run record (with `error` on failure)."""
    from appliance.converse import converse

    proc = psutil.Process()
    record: dict[str, Any] = {"config": name, "question": utt.text}
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(models.llm_executor, _prime_llm, models, config)
    session = factory()
    cpu0 = _cpu_seconds(proc)
    try:
        result = await converse(models, config, utt.pcm, session=session, timeout=TIMEOUT_S)
    except Exception as exc:  # a failed run is counted, not fatal
        logger.warning("%s run failed: %r", name, exc)
        record.update(cpu_s=round(_cpu_seconds(proc) - cpu0, 3), error=repr(exc))
        return record
    record["cpu_s"] = round(_cpu_seconds(proc) - cpu0, 3)
    record["heard"] = " ".join(i["text"] for i in result.items if i["role"] == "user")
    record["reply"] = " ".join(i["text"] for i in result.items if i["role"] == "assistant")
    end = result.input_start + utt.speech_end
    record["speech_end_s"] = round(end, 3)
    first = result.first_audio_after(end)
    earliest = result.first_audio_after(result.input_start)
    if first is None:
        record["error"] = "no reply audio after the end of speech"
        return record
    record["reply_before_end_of_speech"] = earliest is not None and earliest < end
    total = first - end
    stages = stage_seconds(result.metrics)
    parts = trace.critical_path(result.origin + end, result.origin + first)
    record["v2v_ms"] = _ms(total)
    record["stages_ms"] = {k: _ms(stages.get(k)) for k in STAGES}
    if parts:
        record["breakdown_ms"] = {k: _ms(v) for k, v in parts.items()}
    record["stt_wer"] = word_error_rate(utt.text, record["heard"])
    reply_pcm = result.reply_pcm[int(first * result.reply_rate) :]
    record["reply_heard"] = await loop.run_in_executor(
        models.stt_executor, _heard_back, models, reply_pcm, result.reply_rate
    )
    record["reply_wer"] = word_error_rate(record["reply"], record["reply_heard"])
    return record


async def idle_cpu_percent(config: Config, factory: SessionFactory, seconds: float) -> float:
    """Process CPU (percent of one core) while a started session hears `seconds` of silence."""
    from appliance.converse import wire
    from appliance.session.builder import ApplianceAgent, end_session

    session = factory()
    *_, sync = wire(session, np.zeros(RATE, np.int16))  # the mic never starts: silence
    await session.start(ApplianceAgent(config.agent), record=False)
    try:
        await asyncio.sleep(IDLE_SETTLE_S)
        while session.current_speech is not None:  # a configured greeting
            await asyncio.sleep(0.1)
        percent = await _cpu_percent(seconds)
    finally:
        end_session(session, "idle measurement finished")
        await session.aclose()
        await sync.aclose()
    return percent


async def _cpu_percent(seconds: float) -> float:
    """Process CPU, as a percentage of one core, over the next `seconds`."""
    proc = psutil.Process()
    loop = asyncio.get_running_loop()
    cpu0, t0 = _cpu_seconds(proc), loop.time()
    await asyncio.sleep(seconds)
    return round(100 * (_cpu_seconds(proc) - cpu0) / (loop.time() - t0), 1)


async def _bench(
    models: ModelSet, config: Config, utts: list[Utterance], tally: LogTally, rss: dict[str, float]
) -> tuple[dict[str, list[dict[str, Any]]], dict[str, float]]:
    """The runs and the idle figures; `rss["appliance"]` gets the peak RSS after the first
    run."""
    from appliance.session.builder import build_session

    factories: dict[str, SessionFactory] = {"appliance": lambda: build_session(config, models)}
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for i, utt in enumerate(utts):
        for name in CONFIGS:
            tally.phase = name
            rec = await run_once(name, models, config, utt, factories[name])
            rec["utterance"] = i
            runs[name].append(rec)
            if name == "appliance" and "appliance" not in rss:
                rss["appliance"] = _peak_rss_mb()
            shown = f"{rec['v2v_ms']:7.0f} ms" if "v2v_ms" in rec else "  FAILED  "
            print(
                f"[{i + 1:2}/{len(utts)}] {name:9} {shown}  {utt.text!r} -> "
                f"{rec.get('reply', rec.get('error', ''))[:60]!r}",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(0.2)  # let the closed session's last tasks finish
    idle: dict[str, float] = {}
    tally.phase = "idle"
    idle["baseline"] = await _cpu_percent(2.0)  # models loaded, no session
    for name in CONFIGS:
        tally.phase = f"idle-{name}"
        idle[name] = await idle_cpu_percent(config, factories[name], IDLE_SECONDS)
    return runs, idle


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(float(np.percentile(values, q, method="linear")), 1)


def summarise(runs: list[dict[str, Any]], idle: float, max_delay: float) -> dict[str, Any]:
    """Latency percentiles, stage medians, CPU and failures of one configuration.

    `max_delay` is the session's max_endpointing_delay: runs whose end-of-turn decision
    took (about) that long are counted, as the turn model held the turn open until then.
    """
    ok = [r for r in runs if "v2v_ms" in r]
    totals = [r["v2v_ms"] for r in ok]
    stages: dict[str, float | None] = {}
    for key in STAGES:
        vals = [r["stages_ms"][key] for r in ok if r["stages_ms"].get(key) is not None]
        stages[f"{key}_ms"] = percentile(vals, 50)
    split = [r["breakdown_ms"] for r in ok if "breakdown_ms" in r]
    parts = {k: percentile([b[k] for b in split], 50) for k, _, _ in BREAKDOWN}
    cpu = [r["cpu_s"] for r in runs if "cpu_s" in r]

    def mean_of(key: str) -> float | None:
        vals = [r[key] for r in ok if r.get(key) is not None]
        return round(float(np.mean(vals)), 4) if vals else None

    return {
        "n": len(ok),
        "failures": len(runs) - len(ok),
        "replies_before_end_of_speech": sum(1 for r in ok if r["reply_before_end_of_speech"]),
        "p50_ms": percentile(totals, 50),
        "p95_ms": percentile(totals, 95),
        "min_ms": min(totals) if totals else None,
        "max_ms": max(totals) if totals else None,
        "mean_ms": round(float(np.mean(totals)), 1) if totals else None,
        "stages": stages,
        "breakdown_p50_ms": parts,
        "stt_wer": mean_of("stt_wer"),
        "reply_wer": mean_of("reply_wer"),
        "end_of_turn_at_max_delay": sum(
            1 for r in ok if (r["stages_ms"]["end_of_turn"] or 0) >= 0.98 * max_delay * 1000
        ),
        "max_endpointing_delay_s": max_delay,
        "cpu_s": round(sum(cpu), 2),
        "cpu_s_per_run": round(sum(cpu) / len(cpu), 3) if cpu else None,
        "idle_cpu_percent": idle,
        "runs": runs,
    }


def machine_info() -> dict[str, Any]:
    """CPU, memory, OS, Python and the key library versions."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for dist in ("livekit-agents", "faster-whisper", "llama-cpp-python", "onnxruntime"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = None
    return {
        "cpu_count": os.cpu_count(),
        "cpu_model": model or platform.processor() or None,
        "arch": platform.machine(),
        "memory_mb": round(psutil.virtual_memory().total / 2**20),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": versions,
    }


def run_record(started: datetime.datetime, config: Config) -> dict[str, Any]:
    """When, how, where and with which config a benchmark ran: the head of its JSON."""
    return {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "machine": machine_info(),
        "config": config.source,
    }


def _peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    return round(peak / 1024 if sys.platform != "darwin" else peak / 2**20, 1)


def write_chart(results: dict[str, Any], path: str | Path) -> None:
    """A horizontal stacked bar per configuration: the p50 stage breakdown and p50 total."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.0), dpi=120)
    ends = []
    for name in CONFIGS:
        parts = results[name]["breakdown_p50_ms"]
        ends.append(max(sum(v or 0.0 for v in parts.values()), results[name]["p50_ms"] or 0.0))
    xmax = max(ends) * 1.24 + 1
    for row, name in enumerate(CONFIGS):
        parts = results[name]["breakdown_p50_ms"]
        left = 0.0
        for key, label, color in BREAKDOWN:
            width = max(float(parts.get(key) or 0.0), 0.0)
            ax.barh(
                row,
                width,
                left=left,
                color=color,
                edgecolor="white",
                height=0.55,
                label=label if row == 0 else None,
            )
            if width >= 0.03 * xmax:
                ax.text(left + width / 2, row, f"{width:.0f}", ha="center", va="center", fontsize=9)
            left += width
        total, p95 = results[name]["p50_ms"] or 0.0, results[name]["p95_ms"] or 0.0
        ax.plot([total, total], [row - 0.36, row + 0.36], color="black", linewidth=2)
        if abs(total - left) > 1:
            ax.plot([left, total], [row, row], color="black", linewidth=1, linestyle=":")
        ax.text(
            max(left, total) + 0.012 * xmax,
            row,
            f"p50 {total:.0f} ms\np95 {p95:.0f} ms",
            va="center",
            fontsize=10,
            fontweight="bold",
        )
    ax.set_yticks(range(len(CONFIGS)), [f"{n}\n(n={results[n]['n']})" for n in CONFIGS])
    ax.invert_yaxis()
    ax.set_xlim(0, xmax)
    ax.set_xlabel("milliseconds after the end of the user's speech")
    machine = results["machine"]
    ax.set_title(
        f"Voice-to-voice latency, p50 by stage — {results['utterances']} questions, "
        f"{machine['cpu_count']}-core {machine['cpu_model']} ({machine['arch']})",
        fontsize=11,
    )
    ax.grid(axis="x", alpha=0.3)
    waits = ", ".join(
        f"{n} {results[n]['end_of_turn_at_max_delay']}/{results[n]['n']}" for n in CONFIGS
    )
    fig.text(
        0.5,
        0.01,
        "Segments: per-run medians of each part; black tick: p50 of the total. "
        f"Runs whose end of turn waited the full max_endpointing_delay: {waits}.",
        ha="center",
        fontsize=8.5,
        color="#555555",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.26), ncol=3, fontsize=8.5, frameon=False)
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(path)
    plt.close(fig)


def _print_summary(results: dict[str, Any]) -> None:
    m = results["machine"]
    print(
        f"voice-to-voice latency, {results['utterances']} questions, "
        f"{m['cpu_count']}-core {m['cpu_model']}:"
    )
    for name in CONFIGS:
        r = results[name]
        print(
            f"  {name:9}  p50 {r['p50_ms']} ms  p95 {r['p95_ms']} ms  "
            f"(ok {r['n']}, failures {r['failures']}, CPU {r['cpu_s']} s, "
            f"idle CPU {r['idle_cpu_percent']} %)"
        )
        parts = ", ".join(f"{k} {v}" for k, v in r["breakdown_p50_ms"].items())
        print(f"             critical path p50 ms: {parts}")
        print(
            f"             word error rate: STT {r['stt_wer']}, "
            f"reply transcribed back {r['reply_wer']}"
        )
    print(
        f"  peak RSS {results['rss_appliance_mb']} MB after the first run, "
        f"{results['rss_mb']} MB at the end; "
        f"cold start {results['cold_start_s']} s, "
        f"idle CPU {results['idle_cpu_percent']} % of one core"
    )


def run_bench(args: argparse.Namespace, config: Config) -> int:
    """`python -m bench latency`: run, write `args.json_out` (and `args.chart`), print a summary."""
    count = int(args.utterances)
    if count < 1:
        print("error: --utterances must be at least 1", file=sys.stderr)
        return 2

    tally = LogTally()
    logging.getLogger().addHandler(tally)
    logging.captureWarnings(True)
    started = datetime.datetime.now(datetime.timezone.utc)

    from appliance.session.modelset import ModelSet
    from appliance.store.disk import ModelError

    t0 = time.perf_counter()
    try:
        models = ModelSet(config)
        models.warm()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        logging.getLogger().removeHandler(tally)
        logging.captureWarnings(False)
        return 78
    cold_start = time.perf_counter() - t0
    rss_loaded = psutil.Process().memory_info().rss / 2**20
    rss: dict[str, float] = {}
    try:
        utts = make_utterances(models, count)
        print(
            f"models ready in {cold_start:.1f} s; {count} questions x {len(CONFIGS)} "
            "configurations",
            file=sys.stderr,
            flush=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            runs, idle = asyncio.run(_bench(models, config, utts, tally, rss))
    finally:
        models.close()
        logging.getLogger().removeHandler(tally)
        logging.captureWarnings(False)

    results: dict[str, Any] = {
        **run_record(started, config),
        "cwd": os.getcwd(),
        "utterances": count,
        "percentile_method": "numpy.percentile, method='linear'",
        "cold_start_s": round(cold_start, 2),
        "load_times": {
            "verify_s": round(models.times.verify_s, 3),
            "load_s": models.times.load_s,
            "warm_s": round(models.times.warm_s, 3),
        },
        "rss_mb": _peak_rss_mb(),
        "rss_appliance_mb": rss.get("appliance"),
        "rss_after_load_mb": round(rss_loaded, 1),
        "idle_cpu_percent": idle["appliance"],
        "idle_baseline_cpu_percent": idle["baseline"],
        "idle_seconds": IDLE_SECONDS,
    }
    for name in CONFIGS:
        results[name] = summarise(runs[name], idle[name], config.session.max_endpointing_delay)
    a = results["appliance"]
    results["questions"] = [
        {"text": u.text, "seconds": round(len(u.pcm) / RATE, 3), "speech_end_s": u.speech_end}
        for u in utts
    ]
    results["notes"] = [
        "voice-to-voice = first reply sample louder than 300 (int16) after the last question "
        "sample louder than 300, both on the converse timeline",
        "before every run the LLM KV cache is primed with the system prompt and a neutral "
        "question, so no run reuses another's prefill of the same question",
    ]
    results["logged"] = tally.report()

    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    code = 0 if a["n"] else 1
    if args.chart:
        chart = Path(args.chart)
        chart.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_chart(results, chart)
        except ImportError:
            print("error: --chart needs matplotlib (pip install -e '.[dev]')", file=sys.stderr)
            code = 1
    _print_summary(results)
    print(f"results: {out}" + (f", chart: {args.chart}" if args.chart else ""))
    return code
