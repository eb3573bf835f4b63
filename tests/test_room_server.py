"""The room bridge against a real livekit-server on loopback (`bench.livekit_server`).

A phone call (sipp) and a kiosk conversation (the simulated room of `bench.room_sim`) are
bridged into a room, and a "browser" (a livekit rtc participant of the test) joins it: it
hears the agent, reads the transcriptions, sees the agent's state and speaks to the caller.
The server's own RoomService says who is in the room. The server is killed mid-call and
started again on the same ports; wrong credentials and a listen-only token are refused by
the server itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import api, rtc

from appliance.audio.pcm import resample
from appliance.config import LivekitConfig
from appliance.sip import g711
from appliance.usb.audio import UsbAudio
from bench import room_sim as audiosim
from bench.livekit_server import LiveKitServer

from .conftest import conversation, free_udp_port, transcribed_as, wait_until
from .test_kiosk import ask, kiosk_config, rms, run_kiosk
from .test_room import dial_an_echo
from .test_sip import (
    ECHO_PHONE,
    SIPP,
    Recorder,
    finish,
    items,
    receiver,
    rtp_pcap,
    run_sip,
    sip_config,
    start_sipp,
    utterances,
)

pytestmark = pytest.mark.skipif(SIPP is None, reason="needs sipp (Debian sip-tester)")
RATE = 16000


class Browser:
    """A person in a browser: hears every audio track (16 kHz, with arrival times), reads
    the `lk.transcription` streams, follows attribute changes and can speak."""

    def __init__(self) -> None:
        self.room = rtc.Room()
        self.audio: dict[str, list[tuple[float, np.ndarray]]] = {}
        self.transcripts: list[tuple[str, str, dict[str, str]]] = []  # (sender, text, attrs)
        self.changes: list[tuple[str, dict[str, str]]] = []  # (identity, changed attributes)
        self._tasks: set[asyncio.Task[None]] = set()
        self._source: rtc.AudioSource | None = None
        self.room.on("track_subscribed", self._subscribed)
        self.room.on("participant_attributes_changed", self._changed)
        self.room.register_text_stream_handler("lk.transcription", self._transcription)

    async def join(self, url: str, token: str) -> None:
        await self.room.connect(url, token)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _subscribed(self, track: rtc.Track, _: Any, participant: rtc.RemoteParticipant) -> None:
        if track.kind == rtc.TrackKind.KIND_AUDIO:
            self._spawn(self._record(track, participant.identity))

    async def _record(self, track: rtc.Track, identity: str) -> None:
        frames = self.audio.setdefault(identity, [])
        async for event in rtc.AudioStream.from_track(track=track, sample_rate=RATE):
            frames.append((time.monotonic(), np.frombuffer(event.frame.data, np.int16).copy()))

    def _changed(self, changed: dict[str, str], participant: rtc.Participant) -> None:
        self.changes.append((participant.identity, dict(changed)))

    def _transcription(self, reader: rtc.TextStreamReader, sender: str) -> None:
        async def read() -> None:
            text = await reader.read_all()
            self.transcripts.append((sender, text, dict(reader.info.attributes or {})))

        self._spawn(read())

    def heard(self, identity: str, since: float = 0.0) -> np.ndarray:
        """What `identity` said in the room since `since` (monotonic), 16 kHz int16."""
        pieces = [pcm for t, pcm in self.audio.get(identity, []) if t >= since]
        return np.concatenate(pieces) if pieces else np.zeros(0, np.int16)

    def states(self, identity: str) -> list[str]:
        return [
            c["lk.agent.state"]
            for who, c in self.changes
            if who == identity and "lk.agent.state" in c
        ]

    async def unmute(self) -> None:
        """Publish a microphone track (others subscribe to it in a moment)."""
        self._source = rtc.AudioSource(RATE, 1)
        track = rtc.LocalAudioTrack.create_audio_track("microphone", self._source)
        options = rtc.TrackPublishOptions(source=rtc.TrackSource.SOURCE_MICROPHONE)
        await self.room.local_participant.publish_track(track, options)

    async def say(self, pcm: np.ndarray) -> None:
        """Speak (int16 at 16 kHz) into the room, in real time."""
        if self._source is None:
            await self.unmute()
        assert self._source is not None
        samples = pcm.astype(np.int16)
        for i in range(0, len(samples) - 319, 320):
            frame = rtc.AudioFrame(samples[i : i + 320].tobytes(), RATE, 1, 320)
            await self._source.capture_frame(frame)
        await self._source.wait_for_playout()

    async def leave(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await self.room.disconnect()


def said(models: Any, pcm: np.ndarray) -> str:
    """What Whisper hears in a recording (16 kHz int16), utterance by utterance."""
    from appliance.plugins.whisper.engine import transcribe

    return " ".join(transcribe(models.whisper, u, "en", window="full")[0] for u in utterances(pcm))


def words(text: str) -> set[str]:
    return {w.strip(".,!?").lower() for w in text.split()}


def bridged(config: Any, server: LiveKitServer, secret_file: Path, **lk: Any) -> Any:
    livekit = LivekitConfig(
        enabled=True,
        url=server.url,
        api_key=server.key,
        api_secret_file=str(secret_file),
        **{"join_wait": 10.0, **lk},
    )
    return config.model_copy(update={"livekit": livekit})


@pytest.fixture
def secret_file(tmp_path: Path, livekit_server: LiveKitServer) -> Path:
    path = tmp_path / "livekit-secret"
    path.write_text(livekit_server.secret)
    return path


def test_a_phone_call_in_a_room_is_heard_read_and_joined_from_a_browser(
    models: Any,
    speak: Callable[..., np.ndarray],
    tmp_path: Path,
    livekit_server: LiveKitServer,
    secret_file: Path,
) -> None:
    server = livekit_server
    port = free_udp_port()
    config = bridged(sip_config(port), server, secret_file, room="front-desk")
    question = rtp_pcap(tmp_path / "question.pcap", speak("What is the capital of France?"))

    async def scenario(service: Recorder) -> dict[str, Any]:
        browser = Browser()
        await browser.join(server.url, server.token("front-desk", "supervisor"))
        await browser.unmute()
        proto, rport, transport = await receiver()
        keys = {"receiver": str(rport), "question": str(question)}
        keys |= {"lead": "4000", "wait": "12000", "after": "14000"}
        caller = await start_sipp(tmp_path, f"127.0.0.1:{port}", scenario="ask.xml", keys=keys)
        out: dict[str, Any] = {}
        assert await wait_until(lambda: bool(service.conversations), 15)
        conv = service.conversations[-1]
        assert await wait_until(lambda: conv.room is not None and conv.room.mode == "room", 15)

        def replied(n: int) -> bool:
            return (
                sum(r == "assistant" for r, _ in items(conv)) >= n
                and conv.session.agent_state == "listening"
            )

        assert await wait_until(lambda: replied(2), 30), items(conv)  # greeting, answer
        lkapi = server.api()
        people = await lkapi.room.list_participants(api.ListParticipantsRequest(room="front-desk"))
        out["people"] = {p.identity: (p.kind, dict(p.attributes)) for p in people.participants}
        assert await wait_until(lambda: replied(3), 30), items(conv)  # the keys' reply
        out["before"] = items(conv)
        spoke = time.monotonic()
        await browser.say(speak("Please hold the line."))
        await asyncio.sleep(3.0)
        out["after"] = items(conv)
        out["caller_heard"] = [(t, p.payload) for t, p in proto.packets if t >= spoke and p.payload]
        out["uas"] = await finish(caller, tmp_path)
        transport.close()
        await asyncio.sleep(1.0)
        caller_id = next(k for k in out["people"] if k.startswith("sip_"))
        agent_id = next(k for k in out["people"] if k.startswith("agent_"))
        out.update(
            caller_id=caller_id,
            agent=browser.heard(agent_id),
            states=browser.states(agent_id),
            status=[c.get("sip.callStatus") for who, c in browser.changes if who == caller_id],
            transcripts=list(browser.transcripts),
            agent_id=agent_id,
        )
        await lkapi.aclose()
        await browser.leave()
        return out

    out = run_sip(models, config, scenario)
    assert out["uas"][0] == 0, out["uas"][1]
    # the server's participant list: the caller as LiveKit SIP shows one, and the agent
    caller_kind, caller_attrs = out["people"][out["caller_id"]]
    assert caller_kind == api.ParticipantInfo.Kind.SIP
    assert (
        caller_attrs["sip.phoneNumber"] == "+15550100"
        and caller_attrs["sip.callStatus"] == "active"
    )
    assert caller_attrs["sip.callDirection"] == "inbound" and caller_attrs["sip.callID"]
    agent_kind, agent_attrs = out["people"][out["agent_id"]]
    assert agent_kind == api.ParticipantInfo.Kind.AGENT
    assert agent_attrs.get("lk.agent.state") in ("listening", "thinking", "speaking")
    assert {"listening", "thinking", "speaking"} <= set(out["states"]), out["states"]
    assert "hangup" in out["status"], out["status"]  # marked before the caller left
    # the conversation: the question and the keys were heard through the room
    users = [t for r, t in out["before"] if r == "user"]
    replies = [t for r, t in out["before"] if r == "assistant"]
    assert any(transcribed_as("What is the capital of France?", u) for u in users), users
    assert any("pressed 4 2 #" in u for u in users), users
    # the browser heard the greeting and the answer, and read them
    heard = said(models, out["agent"])
    assert "hello" in heard.lower(), heard
    assert len(words(replies[1]) & words(heard)) >= 2, (heard, replies[1])
    agent_text = " ".join(t for who, t, _ in out["transcripts"] if who == out["agent_id"])
    assert "Hello." in agent_text and replies[1][:20] in agent_text, out["transcripts"]
    finals = [t for _, t, a in out["transcripts"] if a.get("lk.transcription_final") == "true"]
    assert any(transcribed_as("What is the capital of France?", t) for t in finals), finals
    # the browser's words reached the caller, and the agent neither heard nor answered them
    pcm = np.concatenate([g711.ulaw_decode(p) for _, p in out["caller_heard"]])
    to_caller = said(models, resample(pcm, 8000, 16000))
    assert "hold" in to_caller.lower(), to_caller
    assert out["after"] == out["before"], out["after"]


def test_a_kiosk_conversation_in_a_room(
    models: Any,
    speak: Callable[..., np.ndarray],
    room: audiosim.Room,
    livekit_server: LiveKitServer,
    secret_file: Path,
) -> None:
    server = livekit_server
    config = bridged(kiosk_config(), server, secret_file, room="lobby")

    async def scenario(usb: UsbAudio, session: Any) -> dict[str, Any]:
        browser = Browser()
        await browser.join(server.url, server.token("lobby", "visitor-desk"))
        await browser.unmute()
        out: dict[str, Any] = {
            "reply": await ask(room, usb, session, speak("What is the capital of France?"))
        }
        out["items"] = conversation(session)
        lkapi = server.api()
        people = await lkapi.room.list_participants(api.ListParticipantsRequest(room="lobby"))
        out["people"] = {p.identity: (p.kind, dict(p.attributes)) for p in people.participants}
        await lkapi.aclose()
        agent = next(k for k in out["people"] if k.startswith("agent_"))
        out["agent"] = browser.heard(agent)
        out["transcripts"] = list(browser.transcripts)
        played = len(room.played) // 2
        await browser.say(speak("Please hold the line."))
        await asyncio.sleep(2.0)
        out["speaker"] = room.played_pcm(played)
        out["after"] = conversation(session)
        await browser.leave()
        return out

    out = run_kiosk(models, config, scenario, timeout=90)
    kiosk = [v for k, v in out["people"].items() if k.startswith("kiosk_")]
    assert kiosk and kiosk[0][0] == api.ParticipantInfo.Kind.STANDARD, out["people"]
    assert kiosk[0][1]["appliance.source"] == "usb", out["people"]
    user = [t for r, t in out["items"] if r == "user"]
    replies = [t for r, t in out["items"] if r == "assistant"]
    assert user and transcribed_as("What is the capital of France?", user[0]), out["items"]
    assert replies and rms(out["reply"]) > 300  # out of the USB speaker, through the room
    heard = said(models, out["agent"])
    assert len(words(replies[-1]) & words(heard)) >= 2, (heard, replies)
    assert any(replies[-1][:20] in t for _, t, _ in out["transcripts"]), out["transcripts"]
    assert rms(out["speaker"]) > 300  # the browser's words out of the kiosk's speaker
    assert out["after"] == out["items"], out["after"]  # and the agent did not answer them


def test_a_server_killed_mid_call_then_restarted(
    models: Any, speak: Callable[..., np.ndarray], tmp_path: Path, secret_file: Path
) -> None:
    server = LiveKitServer(tmp_path / "server")
    server.start()
    port = free_udp_port()
    config = bridged(sip_config(port), server, secret_file, retry_max=2.0, room="desk")
    question = rtp_pcap(tmp_path / "question.pcap", speak("What is the capital of France?"))

    def caller_heard(proto: Any, start: float, end: float) -> str:
        payloads = [p.payload for t, p in proto.packets if start <= t < end]
        pcm = np.concatenate([g711.ulaw_decode(p) for p in payloads])
        return said(models, resample(pcm, 8000, 16000)).lower()

    async def scenario(service: Recorder) -> dict[str, Any]:
        proto, rport, transport = await receiver()
        # the caller asks its question 20 s in: by then the server has died and come back
        keys = {"receiver": str(rport), "question": str(question)}
        keys |= {"lead": "20000", "wait": "9000", "after": "1000"}
        caller = await start_sipp(tmp_path, f"127.0.0.1:{port}", scenario="ask.xml", keys=keys)
        assert await wait_until(lambda: bool(service.conversations), 15)
        conv = service.conversations[-1]
        bridge = conv.room
        assert bridge is not None
        assert await wait_until(lambda: bridge.mode == "room", 15)
        assert await wait_until(lambda: len(items(conv)) >= 1, 10)  # the greeting, in the room
        await asyncio.sleep(1.5)
        out: dict[str, Any] = {}
        killed = time.monotonic()
        server.kill()
        await wait_until(lambda: bridge.mode == "direct", 10)
        out["offline_after_s"] = time.monotonic() - killed
        conv.session.say("Still here.")
        await asyncio.sleep(3.0)
        out["offline"] = caller_heard(proto, killed, time.monotonic())
        server.start()  # on the same ports
        back = time.monotonic()
        await wait_until(lambda: bridge.mode == "room", 30)
        out["back_after_s"] = time.monotonic() - back
        lkapi = server.api()
        people = await lkapi.room.list_participants(api.ListParticipantsRequest(room="desk"))
        out["people"] = [p.identity for p in people.participants]
        await lkapi.aclose()
        out["uas"] = await finish(caller, tmp_path)
        transport.close()
        out["items"] = items(conv)
        out["modes"] = [m for _, m in bridge.switches]
        out["answer"] = caller_heard(proto, back, time.monotonic())
        return out

    try:
        out = run_sip(models, config, scenario)
    finally:
        server.stop()
    assert out["uas"][0] == 0, out["uas"][1]  # the call stayed up to the caller's BYE
    assert out["offline_after_s"] < 2.0, out  # offline at once
    assert "still here" in out["offline"], out["offline"]  # the agent, heard direct
    assert out["modes"] == ["room", "direct", "room"], out["modes"]
    assert out["back_after_s"] < 15, out
    assert any(p.startswith("sip_") for p in out["people"]), out["people"]
    assert any(p.startswith("agent_") for p in out["people"]), out["people"]
    # the question, asked after the restart, went through the new room and was answered
    users = [t for r, t in out["items"] if r == "user"]
    replies = [t for r, t in out["items"] if r == "assistant"]
    assert any(transcribed_as("What is the capital of France?", u) for u in users), users
    assert replies[-1] != "Still here." and len(words(replies[-1]) & words(out["answer"])) >= 2


def test_wrong_credentials_are_named_and_the_call_runs_offline(
    models: Any, tmp_path: Path, livekit_server: LiveKitServer, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = tmp_path / "wrong-secret"
    wrong.write_text("not-the-secret-" * 3)
    port = free_udp_port()
    config = bridged(sip_config(port, ECHO_PHONE), livekit_server, wrong, join_wait=2.0)

    async def scenario(service: Recorder) -> dict[str, Any]:
        call, uas = await dial_an_echo(service, tmp_path)
        await asyncio.sleep(6.0)
        conv = service.conversations[-1]
        assert conv.room is not None
        out = {"mode": conv.room.mode, "attempts": list(conv.room.attempts), "items": items(conv)}
        await call.hangup("test done")
        out["uas"] = await finish(uas, tmp_path)
        return out

    with caplog.at_level(logging.DEBUG, logger="appliance.room"):
        out = run_sip(models, config, scenario)
    assert out["uas"][0] == 0, out["uas"][1]
    assert out["mode"] == "direct"
    heard = " ".join(t.lower() for r, t in out["items"] if r == "user")
    assert "hello" in heard, out["items"]  # the call works offline
    outcomes = [a["outcome"] for a in out["attempts"]]
    assert len(outcomes) >= 2 and len(set(outcomes)) == 1, outcomes
    assert "refused the credentials" in outcomes[0] and "401" in outcomes[0], outcomes
    warnings = [r for r in caplog.records if "refused the credentials" in r.getMessage()]
    assert [r.levelno for r in warnings][:2] == [logging.WARNING, logging.DEBUG]  # said once
    assert not any("eyJ" in r.getMessage() for r in caplog.records)  # no token in the log


def test_a_listen_only_token_hears_the_room_and_cannot_publish(
    tmp_path: Path, livekit_server: LiveKitServer, secret_file: Path
) -> None:
    from appliance.cli import main

    server = livekit_server
    toml = tmp_path / "appliance.toml"
    toml.write_text(
        f'[livekit]\nurl = "{server.url}"\napi_key = "{server.key}"\n'
        f'api_secret_file = "{secret_file}"\n'
    )

    def token(identity: str, *flags: str) -> str:
        buffer = io.StringIO()
        with contextlib.redirect_stdout(buffer):
            args = ["room", "token", "desk", "--identity", identity, "--config", str(toml)]
            assert main([*args, *flags]) == 0
        return buffer.getvalue().strip()

    async def main_() -> dict[str, Any]:
        speaker = rtc.Room()
        await speaker.connect(server.url, token("colleague"))
        source = rtc.AudioSource(RATE, 1)
        await speaker.local_participant.publish_track(
            rtc.LocalAudioTrack.create_audio_track("mic", source)
        )
        listener = Browser()
        await listener.join(server.url, token("supervisor", "--listen-only"))
        for _ in range(100):
            await source.capture_frame(
                rtc.AudioFrame((np.ones(320, np.int16) * 3000).tobytes(), RATE, 1, 320)
            )
        await asyncio.sleep(1.0)
        out: dict[str, Any] = {"heard": len(listener.heard("colleague"))}
        try:
            await asyncio.wait_for(listener.say(np.zeros(RATE, np.int16)), 30)
            out["published"] = True
        except Exception as exc:
            out["published"] = False
            out["error"] = repr(exc)
        await listener.leave()
        await speaker.disconnect()
        return out

    out = asyncio.run(main_())
    assert out["heard"] > 0  # the listener hears the room
    assert out["published"] is False, out  # the server refuses its track
