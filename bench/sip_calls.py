"""`python -m bench sip`: the phone bridge's figures, with callers made of our own SIP stack.

The appliance runs in this process (`Service` with only `[sip]`, on loopback) over one
loaded model set. Each caller is a second `UserAgent` that dials it, plays spoken questions
(the Piper voice, 8 kHz G.711) into the call and records what comes back. Measured:

- INVITE to 200 OK (as the caller sees it, ACK sent);
- answer to the first audible sample of the greeting;
- the interval between the appliance's RTP packets (20 ms ideal) while N calls talk and
  the models run: how late the event loop sends;
- voice-to-voice per question (the question's last loud sample sent to the first loud
  sample of the reply received), for N concurrent calls, with bootstrap 95 % intervals of
  its p50 and p95, and the largest N whose p95 stays under 1.5 s;
- the process's CPU seconds per question and its RSS (idle, and the peak while N calls
  talk): the appliance's own, plus the callers' small share;
- what each model adds to the RSS as the model set loads.

The questions are the evaluation corpus's single-turn questions and sums (six voices that
are not the appliance's), resampled to 8 kHz.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from appliance.config import Config
from appliance.session.modelset import rss_mb
from bench.latency import _cpu_seconds, run_record
from bench.livekit_server import free_port
from bench.peers import memory_mb
from bench.stats import interval
from bench.usb_audio import LOUD, percentiles

if TYPE_CHECKING:
    from appliance.session.modelset import ModelSet
    from appliance.sip.ua import Call, UserAgent

RATE = 8000
FRAME = 160
V2V_LIMIT_MS = 1500.0
QUESTIONS_PER_CALL = 3
CORPUS_KINDS = ("question", "arithmetic")
IDLE_SETTLE_S = 2.0
IDLE_S = 5.0


class Phone:
    """The caller's side of one call (its `CallMedia`): plays what it is given, records
    what it hears."""

    def __init__(self, call: Call) -> None:
        self.call = call
        self.log: list[tuple[float, bool]] = []  # (arrival, loud) per 20 ms frame heard
        self._queue: np.ndarray = np.zeros(0, np.int16)
        self.last_loud_sent = 0.0
        call.attach(self)

    def heard(self, pcm8k: np.ndarray) -> None:
        self.log.append((time.monotonic(), bool(np.abs(pcm8k.astype(np.int32)).max() > LOUD)))

    def pressed(self, digit: str) -> None:
        pass

    def ended(self, reason: str) -> None:
        pass

    def next_audio(self, n: int) -> np.ndarray:
        block = np.zeros(n, np.int16)
        part, self._queue = self._queue[:n], self._queue[n:]
        block[: len(part)] = part
        if np.abs(part.astype(np.int32)).max(initial=0) > LOUD:
            self.last_loud_sent = time.monotonic()
        return block

    def say(self, pcm8k: np.ndarray) -> None:
        self._queue = np.concatenate([self._queue, pcm8k])

    @property
    def speaking(self) -> bool:
        return len(self._queue) > 0

    def first_loud_after(self, t: float) -> float | None:
        return next((at for at, loud in self.log if loud and at > t), None)

    def quiet_since(self, seconds: float) -> bool:
        """Nothing loud heard for `seconds` (the agent finished its reply)."""
        now = time.monotonic()
        last = max((at for at, loud in self.log if loud), default=0.0)
        return now - last > seconds


async def _one_call(
    caller: UserAgent, target: str, questions: list[np.ndarray], runs: list[dict[str, Any]]
) -> dict[str, Any]:
    t0 = time.monotonic()
    call = await caller.dial(target, timeout=30)
    answered = time.monotonic()
    phone = Phone(call)
    result: dict[str, Any] = {"invite_to_200_ms": (answered - t0) * 1000}
    deadline = time.monotonic() + 20
    while phone.first_loud_after(answered) is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    greeting = phone.first_loud_after(answered)
    result["answer_to_greeting_ms"] = (greeting - answered) * 1000 if greeting else None
    while not phone.quiet_since(1.0):
        await asyncio.sleep(0.05)
    for question in questions:
        phone.say(question)
        while phone.speaking:
            await asyncio.sleep(0.02)
        end = phone.last_loud_sent
        deadline = time.monotonic() + 20
        while phone.first_loud_after(end) is None and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        reply = phone.first_loud_after(end)
        runs.append({"v2v_ms": (reply - end) * 1000 if reply else None})
        while not phone.quiet_since(1.2) and time.monotonic() < deadline + 20:
            await asyncio.sleep(0.05)
    await call.hangup("bench done")
    return result


async def call_level(
    appliance: UserAgent | None,
    caller: UserAgent,
    target: str,
    n: int,
    questions: list[np.ndarray],
    per_call: int = QUESTIONS_PER_CALL,
) -> dict[str, Any]:
    """N concurrent calls to `target` (a SIP URI), each asking `per_call` questions; the
    RTP timing is the `appliance` user agent's (None: its calls are not ours to see)."""
    runs: list[dict[str, Any]] = []
    own = appliance.calls if appliance is not None else {}
    for call in own.values():
        call.rtp.send_times.clear()
    picks = [
        [questions[(i * per_call + k) % len(questions)] for k in range(per_call)] for i in range(n)
    ]
    sends: list[float] = []

    async def collect_sends() -> None:
        while True:
            await asyncio.sleep(0.5)
            for call in list(own.values()):
                times = list(call.rtp.send_times)
                sends.extend(np.diff(times).tolist())
                call.rtp.send_times.clear()

    peak = memory_mb()

    async def sample_rss() -> None:
        while True:
            await asyncio.sleep(0.25)
            now = memory_mb()
            if now["rss"] > peak["rss"]:
                peak.update(now)

    proc = psutil.Process()
    cpu0 = _cpu_seconds(proc)
    tasks = [asyncio.create_task(collect_sends()), asyncio.create_task(sample_rss())]
    try:
        calls = await asyncio.gather(*(_one_call(caller, target, q, runs) for q in picks))
    finally:
        for task in tasks:
            task.cancel()
    cpu = _cpu_seconds(proc) - cpu0
    v2v = [r["v2v_ms"] for r in runs if r["v2v_ms"] is not None]
    late = [abs(g - 0.02) * 1000 for g in sends]
    return {
        "calls": n,
        "turns": len(runs),
        "cpu_s_per_turn": round(cpu / max(1, len(runs)), 3),
        "peak_rss_mb": peak["rss"],
        "peak_rss_split_mb": peak,
        "voice_to_voice_p50_ci_ms": interval(v2v, 50),
        "voice_to_voice_p95_ci_ms": interval(v2v, 95),
        "invite_to_200_ms": percentiles([c["invite_to_200_ms"] for c in calls]),
        "answer_to_greeting_ms": percentiles(
            [c["answer_to_greeting_ms"] for c in calls if c["answer_to_greeting_ms"] is not None]
        ),
        "voice_to_voice_ms": percentiles(v2v),
        "voice_to_voice_samples_ms": [round(v, 1) for v in v2v],
        "failures": len(runs) - len(v2v),
        "rtp_interval_deviation_ms": {
            **percentiles(late),
            "p99": round(float(np.percentile(late, 99)), 2) if late else None,
            "max": round(max(late), 2) if late else None,
        },
    }


