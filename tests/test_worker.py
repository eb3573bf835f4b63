"""The appliance as a LiveKit agent worker (`[livekit] mode = "worker"`), against a real
livekit-server on loopback: jobs dispatched by the server's dispatch API to rooms where a
person (a livekit rtc participant of the test) talks to the agent."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api

from appliance import config as config_mod
from appliance.service import Service
from appliance.systemd import Notifier
from bench.livekit_server import LiveKitServer

from .conftest import transcribed_as, wait_until
from .test_room_server import Browser, said, words
from .test_service import Daemon

AGENT = "front-desk"


def worker_config(server: LiveKitServer, secret_file: Path, **lk: Any) -> config_mod.Config:
    return config_mod.parse(
        {
            "session": {"turn_detection": "vad"},
            "agent": {"greeting": "Hello."},
            "http": {"enabled": False},
            "livekit": {
                "enabled": True,
                "mode": "worker",
                "agent_name": AGENT,
                "url": server.url,
                "api_key": server.key,
                "api_secret_file": str(secret_file),
                "max_sessions": 2,
                **lk,
            },
        },
        "<worker test>",
    )


def run_worker(models: Any, config: config_mod.Config, scenario: Callable[[Service], Any]) -> Any:
    async def main() -> Any:
        service = Service(config, None, notifier=Notifier({}), models=models)
        daemon = asyncio.create_task(service.run())
        try:
            assert await wait_until(lambda: service.worker is not None or daemon.done(), 60)
            assert service.worker is not None, daemon.result()
            await asyncio.wait_for(service.worker.registered.wait(), 30)
            return await asyncio.wait_for(scenario(service), 240)
        finally:
            service.request_stop("test done")
            assert await asyncio.wait_for(daemon, 60) == 0

    return asyncio.run(main())


async def dispatch(server: LiveKitServer, room: str) -> None:
    lkapi = server.api()
    try:
        await lkapi.agent_dispatch.create_dispatch(
            api.CreateAgentDispatchRequest(agent_name=AGENT, room=room)
        )
    finally:
        await lkapi.aclose()


def agent_in(browser: Browser) -> str | None:
    return next((i for i in browser.room.remote_participants if i.startswith("agent_")), None)


def test_a_dispatched_job_talks_with_the_person_in_the_room(
    models: Any,
    speak: Callable[..., np.ndarray],
    tmp_path: Path,
    livekit_server: LiveKitServer,
) -> None:
    server = livekit_server
    secret = tmp_path / "secret"
    secret.write_text(server.secret)

    async def scenario(service: Service) -> dict[str, Any]:
        worker = service.worker
        assert worker is not None
        person = Browser()
        await person.join(server.url, server.token("kiosk-7", "visitor"))
        await person.unmute()
        await dispatch(server, "kiosk-7")
        assert await wait_until(lambda: agent_in(person) is not None, 30)
        agent = agent_in(person)
        assert agent is not None
        assert await wait_until(lambda: "listening" in person.states(agent)[1:], 30)  # greeted
        out: dict[str, Any] = {"load_during": worker.load()}
        asked = time.monotonic()
        await person.say(speak("What is the capital of France?"))
        assert await wait_until(lambda: person.states(agent)[-1:] == ["speaking"], 30)
        assert await wait_until(lambda: person.states(agent)[-1:] == ["listening"], 30)
        await asyncio.sleep(0.5)
        out["answer"] = said(models, person.heard(agent, asked))
        out["greeting"] = said(models, person.heard(agent)[: len(person.heard(agent)) // 3])
        out["states"] = person.states(agent)
        out["transcripts"] = list(person.transcripts)
        lkapi = server.api()
        people = await lkapi.room.list_participants(api.ListParticipantsRequest(room="kiosk-7"))
        out["agent_kind"] = next(p.kind for p in people.participants if p.identity == agent)
        await lkapi.aclose()
        await person.leave()  # the job ends when the person leaves
        assert await wait_until(lambda: worker.active == 0 and worker.jobs_done == 1, 20)
        out["load_after"] = worker.load()
        return out

    out = run_worker(models, worker_config(server, secret), scenario)
    assert out["agent_kind"] == api.ParticipantInfo.Kind.AGENT
    assert {"listening", "thinking", "speaking"} <= set(out["states"]), out["states"]
    assert "hello" in out["greeting"].lower(), out["greeting"]
    finals = [t for _, t, a in out["transcripts"] if a.get("lk.transcription_final") == "true"]
    assert any(transcribed_as("What is the capital of France?", t) for t in finals), finals
    replies = [t for who, t, _ in out["transcripts"] if who.startswith("agent_")]
    assert any(len(words(r) & words(out["answer"])) >= 2 for r in replies), (replies, out)
    assert out["load_during"] == 0.35 and out["load_after"] == 0.0  # 0.7 x 1 of 2 sessions


def fleet_config(server: LiveKitServer, secret_file: Path) -> str:
    return (
        '[session]\nturn_detection = "vad"\n[agent]\ngreeting = "Hello."\n'
        "[http]\nenabled = false\n"
        f'[livekit]\nenabled = true\nmode = "worker"\nagent_name = "{AGENT}"\n'
        f'url = "{server.url}"\napi_key = "{server.key}"\napi_secret_file = "{secret_file}"\n'
        "max_sessions = 2\n"
    )


def test_two_workers_share_the_calls_and_one_drains(
    tmp_path: Path, livekit_server: LiveKitServer
) -> None:
    server = livekit_server
    secret = tmp_path / "secret"
    secret.write_text(server.secret)
    config = fleet_config(server, secret)

    def pid_in(browser: Browser) -> str | None:
        for identity, p in browser.room.remote_participants.items():
            if identity.startswith("agent_"):
                return p.attributes.get("appliance.pid")
        return None

    async def main() -> dict[str, Any]:
        ok = await wait_until(lambda: all("registered worker" in d.text() for d in daemons), 180)
        assert ok, [d.text()[-3000:] for d in daemons]
        pids = [str(d.proc.pid) for d in daemons]
        people = []
        for n in range(4):
            person = Browser()
            await person.join(server.url, server.token(f"call-{n}", f"caller-{n}"))
            await dispatch(server, f"call-{n}")
            people.append(person)
            await asyncio.sleep(1.0)
        assert await wait_until(lambda: all(pid_in(p) for p in people), 60)
        out: dict[str, Any] = {"first": [pid_in(p) for p in people]}
        fifth = Browser()
        await fifth.join(server.url, server.token("call-4", "caller-4"))
        await dispatch(server, "call-4")
        await asyncio.sleep(8.0)
        out["fifth_while_full"] = pid_in(fifth)
        # one worker is stopped mid-call: it finishes its calls and takes no new ones
        draining = daemons[0]
        draining.signal(signal.SIGTERM)
        await asyncio.sleep(3.0)
        out["drainer_still_up"] = draining.proc.poll() is None
        mine = [p for p in people if pid_in(p) == str(draining.proc.pid)]
        out["drainer_agents_stayed"] = all(pid_in(p) for p in mine)
        others = [p for p in people if p not in mine]
        await others[0].leave()  # a slot frees on the other worker
        # the server may retry the waiting fifth call's dispatch (restart policy on
        # failure) into the free slot; if it does not, a new call takes it
        if await wait_until(lambda: pid_in(fifth) is not None, 15):
            sixth = None
            out["next_call"] = pid_in(fifth)
        else:
            sixth = Browser()
            await sixth.join(server.url, server.token("call-5", "caller-5"))
            await dispatch(server, "call-5")
            await wait_until(lambda: pid_in(sixth) is not None, 30)
            out["next_call"] = pid_in(sixth)
        for person in mine:
            await person.leave()
        out["drainer_exit"] = await asyncio.to_thread(draining.proc.wait, 60)
        for person in [*others[1:], fifth, *([sixth] if sixth else [])]:
            await person.leave()
        daemons[1].signal(signal.SIGTERM)
        out["other_exit"] = await asyncio.to_thread(daemons[1].proc.wait, 60)
        out["pids"] = pids
        return out

    daemons = []
    try:
        for name in ("w1", "w2"):
            (tmp_path / name).mkdir()
            daemons.append(Daemon(tmp_path / name, config, {}))
        out = asyncio.run(main())
    finally:
        for d in daemons:
            d.stop()
    first = out["first"]
    assert sorted(first.count(p) for p in out["pids"]) == [2, 2], out  # two on each
    assert out["fifth_while_full"] is None, out  # both full: nobody took it
    assert out["drainer_still_up"] and out["drainer_agents_stayed"], out
    assert out["next_call"] == out["pids"][1], out  # the one not draining
    assert out["drainer_exit"] == 0 and out["other_exit"] == 0, out


def test_a_worker_whose_server_goes_away_registers_again(
    models: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = LiveKitServer(tmp_path / "server")
    server.start()
    secret = tmp_path / "secret"
    secret.write_text(server.secret)

    async def scenario(service: Service) -> dict[str, Any]:
        worker = service.worker
        assert worker is not None
        server.kill()
        assert await wait_until(lambda: not worker.registered.is_set(), 60)
        await asyncio.sleep(5.0)  # more tries against nothing
        server.start()  # the same ports
        back = await wait_until(worker.registered.is_set, 60)
        person = Browser()
        await person.join(server.url, server.token("desk-2", "visitor"))
        await dispatch(server, "desk-2")
        answered = await wait_until(lambda: agent_in(person) is not None, 30)
        await person.leave()
        return {"back": back, "answered": answered}

    try:
        with caplog.at_level(logging.DEBUG, logger="appliance.worker"):
            out = run_worker(models, worker_config(server, secret, retry_max=2.0), scenario)
    finally:
        server.stop()
    assert out["back"] and out["answered"], out
    lost = [r for r in caplog.records if "lost" in r.getMessage()]
    assert lost and lost[0].levelno == logging.WARNING, [r.getMessage() for r in lost]
    assert all(r.levelno == logging.DEBUG for r in lost[1:])  # logged once
