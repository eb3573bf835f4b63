"""`python -m bench barge-in`: how fast the agent stops talking when the user talks over it.

The agent says a long announcement; some seconds into its playback a short spoken phrase
(Piper voice) starts on the microphone. The figure is the time from the phrase's first
loud sample to the moment playback stops (paused or cut), both on the converse timeline
(`fileaudio.RecordingAudioOutput` is a virtual sound card with an exact clock, so no card
buffering is included). Each phrase is put to the appliance's session (one `ModelSet`)
and to livekit-agents at its defaults (`bench.peers`, its own model instances and the
peers' LLM server), interleaved, in one process.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.config import Config
from bench.latency import RATE, SPEECH_THRESHOLD, run_record
from bench.usb_audio import percentiles

if TYPE_CHECKING:
    from appliance.session.modelset import ModelSet
    from bench.peers import LivekitPeerModels

CONFIGS = ("appliance", "livekit")

ANNOUNCEMENT = (
    "Here is a longer announcement from the kiosk. The museum opens at nine in the morning "
    "and closes at six in the evening. Guided tours start every hour from the main hall, "
    "and the cafe on the first floor serves lunch until three."
)
PHRASES = (
    "Wait, stop please.",
    "Sorry, I have another question.",
    "Hold on a second.",
    "No, that is not what I asked.",
    "Excuse me, where is the exit?",
)
# Into the announcement's playback: past livekit's default 3 s AEC warm-up, during which
# the peer ignores the user (the appliance has none without local echo cancelling).
BARGE_IN_AFTER_S = 3.5
WAIT_S = 6.0  # after the phrase starts: time for the session to decide it was interrupted


def speech_start_of(pcm: np.ndarray, threshold: int = SPEECH_THRESHOLD) -> float:
    """Seconds to the first sample louder than `threshold`."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    return int(loud[0]) / RATE if len(loud) else 0.0


async def barge_in_once(
    models: ModelSet,
    peer: LivekitPeerModels | None,
    config: Config,
    name: str,
    phrase: str,
    pcm: np.ndarray,
) -> dict[str, Any]:
    """One announcement talked over by `pcm`; the reaction time and what became of it."""
    from livekit.agents import Agent

    from appliance.converse import greeting_played, wire
    from appliance.session.builder import ApplianceAgent, build_session, end_session
    from bench.peers import livekit_peer_session

    agent: Agent
    if name == "appliance":
        session, agent = build_session(config, models), ApplianceAgent(config.agent)
    else:
        assert peer is not None, "the livekit configuration needs its models"
        session, agent = livekit_peer_session(peer), Agent(instructions=config.agent.instructions)
    _, mic, speaker, events, sync = wire(session, pcm)
    loop = asyncio.get_running_loop()
    await session.start(agent, record=False)
    try:
        await greeting_played(session)
        handle = session.say(ANNOUNCEMENT)
        deadline = loop.time() + 20
        while not speaker.playing and loop.time() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(BARGE_IN_AFTER_S)
        mic.start()
        assert mic.start_at is not None
        onset = mic.start_at + speech_start_of(pcm)
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(handle.wait_for_playout()), WAIT_S)
        stop = next((t for t in speaker.stops if t >= onset), None)
        heard = [
            e.transcript for e in events.of("user_input_transcribed") if e.is_final and e.transcript
        ]
        return {
            "config": name,
            "phrase": phrase,
            "reaction_ms": round((stop - onset) * 1000, 1) if stop is not None else None,
            "interrupted": handle.interrupted,
            "paused_or_cut": len(speaker.stops),
            "heard": " ".join(heard),
        }
    finally:
        end_session(session, "barge-in measurement finished")
        await session.aclose()
        await sync.aclose()


async def _bench(
    models: ModelSet, peer: LivekitPeerModels, config: Config, phrases: list[tuple[str, np.ndarray]]
) -> dict[str, list[dict[str, Any]]]:
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in CONFIGS}
    for i, (phrase, pcm) in enumerate(phrases):
        for name in CONFIGS if i % 2 == 0 else CONFIGS[::-1]:
            run = await barge_in_once(models, peer, config, name, phrase, pcm)
            runs[name].append(run)
            print(
                f"[{i + 1:2}/{len(phrases)}] {name:9} {run['reaction_ms']} ms "
                f"interrupted={run['interrupted']} {phrase!r}",
                file=sys.stderr,
                flush=True,
            )
            await asyncio.sleep(0.2)
    return runs


def run_bench_barge_in(args: argparse.Namespace, config: Config) -> int:
    """Measure, write `args.json_out`, print a summary."""
    from appliance.audio.pcm import resample
    from appliance.session.modelset import ModelSet
    from bench.livekit_server import free_port
    from bench.peers import LIVEKIT_PEER_SETTINGS, LlamaServer, livekit_peer_models, model_paths

    if args.utterances < 1:
        print("error: --utterances must be at least 1", file=sys.stderr)
        return 2
    started = datetime.datetime.now(datetime.timezone.utc)
    models = ModelSet(config)
    try:
        models.warm()
        voice = models.voice
        texts = [PHRASES[i % len(PHRASES)] for i in range(args.utterances)]
        phrases = [
            (text, resample(voice.synthesize(text), voice.sample_rate, RATE)) for text in texts
        ]
        gguf = model_paths(config)["llm"]
        with LlamaServer(gguf, free_port(), config.agent.instructions) as server:
            peer = livekit_peer_models(config, server.url, server.model)
            runs = asyncio.run(_bench(models, peer, config, phrases))
    finally:
        models.close()
    results: dict[str, Any] = {
        **run_record(started, config),
        "barge_in_after_s": BARGE_IN_AFTER_S,
        "what": "first loud sample of the user's phrase to the agent's playback pausing or "
        "being cut, on the converse timeline",
        "livekit_settings": LIVEKIT_PEER_SETTINGS,
    }
    for name in CONFIGS:
        reactions = [r["reaction_ms"] for r in runs[name] if r["reaction_ms"] is not None]
        results[name] = {
            "reaction_ms": percentiles(reactions),
            "interrupted": sum(1 for r in runs[name] if r["interrupted"]),
            "not_stopped": sum(1 for r in runs[name] if r["reaction_ms"] is None),
            "runs": runs[name],
        }
    a, s = results["appliance"]["reaction_ms"], results["livekit"]["reaction_ms"]
    results["ratio_p50"] = round(a["p50"] / s["p50"], 3) if a["p50"] and s["p50"] else None
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    for name in CONFIGS:
        r = results[name]
        print(
            f"{name}: barge-in reaction p50 {r['reaction_ms']['p50']} ms, "
            f"p95 {r['reaction_ms']['p95']} ms over {r['reaction_ms']['n']}; "
            f"interrupted {r['interrupted']}, never stopped {r['not_stopped']}"
        )
    print(f"ratio p50 {results['ratio_p50']}; results: {out}")
    return 0 if a["n"] else 1
