"""Calls from a SIP trunk through LiveKit SIP to appliance workers, all real, on loopback:
Redis, livekit-server and LiveKit SIP (`bench.livekit_server.Deployment`), an inbound trunk
and a dispatch rule made with livekit-api's SIP service, sipp as the caller, and the
appliance in `[livekit] mode = "worker"`."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api

from appliance.audio.pcm import resample
from appliance.sip import g711
from bench.livekit_server import Deployment

from .conftest import conversation, transcribed_as, wait_until
from .test_room_server import said, words
from .test_sip import SIPP, finish, receiver, rtp_pcap, start_sipp
from .test_worker import AGENT, run_worker, worker_config

RINGING_S = 8  # the trunk's ringing timeout (bench.livekit_server.Deployment)
pytestmark = pytest.mark.skipif(SIPP is None, reason="needs sipp (Debian sip-tester)")


@pytest.fixture(scope="module")
def trunk(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    deployment = Deployment(tmp_path_factory.mktemp("trunk"), AGENT)
    try:
        deployment.start()
        asyncio.run(deployment.configure())
        yield deployment
    finally:
        deployment.stop()


def test_a_trunk_call_is_answered_by_a_worker(
    models: Any, speak: Callable[..., np.ndarray], tmp_path: Path, trunk: Deployment
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(trunk.server.secret)
    question = rtp_pcap(tmp_path / "question.pcap", speak("What is the capital of France?"))

    async def scenario(service: Any) -> dict[str, Any]:
        worker = service.worker
        proto, rport, transport = await receiver()
        keys = {"receiver": str(rport), "question": str(question)}
        keys |= {"lead": "4000", "wait": "9000", "after": "6000"}
        target = f"127.0.0.1:{trunk.sip.sip_port}"
        caller = await start_sipp(tmp_path, target, scenario="ask.xml", keys=keys, timeout=90)
        out: dict[str, Any] = {"job": await wait_until(lambda: worker.active == 1, 30)}
        lkapi = trunk.server.api()
        rooms = (await lkapi.room.list_rooms(api.ListRoomsRequest())).rooms
        out["rooms"] = [r.name for r in rooms]
        people = []
        for r in rooms:
            listing = await lkapi.room.list_participants(api.ListParticipantsRequest(room=r.name))
            people += [(p.identity, p.kind, dict(p.attributes)) for p in listing.participants]
        out["people"] = people
        await lkapi.aclose()
        room = next(n for n in out["rooms"] if n.startswith("call-"))
        await wait_until(lambda: room in worker.sessions, 20)
        session = worker.sessions.get(room)
        out["tools"] = [t.id for t in session.current_agent.tools] if session else []
        while session is not None and room in worker.sessions:  # its conversation
            out["items"] = conversation(session)
            out["userdata"] = dict(session.userdata)
            await asyncio.sleep(0.2)
        out["uas"] = await finish(caller, tmp_path)
        transport.close()
        out["ended"] = await wait_until(lambda: worker.active == 0 and worker.jobs_done >= 1, 20)
        pcm = np.concatenate(
            [g711.ulaw_decode(p.payload) for _, p in proto.packets] or [np.zeros(0, np.int16)]
        )
        out["heard"] = said(models, resample(pcm, 8000, 16000)) if len(pcm) else ""
        return out

    out = run_worker(models, worker_config(trunk.server, secret), scenario)
    assert out["uas"][0] == 0, out["uas"][1]
    assert out["job"], out
    assert any(n.startswith("call-") for n in out["rooms"]), out["rooms"]
    sip = [p for p in out["people"] if p[1] == api.ParticipantInfo.Kind.SIP]
    assert sip and sip[0][2].get("sip.trunkID") == trunk.trunk_id, out["people"]
    heard = out["heard"].lower()
    assert "hello" in heard, heard
    users = [t for r, t in out["items"] if r == "user"]
    replies = [t for r, t in out["items"] if r == "assistant"]
    assert any(transcribed_as("What is the capital of France?", u) for u in users), users
    assert len(words(replies[1]) & words(heard)) >= 2, (heard, replies)  # the answer, heard
    assert any("pressed 4 2 #" in u for u in users), users  # the keys, through LiveKit SIP
    assert out["userdata"]["call"]["dtmf"] == ["4", "2", "#"]
    assert out["userdata"]["call"]["phone_number"] == "+15550100"
    assert out["ended"], out  # the caller's BYE ended the job
    assert "transfer_call" not in out["tools"]  # no [sip] transfer_targets


def test_transfer_call_is_a_refer_through_livekit_sip(
    models: Any, tmp_path: Path, trunk: Deployment
) -> None:
    secret = tmp_path / "secret"
    secret.write_text(trunk.server.secret)
    target = "sip:reception@192.0.2.10"
    config = worker_config(trunk.server, secret)
    sip = config.sip.model_copy(update={"transfer_targets": {"reception": target}})
    config = config.model_copy(update={"sip": sip})

    async def scenario(service: Any) -> dict[str, Any]:
        worker = service.worker
        target_port = f"127.0.0.1:{trunk.sip.sip_port}"
        caller = await start_sipp(
            tmp_path, target_port, scenario="refer.xml", keys={"target": target}, timeout=90
        )
        assert await wait_until(lambda: bool(worker.sessions), 30)
        room, session = next(iter(worker.sessions.items()))
        identity = session.userdata["participant"]

        async def status() -> str:
            lkapi = trunk.server.api()
            try:
                p = await lkapi.room.get_participant(
                    api.RoomParticipantIdentity(room=room, identity=identity)
                )
                return str(p.attributes.get("sip.callStatus", ""))
            finally:
                await lkapi.aclose()

        for _ in range(100):  # LiveKit SIP answers once the agent listens: then it is active
            if await status() == "active":
                break
            await asyncio.sleep(0.2)
        out: dict[str, Any] = {"tools": [t.id for t in session.current_agent.tools]}
        # what the agent's transfer_call tool does
        out["transferred"] = await worker.transfer(room, identity, target)
        out["uas"] = await finish(caller, tmp_path)
        out["ended"] = await wait_until(lambda: worker.active == 0, 20)
        return out

    out = run_worker(models, config, scenario)
    assert out["uas"][0] == 0, out["uas"][1]  # REFER to the target, NOTIFY 200, then BYE
    assert out["transferred"] is True
    assert "transfer_call" in out["tools"]
    assert out["ended"]


def test_a_call_to_a_full_fleet_rings_then_is_refused(
    models: Any, speak: Callable[..., np.ndarray], tmp_path: Path, trunk: Deployment
) -> None:
    from appliance.sip.ua import UserAgent

    secret = tmp_path / "secret"
    secret.write_text(trunk.server.secret)
    config = worker_config(trunk.server, secret, max_sessions=1)
    question = rtp_pcap(tmp_path / "question.pcap", speak("What is the capital of France?"))
    target = f"127.0.0.1:{trunk.sip.sip_port}"

    async def scenario(service: Any) -> dict[str, Any]:
        worker = service.worker
        keys = {"receiver": str((await receiver())[1]), "question": str(question)}
        # sipp sends RTP only while it plays: pauses stay under LiveKit SIP's media timeout
        keys |= {"lead": "1000", "wait": "6000", "after": "9000"}
        first = await start_sipp(tmp_path, target, scenario="ask.xml", keys=keys, timeout=90)
        assert await wait_until(lambda: bool(worker.sessions), 30)
        await asyncio.sleep(3.0)  # the server has the worker's full load
        sip = config.sip.model_copy(
            update={"enabled": True, "port": 0, "rtp_ports": (40000, 41000)}
        )
        caller = UserAgent(sip, lambda call: None)
        await caller.start()
        started = time.monotonic()
        out: dict[str, Any] = {}
        try:
            await caller.dial(f"sip:agent@{target}", timeout=60)
            out["second"] = "answered"
        except Exception as exc:
            out["second"] = str(exc)
        out["after_s"] = time.monotonic() - started
        await caller.stop()
        out["first"] = await finish(first, tmp_path)
        return out

    out = run_worker(models, config, scenario)
    assert out["first"][0] == 0, out["first"][1]  # the call in progress went on
    assert out["second"] != "answered", out  # never a silent answered call
    # it rang until the trunk's ringing timeout, then LiveKit SIP refused it
    assert RINGING_S - 1 <= out["after_s"] <= RINGING_S + 10, out
