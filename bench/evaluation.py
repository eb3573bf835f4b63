"""`python -m bench eval`: the appliance and its peers on speech none of them was tuned on.

Every item of the corpus (`bench/eval/corpus.json`, made by `scripts/make-eval-corpus.py`:
six synthetic voices other than the appliance's, factual questions with answer keys,
arithmetic, short answers, statements, mid-sentence pauses, hesitations, dialogues) is put
to each configuration of `bench.peers` (the appliance; livekit-agents at its defaults;
Pipecat), each in a process of its own, in an order that rotates per item. A dialogue's
turns go to one session, each spoken after the previous reply has played. The microphone
delivers each 20 ms frame at the end of its interval, and every reply is heard
`OUTPUT_BUFFER_S` after the virtual card plays it (a sound card's output buffer).

Per turn: what was heard, the reply, whether it is right (the item's regexes), whether the
agent's audio began before the user's last word (premature), the response time from the
last word to the first reply sample, and whether that was over 2 s (a hold); per
configuration: percentiles with bootstrap intervals, CPU seconds per turn (the runner
process, its children and, for a peer, the LLM server), peak RSS; per peer: the
appliance's percentile ratios with paired bootstrap intervals. The human read-speech
recordings are transcribed by the appliance's Whisper alone, for the word error rate.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import logging
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.audio.files import read_audio
from appliance.config import Config
from appliance.converse import first_loud
from bench.latency import RATE, _cpu_seconds, run_record, word_error_rate
from bench.stats import interval, paired_ratio_interval, percentile

if TYPE_CHECKING:
    from faster_whisper import WhisperModel
    from livekit.agents import AgentSession

    from appliance.session.modelset import ModelSet
    from bench.peers import LlamaServer, Runner

logger = logging.getLogger("appliance.eval")

CORPUS = Path("bench/eval/corpus.json")
HOLD_S = 2.0  # a reply later than this after the last word is a hold
OUTPUT_BUFFER_S = 0.020  # a sound card's output buffer: heard this long after it is played
READ_CHUNK_S = (20.0, 29.0)  # long recordings are cut at the quietest point in this span
CONFIGS = ("appliance", "livekit", "pipecat")
PEERS = ("livekit", "pipecat")
PERCENTILES = (50, 95, 99)


@dataclass
class Turn:
    """One spoken turn of a corpus item."""

    audio: Path
    text: str
    answer_keys: list[str] | None
    reject_keys: list[str]
    speech_end_s: float
    pause_at_s: float | None = None


@dataclass
class Item:
    id: str
    set: str
    voice: str
    kind: str
    turns: list[Turn] = field(default_factory=list)


def load_corpus(path: Path, which: str = "eval") -> list[Item]:
    """The corpus items of set `which` ("eval", "tune" or "all")."""
    base = path.parent
    items = []
    for raw in json.loads(path.read_text()):
        if which != "all" and raw["set"] != which:
            continue
        specs = raw.get("turns") or [raw]
        turns = [
            Turn(
                audio=base / spec["audio"],
                text=spec["text"],
                answer_keys=spec.get("answer_keys"),
                reject_keys=spec.get("reject_keys") or [],
                speech_end_s=float(spec.get("speech_end_s") or 0.0),
                pause_at_s=spec.get("pause_at_s"),
            )
            for spec in specs
        ]
        items.append(Item(raw["id"], raw["set"], raw["voice"], raw["kind"], turns))
    return items


def graded(reply: str, turn: Turn) -> bool | None:
    """Whether `reply` is right by the turn's keys (None: not graded)."""
    if not turn.answer_keys:
        return None
    if any(re.search(key, reply, re.IGNORECASE) for key in turn.reject_keys):
        return False
    return any(re.search(key, reply, re.IGNORECASE) for key in turn.answer_keys)


