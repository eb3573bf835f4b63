"""`python -m bench eval`: conversation quality on speech the appliance was not tuned on.

Every item of the corpus (`bench/eval/corpus.json`, made by `scripts/make-eval-corpus.py`:
other voices, factual questions with answer keys, arithmetic, short answers, statements,
mid-sentence pauses, hesitations, dialogues) is put to a real AgentSession, the path
`appliance converse` takes: one model set, items in sequence, a dialogue's turns in one
session, each turn spoken after the previous reply has played. Per turn it records what
was heard, the reply, whether the reply is right (the item's regexes), whether the agent's
audio began before the user's last word (premature), the response time from the last word
to the first reply sample, and whether that was over 2 s (a hold). The human read-speech
recordings are transcribed by the appliance's Whisper alone, for the word error rate.
The stock session of `python -m bench latency` runs the same corpus beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from appliance.audio.files import read_audio
from appliance.config import Config
from appliance.converse import first_loud
from appliance.observe import trace
from bench.latency import (
    RATE,
    _cpu_seconds,
    _ms,
    _prime_llm,
    percentile,
    run_record,
    stock_session,
    word_error_rate,
)

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from appliance.session.modelset import ModelSet

logger = logging.getLogger("appliance.eval")

CORPUS = Path("bench/eval/corpus.json")
HOLD_S = 2.0  # a reply later than this after the last word is a hold
TURN_TIMEOUT_S = 30.0
READ_CHUNK_S = (20.0, 29.0)  # long recordings are cut at the quietest point in this span
CONFIGS = ("appliance", "stock")


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


def read_speech_wer(models: ModelSet, item: Item) -> dict[str, Any]:
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
    beam = models.config.models.stt_beam_size
    heard = " ".join(transcribe(models.whisper, piece, "en", beam_size=beam)[0] for piece in pieces)
    return {
        "id": item.id,
        "voice": item.voice,
        "heard": heard,
        "wer": word_error_rate(turn.text, heard),
    }


async def run_item(
    name: str, models: ModelSet, config: Config, item: Item, session: AgentSession
) -> list[dict[str, Any]]:
    """One corpus item through one session; a record per turn."""
    from appliance.converse import greeting_played, wire
    from appliance.session.builder import ApplianceAgent, end_session

    proc = psutil.Process()
    clock, mic, speaker, _, sync = wire(session, np.zeros(0, np.int16))
    records: list[dict[str, Any]] = []
    cpu0 = _cpu_seconds(proc)
    await session.start(ApplianceAgent(config.agent), record=False)
    loop = asyncio.get_running_loop()
    try:
        await asyncio.wait_for(greeting_played(session), TURN_TIMEOUT_S)
        for index, turn in enumerate(item.turns):
            before = len(session.history.items)
            pcm = read_audio(turn.audio)
            mic.play(pcm)
            assert mic.start_at is not None
            start = mic.start_at
            await asyncio.wait_for(mic.finished.wait(), TURN_TIMEOUT_S)
            deadline = loop.time() + TURN_TIMEOUT_S
            while loop.time() < deadline:
                items = session.history.items[before:]
                replied = any(i.type == "message" and i.role == "assistant" for i in items)
                if replied and session.agent_state == "listening" and not speaker.playing:
                    break
                await asyncio.sleep(0.05)
            new = session.history.items[before:]
            users = [i.text_content or "" for i in new if i.type == "message" and i.role == "user"]
            replies = [
                i.text_content or "" for i in new if i.type == "message" and i.role == "assistant"
            ]
            records.append(
                {
                    "config": name,
                    "id": item.id,
                    "turn": index,
                    "voice": item.voice,
                    "kind": item.kind,
                    "text": turn.text,
                    "heard": " ".join(users),
                    "user_turns": len(users),
                    "reply": " ".join(replies),
                    "start": start,
                    "speech_end": start + turn.speech_end_s,
                }
            )
    finally:
        end_session(session, "evaluation item finished")
        await session.aclose()
        await sync.aclose()
    recording = speaker.recording(until=clock.now())
    rate = speaker.rate or RATE
    cpu = (_cpu_seconds(proc) - cpu0) / max(1, len(records))
    for rec, turn in zip(records, item.turns, strict=False):
        _score(rec, turn, recording, rate, clock.origin)
        rec["cpu_s"] = round(cpu, 3)
    return records


def _score(
    rec: dict[str, Any], turn: Turn, recording: np.ndarray, rate: int, origin: float
) -> None:
    start, end = rec.pop("start"), rec.pop("speech_end")
    earliest = first_loud(recording, rate, start)
    rec["premature"] = earliest is not None and earliest < end
    first = first_loud(recording, rate, end)
    rec["response_ms"] = _ms(first - end) if first is not None else None
    parts = trace.critical_path(origin + end, origin + first) if first is not None else None
    if parts:
        rec["breakdown_ms"] = {k: _ms(v) for k, v in parts.items()}
    rec["hold"] = first is None or first - end > HOLD_S
    until = first if first is not None else end + TURN_TIMEOUT_S
    rec["turn_decisions"] = [
        {"at_ms": _ms(t - origin - end), **fields}
        for t, fields in trace.decisions_between(origin + start, origin + until)
    ]
    rec["right"] = graded(rec["reply"], turn)
    rec["wer"] = word_error_rate(turn.text, rec["heard"])


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
    return {
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
        "response_p50_ms": percentile(times, 50),
        "response_p95_ms": percentile(times, 95),
        "transcript_wer_pct": round(100 * float(np.mean(wers)), 1) if wers else None,
        "read_speech_wer_pct": round(100 * float(np.mean(read_wers)), 1) if read_wers else None,
        "cpu_s_per_turn": round(float(np.mean([r["cpu_s"] for r in records])), 3) if n else None,
    }


def _pct(part: int, whole: int) -> float | None:
    return round(100 * part / whole, 1) if whole else None


async def _evaluate(
    models: ModelSet, config: Config, items: list[Item], configs: list[str]
) -> dict[str, list[dict[str, Any]]]:
    from appliance.session.builder import build_session

    factories = {
        "appliance": lambda: build_session(config, models),
        "stock": lambda: stock_session(models),
    }
    out: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    loop = asyncio.get_running_loop()
    for n, item in enumerate(items, 1):
        for name in configs:
            await loop.run_in_executor(models.llm_executor, _prime_llm, models, config)
            try:
                records = await run_item(name, models, config, item, factories[name]())
            except Exception as exc:  # a failed item is counted, not fatal
                logger.warning("%s: %s failed: %r", name, item.id, exc)
                records = [
                    {
                        "config": name,
                        "id": item.id,
                        "turn": i,
                        "voice": item.voice,
                        "kind": item.kind,
                        "text": t.text,
                        "heard": "",
                        "reply": "",
                        "premature": False,
                        "hold": True,
                        "response_ms": None,
                        "right": False if t.answer_keys else None,
                        "wer": None,
                        "cpu_s": 0.0,
                        "error": repr(exc),
                    }
                    for i, t in enumerate(item.turns)
                ]
            out[name].extend(records)
            for rec in records:
                mark = {True: "right", False: "WRONG", None: "-"}[rec["right"]]
                flags = " PREMATURE" if rec["premature"] else ""
                flags += " HOLD" if rec["hold"] else ""
                print(
                    f"[{n}/{len(items)}] {name:9} {item.id}.{rec['turn']} {mark:5} "
                    f"{rec['response_ms'] or 0:6.0f} ms{flags}  {rec['heard']!r} -> "
                    f"{rec['reply'][:70]!r}",
                    file=sys.stderr,
                    flush=True,
                )
            await asyncio.sleep(0.2)
    return out


def run_eval(args: argparse.Namespace, config: Config) -> int:
    """`python -m bench eval`: run the corpus, write the JSON, print the summary."""
    from appliance.session.modelset import ModelSet
    from appliance.store.disk import ModelError

    corpus = Path(args.corpus)
    if not corpus.is_file():
        print(
            f"error: no corpus at {corpus} (scripts/make-eval-corpus.py makes it)", file=sys.stderr
        )
        return 2
    items = load_corpus(corpus, args.set)
    if args.limit:
        items = items[: args.limit]
    configs = [c for c in args.configs.split(",") if c]
    if not items or any(c not in CONFIGS for c in configs):
        print(f"error: no items, or a configuration not in {CONFIGS}", file=sys.stderr)
        return 2
    try:
        models = ModelSet(config)
        models.warm()
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 78
    started = datetime.datetime.now(datetime.timezone.utc)
    t0 = time.perf_counter()
    try:
        read = [read_speech_wer(models, i) for i in items if i.kind == "read_speech"]
        spoken = [i for i in items if i.kind != "read_speech"]
        records = asyncio.run(_evaluate(models, config, spoken, configs))
    finally:
        models.close()
    results: dict[str, Any] = {
        **run_record(started, config),
        "corpus": str(corpus),
        "set": args.set,
        "items": len(items),
        "seconds": round(time.perf_counter() - t0, 1),
        "read_speech": read,
        "hold_s": HOLD_S,
    }
    for name in configs:
        results[name] = {"summary": summarise(records[name], read), "turns": records[name]}
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1) + "\n")
    for name in configs:
        s = results[name]["summary"]
        print(
            f"{name:9}: answers right {s['answers_right']}/{s['graded']} "
            f"({s['answers_right_pct']}%), premature {s['premature']}/{s['turns']} "
            f"(on pauses {s['premature_on_pauses']}/{s['pause_items']}), holds {s['holds']} "
            f"({s['holds_pct']}%), response p50 {s['response_p50_ms']} ms p95 "
            f"{s['response_p95_ms']} ms, transcript WER {s['transcript_wer_pct']}%, read-speech "
            f"WER {s['read_speech_wer_pct']}%, CPU {s['cpu_s_per_turn']} s/turn"
        )
    print(f"results: {out}")
    return 0
