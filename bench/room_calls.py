"""`python -m bench room`: what LiveKit adds to a phone call, side by side in one run.

The same calls as `python -m bench sip` (our own SIP stack as the callers, Piper's voice
asking the bench questions), made three ways to a real LiveKit site on loopback (Redis,
livekit-server, LiveKit SIP: `bench.livekit_server.Deployment`):

- `direct`: to the appliance's own SIP stack;
- `room`: the same, with `[livekit]` bridging each call into a room (the caller's audio
  goes appliance -> server -> agent, the reply agent -> server -> caller);
- `trunk`: to LiveKit SIP, whose dispatch rule puts each call in a room and dispatches it
  to the appliance in `[livekit] mode = "worker"`.

For 1 and 2 simultaneous calls, the modes in alternating order per level: INVITE to 200 OK
and answer to greeting (call set-up), voice-to-voice p50/p95 with bootstrap 95 % intervals,
each mode's ratio to direct with its interval, and CPU seconds per call for the appliance's
process (callers included, the same in every mode) and for each LiveKit process.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.config import Config, LivekitConfig
from bench.latency import QUESTIONS, run_record, spoken_questions
from bench.livekit_server import Deployment, free_port
from bench.sip_calls import RATE, call_level
from bench.stats import interval, ratio_interval

if TYPE_CHECKING:
    from appliance.observe.events import SessionInfo
    from appliance.session.modelset import ModelSet

AGENT_NAME = "bench-agent"


MODES = ("direct", "room", "trunk")


async def _run_mode(
    models: ModelSet,
    config: Config,
    questions: list[np.ndarray],
    n: int,
    per_call: int,
    mode: str,
    site: Deployment,
) -> dict[str, Any]:
    """One level in one mode: `direct` and `room` call the appliance's own SIP stack;
    `trunk` calls LiveKit SIP, whose dispatch rule sends each call to the appliance as a
    worker."""
    from appliance.service import Service
    from appliance.sip.ua import UserAgent
    from appliance.systemd import Notifier

    port = free_port()
    sip = config.sip.model_copy(
        update={"enabled": mode != "trunk", "listen": "127.0.0.1", "port": port, "max_calls": n}
    )
    livekit = (
        config.livekit.model_copy(update={"max_sessions": n}) if mode == "trunk" else config.livekit
    )
    conversations: list[SessionInfo] = []

    class Watched(Service):
        def _session_started(self, conv: SessionInfo) -> None:
            conversations.append(conv)
            super()._session_started(conv)

    service = Watched(
        config.model_copy(update={"sip": sip, "livekit": livekit}),
        None,
        notifier=Notifier({}),
        models=models,
    )
    daemon = asyncio.create_task(service.run())
    appliance = None
    if mode == "trunk":
        while service.worker is None:
            await asyncio.sleep(0.02)
        await asyncio.wait_for(service.worker.registered.wait(), 30)
        target = f"sip:agent@127.0.0.1:{site.sip.sip_port}"
    else:
        while service.sip_ready is None or not service.sip_ready.done():
            await asyncio.sleep(0.02)
        appliance = service.sip_ready.result()
        target = f"sip:agent@127.0.0.1:{port}"
    caller_sip = sip.model_copy(update={"enabled": True, "port": 0, "rtp_ports": (40000, 41000)})
    caller = UserAgent(caller_sip, lambda c: None)
    await caller.start()
    cpu0 = time.process_time()
    site0 = site.cpu_s()
    try:
        result = await call_level(appliance, caller, target, n, questions, per_call)
    finally:
        cpu = time.process_time() - cpu0
        site_cpu = {k: v - site0.get(k, 0.0) for k, v in site.cpu_s().items()}
        await caller.stop()
        service.request_stop("bench done")
        await daemon
    # each call's modes, in order: ["room"] is a call that was in the room from start to end
    modes = [[m for _, m in c.room.switches] if c.room else ["direct"] for c in conversations]
    v2v = result.pop("voice_to_voice_samples_ms")
    return {
        **result,
        "voice_to_voice_samples_ms": v2v,
        "voice_to_voice_p50_ci_ms": interval(v2v, 50),
        "voice_to_voice_p95_ci_ms": interval(v2v, 95),
        "appliance_cpu_s_per_call": round(cpu / n, 2),
        "livekit_cpu_s_per_call": {k: round(v / n, 2) for k, v in site_cpu.items()},
        "room_modes": modes if mode != "trunk" else None,
    }


async def _bench(
    models: ModelSet, config: Config, questions: list[np.ndarray], levels: list[int], per_call: int
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp:
        site = Deployment(Path(tmp) / "site", AGENT_NAME)
        site.start()
        try:
            await site.configure()
            secret = Path(tmp) / "secret"
            secret.write_text(site.server.secret)
            base = dict(url=site.server.url, api_key=site.server.key, api_secret_file=str(secret))
            room = LivekitConfig(
                enabled=True, room="bench-{call_id}", join_wait=10.0, sources=["sip"], **base
            )
            worker = LivekitConfig(enabled=True, mode="worker", agent_name=AGENT_NAME, **base)
            configs = {
                "direct": config,
                "room": config.model_copy(update={"livekit": room}),
                "trunk": config.model_copy(update={"livekit": worker}),
            }
            results = []
            for i, n in enumerate(levels):
                order = list(MODES) if i % 2 == 0 else list(reversed(MODES))
                level: dict[str, Any] = {"calls": n}
                for mode in order:
                    print(f"  {n} call(s), {mode}...", file=sys.stderr, flush=True)
                    level[mode] = await _run_mode(
                        models, configs[mode], questions, n, per_call, mode, site
                    )
                    await asyncio.sleep(1.0)
                direct = level["direct"]["voice_to_voice_samples_ms"]
                for mode in ("room", "trunk"):
                    other = level[mode]["voice_to_voice_samples_ms"]
                    if direct and other:
                        level[f"{mode}_over_direct_p50"] = round(
                            float(np.median(other) / np.median(direct)), 3
                        )
                        level[f"{mode}_over_direct_p50_ci"] = ratio_interval(other, direct)
                        level[f"{mode}_minus_direct_p50_ms"] = round(
                            float(np.median(other) - np.median(direct)), 1
                        )
                results.append(level)
            return results
        finally:
            site.stop()


def run_bench_room(args: argparse.Namespace, config: Config) -> int:
    from appliance.session.modelset import ModelSet

    started = datetime.datetime.now(datetime.timezone.utc)
    if not config.agent.greeting:  # the answer-to-greeting figure needs one
        agent = config.agent.model_copy(update={"greeting": "Hello, how can I help you?"})
        config = config.model_copy(update={"agent": agent})
    config = config.model_copy(
        update={
            "audio": config.audio.model_copy(update={"enabled": False}),
            "http": config.http.model_copy(update={"enabled": False}),
        }
    )
    models = ModelSet(config)
    models.warm()
    questions = spoken_questions(models, len(QUESTIONS), RATE)
    levels = [int(n) for n in args.calls.split(",")]
    try:
        results = asyncio.run(_bench(models, config, questions, levels, args.turns))
    finally:
        models.close()
    summary = {
        **run_record(started, config),
        "turn_detection": config.turn_detection,
        "questions_per_call": args.turns,
        "levels": results,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for level in results:
        for mode in MODES:
            r = level[mode]
            v2v = r["voice_to_voice_ms"]
            print(
                f"{level['calls']} call(s) {mode:6}: INVITE->200 p50 "
                f"{r['invite_to_200_ms']['p50']} ms, answer->greeting p50 "
                f"{r['answer_to_greeting_ms']['p50']} ms, voice-to-voice p50 {v2v['p50']} ms "
                f"{r['voice_to_voice_p50_ci_ms']} / p95 {v2v['p95']} ms "
                f"{r['voice_to_voice_p95_ci_ms']} (n {v2v['n']}, failures {r['failures']}), "
                f"CPU per call: appliance {r['appliance_cpu_s_per_call']} s, "
                f"LiveKit {r['livekit_cpu_s_per_call']}"
            )
        for mode in ("room", "trunk"):
            print(
                f"{level['calls']} call(s): {mode}/direct p50 "
                f"{level.get(f'{mode}_over_direct_p50')} {level.get(f'{mode}_over_direct_p50_ci')}"
                f" (+{level.get(f'{mode}_minus_direct_p50_ms')} ms)"
            )
    print(f"results: {out}")
    return 0