def read_speech_wer(whisper: WhisperModel, beam: int, item: Item) -> dict[str, Any]:
    """Whisper alone on a human recording (cut at quiet points into < 30 s pieces)."""
    from appliance.plugins.whisper.engine import transcribe

    turn = item.turns[0]
    audio = read_audio(turn.audio).astype(np.float32) / 32768.0
    pieces, start = [], 0
    lo, hi = (int(s * RATE) for s in READ_CHUNK_S)
    frame = RATE // 10
    while len(audio) - start > hi:
        span = audio[start + lo : start + hi]
        energy = [float(np.mean(span[i : i + frame] ** 2)) for i in range(0, len(span), frame)]
        cut = start + lo + int(np.argmin(energy)) * frame + frame // 2
        pieces.append(audio[start:cut])
        start = cut
    pieces.append(audio[start:])
    heard = " ".join(transcribe(whisper, piece, "en", beam_size=beam)[0] for piece in pieces)
    return {
        "id": item.id,
        "voice": item.voice,
        "heard": heard,
        "wer": word_error_rate(turn.text, heard),
    }


def score(rec: dict[str, Any], turn: Turn, recording: np.ndarray, rate: int) -> None:
    """Fill in a turn record from the speaker's recording: `rec["start_s"]` is where the
    turn's audio began on the recording's timeline. A push-to-talk turn (`released_s`)
    is timed from the button's release instead of the last word."""
    start = rec["start_s"]
    end = rec.get("released_s", start + turn.speech_end_s)
    earliest = first_loud(recording, rate, start)
    rec["premature"] = earliest is not None and earliest + OUTPUT_BUFFER_S < end
    first = first_loud(recording, rate, end)
    heard_at = first + OUTPUT_BUFFER_S if first is not None else None
    rec["response_ms"] = round((heard_at - end) * 1000, 1) if heard_at is not None else None
    rec["hold"] = heard_at is None or heard_at - end > HOLD_S
    rec["right"] = graded(rec["reply"], turn)
    rec["wer"] = word_error_rate(turn.text, rec["heard"])


def _record(name: str, item: Item, index: int, turn: Turn) -> dict[str, Any]:
    return {
        "config": name,
        "id": item.id,
        "turn": index,
        "voice": item.voice,
        "kind": item.kind,
        "text": turn.text,
    }


async def run_item(
    name: str, models: ModelSet, config: Config, item: Item, session: AgentSession
) -> list[dict[str, Any]]:
    """One corpus item through `session` in this process (the appliance's agent); a scored
    record per turn."""
    import psutil

    from appliance.session.builder import ApplianceAgent
    from bench.peers import _trace_figures, play_item

    proc = psutil.Process()
    cpu0 = _cpu_seconds(proc)
    played, recording, rate, origin = await play_item(
        session, ApplianceAgent(config.agent), [t.audio for t in item.turns]
    )
    cpu = (_cpu_seconds(proc) - cpu0) / max(1, len(played))
    records = []
    for index, (raw, turn) in enumerate(zip(played, item.turns, strict=False)):
        rec = {**_record(name, item, index, turn), **raw, "cpu_s": round(cpu, 3)}
        _trace_figures(rec, rec["start_s"] + turn.speech_end_s, recording, rate, origin)
        score(rec, turn, recording, rate)
        records.append(rec)
    return records


def run_remote(
    runner: Runner, item: Item, workdir: Path, release: float | None = None
) -> list[dict[str, Any]]:
    """One corpus item through a configuration's runner process; a scored record per turn
    (a failed item: every turn a hold, graded turns wrong). With `release`, each turn is
    spoken with a push-to-talk button held, released `release` s after the last word."""
    out = workdir / f"{runner.name}-{item.id}.wav"
    job: dict[str, Any] = {
        "id": item.id,
        "turns": [str(t.audio.resolve()) for t in item.turns],
        "speech_end_s": [t.speech_end_s for t in item.turns],
        "out": str(out),
    }
    if release is not None:
        job["release_s"] = [t.speech_end_s + release for t in item.turns]
    if runner.server is not None:
        runner.server.prime()
    cpu0 = runner.cpu_seconds()
    reply = runner.run(job)
    cpu = (runner.cpu_seconds() - cpu0) / len(item.turns)
    played = reply.get("turns") or []
    error = reply.get("error") or (None if len(played) == len(item.turns) else "turns missing")
    recording = read_audio(out) if out.is_file() else np.zeros(0, np.int16)
    out.unlink(missing_ok=True)
    records = []
    for index, turn in enumerate(item.turns):
        rec = _record(runner.name, item, index, turn)
        if release is not None:
            rec["release_after_s"] = release
        if index < len(played):
            rec.update(played[index])
            score(rec, turn, recording, RATE)
        else:
            rec.update(
                heard="",
                reply="",
                premature=False,
                hold=True,
                response_ms=None,
                right=False if turn.answer_keys else None,
                wer=None,
            )
        rec["cpu_s"] = round(cpu, 3)
        if error:
            rec["error"] = error
        records.append(rec)
    return records