async def _bench(
    models: ModelSet, config: Config, questions: list[np.ndarray], levels: list[int], turns: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    from appliance.service import Service
    from appliance.sip.ua import UserAgent
    from appliance.systemd import Notifier

    port = free_port()
    sip = config.sip.model_copy(
        update={"enabled": True, "listen": "127.0.0.1", "port": port, "max_calls": max(levels)}
    )
    appliance_config = config.model_copy(
        update={
            "sip": sip,
            "audio": config.audio.model_copy(update={"enabled": False}),
            "http": config.http.model_copy(update={"enabled": False}),
        }
    )
    service = Service(appliance_config, None, notifier=Notifier({}), models=models)
    daemon = asyncio.create_task(service.run())
    while service.sip_ready is None or not service.sip_ready.done():
        await asyncio.sleep(0.02)
    appliance: UserAgent = service.sip_ready.result()
    caller_config = sip.model_copy(update={"port": 0, "rtp_ports": (40000, 41000)})
    caller = UserAgent(caller_config, lambda call: None)
    await caller.start()
    results = []
    try:
        await asyncio.sleep(IDLE_SETTLE_S)
        proc = psutil.Process()
        cpu0, t0 = _cpu_seconds(proc), time.monotonic()
        await asyncio.sleep(IDLE_S)
        idle = {
            "rss_mb": rss_mb(),
            "rss_split_mb": memory_mb(),
            "cpu_percent": round(100 * (_cpu_seconds(proc) - cpu0) / (time.monotonic() - t0), 1),
        }
        for n in levels:
            per_call = -(-turns // n)
            print(f"  {n} concurrent call(s), {per_call} questions each...", file=sys.stderr)
            target = f"sip:agent@127.0.0.1:{port}"
            results.append(await call_level(appliance, caller, target, n, questions, per_call))
            await asyncio.sleep(1.0)
    finally:
        await caller.stop()
        service.request_stop("bench done")
        await daemon
    return idle, results


def corpus_questions(rate: int = RATE) -> list[np.ndarray]:
    """The evaluation set's single-turn questions and sums, at `rate`, in corpus order."""
    from appliance.audio.files import read_audio
    from appliance.audio.pcm import resample
    from bench.evaluation import CORPUS, load_corpus

    items = [i for i in load_corpus(CORPUS, "eval") if i.kind in CORPUS_KINDS]
    return [resample(read_audio(i.turns[0].audio), 16000, rate) for i in items]


def run_bench_sip(args: argparse.Namespace, config: Config) -> int:
    from appliance.session.modelset import ModelSet

    started = datetime.datetime.now(datetime.timezone.utc)
    if not config.agent.greeting:  # the answer-to-greeting figure needs one
        agent = config.agent.model_copy(update={"greeting": "Hello, how can I help you?"})
        config = config.model_copy(update={"agent": agent})
    models = ModelSet(config)
    models.warm()  # as the daemon does: the greeting is rendered here
    questions = corpus_questions()
    levels = [int(n) for n in args.calls.split(",")]
    try:
        idle, results = asyncio.run(_bench(models, config, questions, levels, args.turns))
    finally:
        models.close()
    fit = [r["calls"] for r in results if (r["voice_to_voice_ms"]["p95"] or 1e9) < V2V_LIMIT_MS]
    sure = [
        r["calls"]
        for r in results
        if r["voice_to_voice_p95_ci_ms"] and r["voice_to_voice_p95_ci_ms"][1] < V2V_LIMIT_MS
    ]
    steps = models.times.rss_mb
    names = list(steps)
    summary = {
        **run_record(started, config),
        "turn_detection": config.turn_detection,
        "turns_per_level": args.turns,
        "questions": f"{len(questions)} single-turn items ({', '.join(CORPUS_KINDS)}) of the "
        "evaluation corpus, 8 kHz",
        "model_rss_mb": {
            "steps": steps,
            "cost": {b: round(steps[b] - steps[a], 1) for a, b in itertools.pairwise(names)},
        },
        "idle": idle,
        "levels": results,
        "max_calls_with_p95_under_1500_ms": max(fit) if fit else 0,
        "max_calls_with_p95_ci_under_1500_ms": max(sure) if sure else 0,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    cost = ", ".join(f"{k} {v:+.0f}" for k, v in summary["model_rss_mb"]["cost"].items())
    print(f"RSS as the models load (MB): before {steps.get('before')}, {cost}")
    split = idle["rss_split_mb"]
    print(
        f"idle: RSS {idle['rss_mb']:.0f} MB ({split['anon']:.0f} own, {split['file']:.0f} "
        f"mapped files), CPU {idle['cpu_percent']} % of one core"
    )
    for r in results:
        v2v, rtp = r["voice_to_voice_ms"], r["rtp_interval_deviation_ms"]
        ci50, ci95 = r["voice_to_voice_p50_ci_ms"], r["voice_to_voice_p95_ci_ms"]
        print(
            f"{r['calls']} call(s), {r['turns']} questions: voice-to-voice p50 {v2v['p50']} "
            f"{ci50} / p95 {v2v['p95']} {ci95} ms (failures {r['failures']}); CPU "
            f"{r['cpu_s_per_turn']} s per question; peak RSS {r['peak_rss_mb']:.0f} MB "
            f"({r['peak_rss_split_mb']['anon']:.0f} own); "
            f"INVITE->200 p50 {r['invite_to_200_ms']['p50']} ms, answer->greeting p50 "
            f"{r['answer_to_greeting_ms']['p50']} ms, RTP interval deviation p95 {rtp['p95']} "
            f"/ max {rtp['max']} ms"
        )
    fits, sure_fits = (
        summary["max_calls_with_p95_under_1500_ms"],
        summary["max_calls_with_p95_ci_under_1500_ms"],
    )
    print(
        f"largest number of calls with p95 voice-to-voice < 1.5 s: {fits} "
        f"(with its whole 95 % interval under: {sure_fits})"
    )
    print(f"results: {out}")
    return 0
