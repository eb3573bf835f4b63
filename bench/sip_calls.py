"""`python -m bench sip`: the phone bridge's figures, with callers made of our own SIP stack.

The appliance runs in this process (`Service` with only `[sip]`, on loopback) over one
loaded model set. Each caller is a second `UserAgent` that dials it, plays spoken questions
(the Piper voice, 8 kHz G.711) into the call and records what comes back. Measured:

- INVITE to 200 OK (as the caller sees it, ACK sent);
- answer to the first audible sample of the greeting;
- the interval between the appliance's RTP packets (20 ms ideal) while N calls talk and
  the models run: how late the event loop sends;
- voice-to-voice per question (the question's last loud sample sent to the first loud
  sample of the reply received), for N concurrent calls, and the largest N whose p95 stays
  under 1.5 s.
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
from bench.latency import QUESTIONS, run_record, spoken_questions
from bench.livekit_server import free_port
from bench.usb_audio import LOUD, percentiles

if TYPE_CHECKING:
    from appliance.session.modelset import ModelSet
    from appliance.sip.ua import Call, UserAgent

RATE = 8000
FRAME = 160
V2V_LIMIT_MS = 1500.0
QUESTIONS_PER_CALL = 3


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

    collector = asyncio.create_task(collect_sends())
    try:
        calls = await asyncio.gather(*(_one_call(caller, target, q, runs) for q in picks))
    finally:
        collector.cancel()
    v2v = [r["v2v_ms"] for r in runs if r["v2v_ms"] is not None]
    late = [abs(g - 0.02) * 1000 for g in sends]
    return {
        "calls": n,
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
    models: ModelSet, config: Config, questions: list[np.ndarray], levels: list[int]
) -> list[dict[str, Any]]:
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
        for n in levels:
            print(f"  {n} concurrent call(s)...", file=sys.stderr, flush=True)
            target = f"sip:agent@127.0.0.1:{port}"
            results.append(await call_level(appliance, caller, target, n, questions))
            await asyncio.sleep(1.0)
    finally:
        await caller.stop()
        service.request_stop("bench done")
        await daemon
    return results


def run_bench_sip(args: argparse.Namespace, config: Config) -> int:
    from appliance.session.modelset import ModelSet

    started = datetime.datetime.now(datetime.timezone.utc)
    if not config.agent.greeting:  # the answer-to-greeting figure needs one
        agent = config.agent.model_copy(update={"greeting": "Hello, how can I help you?"})
        config = config.model_copy(update={"agent": agent})
    models = ModelSet(config)
    models.warm()  # as the daemon does: the greeting is rendered here
    questions = spoken_questions(models, len(QUESTIONS), RATE)
    levels = [int(n) for n in args.calls.split(",")]
    try:
        results = asyncio.run(_bench(models, config, questions, levels))
    finally:
        models.close()
    fit = [r["calls"] for r in results if (r["voice_to_voice_ms"]["p95"] or 1e9) < V2V_LIMIT_MS]
    summary = {
        **run_record(started, config),
        "turn_detection": config.turn_detection,
        "questions_per_call": QUESTIONS_PER_CALL,
        "levels": results,
        "max_calls_with_p95_under_1500_ms": max(fit) if fit else 0,
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for r in results:
        v2v, rtp = r["voice_to_voice_ms"], r["rtp_interval_deviation_ms"]
        print(
            f"{r['calls']} call(s): INVITE->200 p50 {r['invite_to_200_ms']['p50']} ms, "
            f"answer->greeting p50 {r['answer_to_greeting_ms']['p50']} ms, "
            f"voice-to-voice p50 {v2v['p50']} / p95 {v2v['p95']} ms "
            f"(failures {r['failures']}), RTP interval deviation p95 {rtp['p95']} / "
            f"max {rtp['max']} ms"
        )
    fits = summary["max_calls_with_p95_under_1500_ms"]
    print(f"largest number of calls with p95 voice-to-voice < 1.5 s: {fits}")
    print(f"results: {out}")
    return 0