def summarise(records: list[dict[str, Any]], read: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures over every turn of one configuration, then by voice and by kind."""
    summary = _figures(records, read)
    for key in ("voice", "kind"):
        groups = sorted({r[key] for r in records})
        summary[f"by_{key}"] = {
            g: _figures([r for r in records if r[key] == g], []) for g in groups
        }
    return summary


def _figures(records: list[dict[str, Any]], read: list[dict[str, Any]]) -> dict[str, Any]:
    graded_turns = [r for r in records if r["right"] is not None]
    pauses = [r for r in records if r["kind"] == "pause"]
    times = [r["response_ms"] for r in records if r["response_ms"] is not None]
    wers = [r["wer"] for r in records if r["wer"] is not None]
    read_wers = [r["wer"] for r in read if r["wer"] is not None]
    n = len(records)
    figures: dict[str, Any] = {
        "turns": n,
        "answers_right": sum(bool(r["right"]) for r in graded_turns),
        "graded": len(graded_turns),
        "answers_right_pct": _pct(sum(bool(r["right"]) for r in graded_turns), len(graded_turns)),
        "premature": sum(r["premature"] for r in records),
        "premature_pct": _pct(sum(r["premature"] for r in records), n),
        "premature_on_pauses": sum(r["premature"] for r in pauses),
        "pause_items": len(pauses),
        "holds": sum(r["hold"] for r in records),
        "holds_pct": _pct(sum(r["hold"] for r in records), n),
        "failed_turns": sum("error" in r for r in records),
    }
    for q in PERCENTILES:
        figures[f"response_p{q}_ms"] = percentile(times, q)
        figures[f"response_p{q}_ci_ms"] = interval(times, q)
    figures.update(
        transcript_wer_pct=round(100 * float(np.mean(wers)), 1) if wers else None,
        read_speech_wer_pct=round(100 * float(np.mean(read_wers)), 1) if read_wers else None,
        cpu_s_per_turn=round(float(np.mean([r["cpu_s"] for r in records])), 3) if n else None,
    )
    return figures


def ratios(mine: list[dict[str, Any]], peer: list[dict[str, Any]]) -> dict[str, Any]:
    """Appliance / peer response-time percentiles over the turns both answered, with
    paired bootstrap intervals (the same turns drawn for both)."""
    theirs = {(r["id"], r["turn"]): r["response_ms"] for r in peer}
    pairs = [
        (r["response_ms"], theirs[(r["id"], r["turn"])])
        for r in mine
        if r["response_ms"] is not None and theirs.get((r["id"], r["turn"])) is not None
    ]
    out: dict[str, Any] = {"paired_turns": len(pairs)}
    if len(pairs) < 2:
        return out
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    for q in PERCENTILES:
        out[f"p{q}"] = round(float(np.percentile(a, q) / np.percentile(b, q)), 3)
        out[f"p{q}_ci"] = paired_ratio_interval(a, b, q)
    return out


def _pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 1) if whole else None


def _runners(
    configs: list[str],
    config_path: str | None,
    server: LlamaServer | None,
    paths: dict[str, Path],
    instructions: Path,
) -> dict[str, Runner]:
    """Start each configuration's runner (models loaded and warmed)."""
    from bench.peers import PIPECAT_PEER, PIPECAT_PYTHON, Runner

    base = [sys.executable, "-m", "bench.peers", "serve"]
    extra = ["--config", config_path] if config_path else []
    runners: dict[str, Runner] = {}
    for name in configs:
        print(f"starting {name} ...", file=sys.stderr, flush=True)
        if name == "appliance":
            runners[name] = Runner(name, [*base, "appliance", *extra])
            continue
        assert server is not None
        if name == "livekit":
            cmd = [*base, "livekit", *extra]
        else:
            cmd = [str(PIPECAT_PYTHON), str(PIPECAT_PEER), "--whisper", str(paths["stt"])]
            cmd += ["--piper", str(paths["tts"]), "--instructions-file", str(instructions)]
        cmd += ["--llm-url", server.url, "--llm-model", server.model]
        runners[name] = Runner(name, cmd, server=server)
    return runners


def variant(name: str, release: float | None) -> str:
    """The results key of a configuration, with its push-to-talk release if any."""
    return name if release is None else f"{name} ptt +{release * 1000:.0f} ms"


def _evaluate(
    runners: dict[str, Runner],
    items: list[Item],
    warmup: Item | None,
    workdir: Path,
    releases: list[float | None],
) -> dict[str, list[dict[str, Any]]]:
    names = list(runners)
    if warmup is not None:  # each runner's first item pays first-call costs: not counted
        for name in names:
            run_remote(runners[name], warmup, workdir, releases[0])
    runs = [(name, release) for release in releases for name in names]
    out: dict[str, list[dict[str, Any]]] = {variant(*run): [] for run in runs}
    for n, item in enumerate(items, 1):
        shift = n % len(runs)  # the order rotates per item
        for name, release in runs[shift:] + runs[:shift]:
            key = variant(name, release)
            records = run_remote(runners[name], item, workdir, release)
            out[key].extend(records)
            for rec in records:
                mark = {True: "right", False: "WRONG", None: "-"}[rec["right"]]
                flags = " PREMATURE" if rec["premature"] else ""
                flags += " HOLD" if rec["hold"] else ""
                flags += f" ERROR {rec['error']}" if rec.get("error") else ""
                print(
                    f"[{n}/{len(items)}] {key:9} {item.id}.{rec['turn']} {mark:5} "
                    f"{rec['response_ms'] or 0:6.0f} ms{flags}  {rec['heard']!r} -> "
                    f"{rec['reply'][:70]!r}",
                    file=sys.stderr,
                    flush=True,
                )
            time.sleep(0.2)
    return out


def run_eval(args: argparse.Namespace, config: Config) -> int:
    """`python -m bench eval`: run the corpus, write the JSON, print the summary."""
    from appliance.plugins.whisper.engine import load_model
    from appliance.store.disk import ModelError
    from bench.livekit_server import free_port
    from bench.peers import PIPECAT_PYTHON, LlamaServer, model_paths

    corpus = Path(args.corpus)
    if not corpus.is_file():
        print(
            f"error: no corpus at {corpus} (scripts/make-eval-corpus.py makes it)", file=sys.stderr
        )
        return 2
    items = load_corpus(corpus, args.set)
    if args.limit:
        items = items[: args.limit]
    if args.spread and args.spread < len(items):  # N items evenly over the set's kinds
        picks = sorted({round(float(x)) for x in np.linspace(0, len(items) - 1, args.spread)})
        items = [items[i] for i in picks]
    configs = [c for c in args.configs.split(",") if c]
    if not items or not configs or any(c not in CONFIGS for c in configs):
        print(f"error: no items, or a configuration not in {CONFIGS}", file=sys.stderr)
        return 2
    releases: list[float | None] = [None]
    if args.ptt_release:
        releases = [float(x) for x in args.ptt_release.split(",") if x]
        if "pipecat" in configs:  # Pipecat has no push-to-talk (manual) turn mode of its own
            print("note: push-to-talk: Pipecat left out (no manual turn mode)", file=sys.stderr)
            configs.remove("pipecat")
    if "pipecat" in configs and not PIPECAT_PYTHON.exists():
        print("error: no Pipecat environment: run scripts/setup-pipecat-peer.sh", file=sys.stderr)
        return 2
    try:
        paths = model_paths(config)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 78
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    read_items = [i for i in items if i.kind == "read_speech"]
    spoken = [i for i in items if i.kind != "read_speech"]
    read: list[dict[str, Any]] = []
    if read_items:
        whisper = load_model(str(paths["stt"]), threads=config.models.threads)
        read = [read_speech_wer(whisper, config.models.stt_beam_size, i) for i in read_items]
        del whisper
    tune = [i for i in load_corpus(corpus, "tune") if i.kind == "question"]
    warmup = tune[0] if tune and args.set != "tune" and not args.limit else None
    peers = [c for c in configs if c in PEERS]
    with tempfile.TemporaryDirectory(prefix="bench-eval-") as tmp, contextlib.ExitStack() as stack:
        workdir = Path(tmp)
        instructions = workdir / "instructions.txt"
        instructions.write_text(config.agent.instructions)
        server = None
        if peers:
            server = LlamaServer(paths["llm"], free_port(), config.agent.instructions)
            stack.enter_context(server)
        runners = _runners(configs, args.config, server, paths, instructions)
        for runner in runners.values():
            stack.callback(runner.close)
        records = _evaluate(runners, spoken, warmup, workdir, releases)
        rss = {name: runner.peak_rss_mb() for name, runner in runners.items()}
        settings = {name: runner.settings for name, runner in runners.items()}
    results: dict[str, Any] = {
        **run_record(started, config),
        "corpus": str(corpus),
        "set": args.set,
        "items": len(items),
        "warmup_item": warmup.id if warmup else None,
        "seconds": round(time.perf_counter() - t0, 1),
        "read_speech": read,
        "hold_s": HOLD_S,
        "output_buffer_ms": OUTPUT_BUFFER_S * 1000,
        "models": {k: str(v) for k, v in paths.items()},
        "push_to_talk_release_s": releases if args.ptt_release else None,
    }
    keys = [variant(name, release) for release in releases for name in configs]
    for release in releases:
        for name in configs:
            key = variant(name, release)
            summary = summarise(records[key], read if key == "appliance" else [])
            summary["peak_rss_mb"] = rss[name]
            results[key] = {"settings": settings.get(name) or {}, "summary": summary}
    if "appliance" in configs:
        results["ratios"] = {
            variant(peer, release): ratios(
                records[variant("appliance", release)], records[variant(peer, release)]
            )
            for release in releases
            for peer in peers
        }
    for key in keys:
        results[key]["turns"] = records[key]
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    print_table(results, keys)
    print(f"results: {out}")
    return 0


def print_table(results: dict[str, Any], configs: list[str]) -> None:
    """The configurations side by side, then the appliance's ratios to each peer."""

    def ms(s: dict[str, Any], q: int) -> str:
        value, ci = s[f"response_p{q}_ms"], s[f"response_p{q}_ci_ms"]
        if value is None:
            return "-"
        return f"{value:.0f} [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else f"{value:.0f}"

    rows: list[tuple[str, Any]] = [
        ("turns", lambda s: str(s["turns"])),
        (
            "answers right",
            lambda s: f"{s['answers_right']}/{s['graded']} ({s['answers_right_pct']}%)",
        ),
        (
            "premature (on pauses)",
            lambda s: f"{s['premature']} ({s['premature_on_pauses']}/{s['pause_items']})",
        ),
        ("holds > 2 s", lambda s: f"{s['holds']} ({s['holds_pct']}%)"),
        ("response p50 [95% CI] ms", lambda s: ms(s, 50)),
        ("response p95 [95% CI] ms", lambda s: ms(s, 95)),
        ("response p99 [95% CI] ms", lambda s: ms(s, 99)),
        ("transcript WER", lambda s: f"{s['transcript_wer_pct']}%"),
        ("CPU s per turn", lambda s: f"{s['cpu_s_per_turn']}"),
        ("peak RSS MB", lambda s: f"{s['peak_rss_mb']:.0f}"),
        ("failed turns", lambda s: str(s["failed_turns"])),
    ]
    width = 26
    print("".ljust(width) + "".join(name.ljust(24) for name in configs))
    for label, cell in rows:
        line = label.ljust(width)
        line += "".join(cell(results[name]["summary"]).ljust(24) for name in configs)
        print(line)
    for peer, r in (results.get("ratios") or {}).items():
        parts = []
        for q in PERCENTILES:
            if f"p{q}" in r:
                ci = r[f"p{q}_ci"]
                parts.append(f"p{q} {r[f'p{q}']:.2f} [{ci[0]:.2f}, {ci[1]:.2f}]")
        print(f"appliance / {peer} ({r['paired_turns']} turns): " + ", ".join(parts))
    read = results.get("read_speech") or []
    if read:
        wer = np.mean([r["wer"] for r in read if r["wer"] is not None])
        print(f"read speech WER (appliance's Whisper alone): {100 * wer:.1f}%")
