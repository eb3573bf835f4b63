"""`python -m bench ptt`: push-to-talk release to first agent audio, in the simulated room.

The kiosk runs as `appliance run` would (USB bridge through PortAudio into the simulated
PulseAudio room, real models, manual turns from `PushToTalk`). For each question the
button is pressed, the question (Piper voice) is spoken into the room's microphone, and
the button is released 0.1 s after the speech ends, as a user would. The figure is the time
from the release to the first loud sample of the reply leaving the simulated speaker, so
it includes the simulated card's output buffering (`bench-audio`: about 40 ms).

`--compare-interims` asks each question twice in the one session, without and with
interim transcripts while the button is held (`[models] stt_interim_manual`, which also
prefill the LLM), in alternating order, and reports both.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.config import Config
from bench.latency import QUESTIONS, run_record, spoken_questions, stage_seconds
from bench.usb_audio import LOUD, RATE, percentiles

if TYPE_CHECKING:
    from appliance.session.modelset import ModelSet
    from bench.room_sim import Room

RELEASE_AFTER_S = 0.1  # users let go a little after their last word
TIMEOUT_S = 30.0


async def _ask(room: Room, ptt: Any, session: Any, pcm: np.ndarray) -> dict[str, Any]:
    """One push-to-talk turn; the release-to-first-audio latency and livekit's stages."""
    items_before = len(session.history.items)
    ptt.edge(True, time.monotonic())
    await asyncio.sleep(0.2)
    room.say(pcm)
    speech_end = np.flatnonzero(np.abs(pcm.astype(np.int32)) > LOUD)[-1] / RATE
    await asyncio.sleep(speech_end + RELEASE_AFTER_S)
    start = len(room.played) // 2
    released = time.monotonic()
    ptt.edge(False, released)
    first: float | None = None
    deadline = released + TIMEOUT_S
    while time.monotonic() < deadline:
        played = room.played_pcm(start)
        loud = np.flatnonzero(np.abs(played.astype(np.int32)) > LOUD)
        if first is None and len(loud):
            first = room.time_of_sample(start + int(loud[0]))
        if first is not None and session.agent_state == "listening":
            break
        await asyncio.sleep(0.05)
    new = session.history.items[items_before:]
    metrics = [
        {"role": i.role, **dict(i.metrics)}
        for i in new
        if getattr(i, "role", None) in ("user", "assistant") and getattr(i, "metrics", None)
    ]
    heard = [i.text_content for i in new if getattr(i, "role", None) == "user"]
    reply = [i.text_content for i in new if getattr(i, "role", None) == "assistant"]
    stages = {
        k: (round(v * 1000, 1) if v is not None else None)
        for k, v in stage_seconds(metrics).items()
    }
    return {
        "release_to_audio_ms": round((first - released) * 1000, 1) if first else None,
        "heard": heard[0] if heard else "",
        "reply": reply[0] if reply else "",
        "stages_ms": stages,
    }


async def _bench(
    models: ModelSet,
    config: Config,
    questions: list[np.ndarray],
    room: Room,
    variants: tuple[str, ...] = ("default",),
) -> list[dict[str, Any]]:
    """Each question once per variant (alternating order): "default", or "no interims" /
    "interims" (the session's STT without and with interim transcripts while held)."""
    from appliance.ptt.turns import PushToTalk
    from appliance.usb.audio import UsbAudio
    from appliance.usb.kiosk import serve_usb

    stop = asyncio.Event()
    usb = UsbAudio(config.audio)
    usb.start()
    ptt = PushToTalk(config.ptt)
    sessions: list[Any] = []
    kiosk = asyncio.create_task(
        serve_usb(lambda: config, models, stop, usb=usb, on_session=sessions.append, ptt=ptt)
    )
    runs = []
    try:
        if not await usb.wait_connected(10):
            raise RuntimeError("the simulated room's devices did not open")
        while not sessions:
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        interval = config.models.stt_interim_manual
        for n, pcm in enumerate(questions):
            for variant in variants if n % 2 == 0 else variants[::-1]:
                session = sessions[-1].session
                if variant != "default":
                    session.stt.interim_interval = interval if variant == "interims" else 0.0
                run = await _ask(room, ptt, session, pcm)
                run["question"] = QUESTIONS[n % len(QUESTIONS)]
                run["variant"] = variant
                runs.append(run)
                print(
                    f"  {variant}: {run['question']!r}: {run['release_to_audio_ms']} ms",
                    file=sys.stderr,
                )
                await asyncio.sleep(0.5)
    finally:
        stop.set()
        await asyncio.wait_for(kiosk, 30)
        usb.close()
    return runs


def run_bench_ptt(args: argparse.Namespace, config: Config) -> int:
    """Measure, write `args.json_out`, print a summary."""
    from appliance.session.modelset import ModelSet
    from bench.room_sim import available, simulated_room

    if not available():
        print("error: bench-ptt needs pulseaudio (apt-get install pulseaudio)", file=sys.stderr)
        return 1
    config = config.model_copy(
        update={
            "audio": config.audio.model_copy(update={"enabled": True}),
            "ptt": config.ptt.model_copy(update={"backend": "evdev"}),  # driven directly
        }
    )
    started = datetime.datetime.now(datetime.timezone.utc)
    models = ModelSet(config)
    models.warm()
    questions = spoken_questions(models, args.utterances)
    variants = ("no interims", "interims") if args.compare_interims else ("default",)
    try:
        with simulated_room() as room:
            runs = asyncio.run(_bench(models, config, questions, room, variants))
    finally:
        models.close()
    figures = {v: _summary([r for r in runs if r["variant"] == v]) for v in variants}
    results: dict[str, Any] = {
        **run_record(started, config),
        "release_after_speech_s": RELEASE_AFTER_S,
        **(figures["default"] if not args.compare_interims else {"variants": figures}),
        "runs": runs,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for variant, figure in figures.items():
        latency = figure["release_to_first_audio_ms"]
        print(
            f"push-to-talk release to first audio ({variant}), {latency['n']} questions: "
            f"p50 {latency['p50']} ms, p95 {latency['p95']} ms (failures {figure['failures']})"
        )
        print(f"  stage p50 ms: {figure['stages_p50_ms']}")
    print(f"results: {out}")
    return 0 if all(f["release_to_first_audio_ms"]["n"] for f in figures.values()) else 1


def _summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """p50/p95 of the release-to-audio figure and each stage's p50, for some runs."""
    latencies = [r["release_to_audio_ms"] for r in runs if r["release_to_audio_ms"] is not None]
    stage_names = list(runs[0]["stages_ms"]) if runs else []
    stages = {
        name: percentiles([r["stages_ms"][name] for r in runs if r["stages_ms"][name] is not None])[
            "p50"
        ]
        for name in stage_names
    }
    return {
        "release_to_first_audio_ms": percentiles(latencies),
        "failures": len(runs) - len(latencies),
        "stages_p50_ms": stages,
    }
