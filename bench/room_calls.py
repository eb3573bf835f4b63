"""`python -m bench room`: what a LiveKit room adds to a phone call, side by side in one run.

The same calls as `python -m bench sip` (our own SIP stack as the callers, Piper's voice
asking the bench questions), once straight to the appliance ("direct") and once with
`[livekit]` bridging every call into a room on a real livekit-server on loopback
(`bench.livekit_server`): the caller's audio then goes appliance -> server -> agent and the
reply agent -> server -> caller. For 1 and 2 simultaneous calls, in alternating order
(direct first at one level, room first at the next): voice-to-voice p50/p95 with bootstrap
95 % intervals, the room/direct ratio of the p50 with its interval, and CPU seconds per
call for the appliance's process (callers included, the same in both modes) and for the
server.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from appliance.config import Config, LivekitConfig
from bench.latency import QUESTIONS, run_record, spoken_questions
from bench.livekit_server import LiveKitServer
from bench.sip_calls import RATE, _free_port, _level

if TYPE_CHECKING:
    from appliance.observe.events import SessionInfo
    from appliance.session.modelset import ModelSet

BOOTSTRAP = 2000


def interval(values: list[float], pct: float, seed: int = 0) -> list[float] | None:
    """Bootstrap 95 % interval of the `pct` percentile of `values`."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    stats = np.percentile(rng.choice(data, (BOOTSTRAP, len(data))), pct, axis=1)
    return [round(float(v), 1) for v in np.percentile(stats, [2.5, 97.5])]


def ratio_interval(a: list[float], b: list[float], seed: int = 0) -> list[float] | None:
    """Bootstrap 95 % interval of median(a) / median(b)."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    ma = np.median(rng.choice(np.asarray(a), (BOOTSTRAP, len(a))), axis=1)
    mb = np.median(rng.choice(np.asarray(b), (BOOTSTRAP, len(b))), axis=1)
    return [round(float(v), 3) for v in np.percentile(ma / mb, [2.5, 97.5])]


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _run_mode(
    models: ModelSet,
    config: Config,
    questions: list[np.ndarray],
    n: int,
    per_call: int,
    server: LiveKitServer | None,
) -> dict[str, Any]:
    from appliance.service import Service
    from appliance.sip.ua import UserAgent
    from appliance.systemd import Notifier

    port = _free_port()
    sip = config.sip.model_copy(
        update={"enabled": True, "listen": "127.0.0.1", "port": port, "max_calls": n}
    )
    conversations: list[SessionInfo] = []

    class Watched(Service):
        def _session_started(self, conv: SessionInfo) -> None:
            conversations.append(conv)
            super()._session_started(conv)

    service = Watched(
        config.model_copy(update={"sip": sip}), None, notifier=Notifier({}), models=models
    )
    daemon = asyncio.create_task(service.run())
    while service.sip_ready is None or not service.sip_ready.done():
        await asyncio.sleep(0.02)
    appliance = service.sip_ready.result()
    caller = UserAgent(
        sip.model_copy(update={"port": 0, "rtp_ports": (40000, 41000)}), lambda c: None
    )
    await caller.start()
    cpu0 = time.process_time()
    server0 = _cpu_s(server.proc.pid) if server and server.proc else 0.0
    try:
        result = await _level(appliance, caller, port, n, questions, per_call)
    finally:
        cpu = time.process_time() - cpu0
        server_cpu = (_cpu_s(server.proc.pid) - server0) if server and server.proc else 0.0
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
        "server_cpu_s_per_call": round(server_cpu / n, 2) if server else None,
        "room_modes": modes,
    }


async def _bench(
    models: ModelSet, config: Config, questions: list[np.ndarray], levels: list[int], per_call: int
) -> list[dict[str, Any]]:
    with tempfile.TemporaryDirectory() as tmp, LiveKitServer(Path(tmp)) as server:
        secret = Path(tmp) / "secret"
        secret.write_text(server.secret)
        livekit = LivekitConfig(
            enabled=True,
            url=server.url,
            api_key=server.key,
            api_secret_file=str(secret),
            room="bench-{call_id}",
            join_wait=10.0,
            sources=["sip"],
        )
        configs = {"direct": config, "room": config.model_copy(update={"livekit": livekit})}
        results = []
        for i, n in enumerate(levels):
            order = ["direct", "room"] if i % 2 == 0 else ["room", "direct"]
            level: dict[str, Any] = {"calls": n}
            for mode in order:
                print(f"  {n} call(s), {mode}...", file=sys.stderr, flush=True)
                level[mode] = await _run_mode(
                    models,
                    configs[mode],
                    questions,
                    n,
                    per_call,
                    server if mode == "room" else None,
                )
                await asyncio.sleep(1.0)
            direct, room = (level[m]["voice_to_voice_samples_ms"] for m in ("direct", "room"))
            if direct and room:
                level["room_over_direct_p50"] = round(float(np.median(room) / np.median(direct)), 3)
                level["room_over_direct_p50_ci"] = ratio_interval(room, direct)
                level["room_minus_direct_p50_ms"] = round(
                    float(np.median(room) - np.median(direct)), 1
                )
            results.append(level)
        return results


def run_bench_room(args: argparse.Namespace, config: Config) -> int:
    from appliance.session.modelset import ModelSet

    started = datetime.datetime.now(datetime.timezone.utc)
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
        for mode in ("direct", "room"):
            r = level[mode]
            v2v = r["voice_to_voice_ms"]
            print(
                f"{level['calls']} call(s) {mode:6}: voice-to-voice p50 {v2v['p50']} ms "
                f"{r['voice_to_voice_p50_ci_ms']} / p95 {v2v['p95']} ms "
                f"{r['voice_to_voice_p95_ci_ms']} (n {v2v['n']}, failures {r['failures']}), "
                f"CPU per call: appliance {r['appliance_cpu_s_per_call']} s, "
                f"server {r['server_cpu_s_per_call']} s"
            )
        print(
            f"{level['calls']} call(s): room/direct p50 {level.get('room_over_direct_p50')} "
            f"{level.get('room_over_direct_p50_ci')} (+{level.get('room_minus_direct_p50_ms')} ms)"
        )
    print(f"results: {out}")
    return 0
