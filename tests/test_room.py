"""The LiveKit room bridge (`appliance.room`) without a server; tests/test_room_server.py
runs it against a real one.

Tokens are decoded and verified with livekit-api's own verifier; the per-kind noise filter
runs the real WebRTC APM; the fallbacks run real phone calls (our SIP stack calling a sipp
echo) against a refused loopback port and a loopback port that accepts and never answers.
A room that drops at a chosen moment, and a retry refused on cue, are a stand-in `Link`:
the real server's death and restart are in test_room_server.py.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import jwt
import numpy as np
import pytest
from livekit import api, rtc

from appliance import room as room_mod
from appliance.audio.live import LiveInput, Playout
from appliance.config import ConfigError, LivekitConfig, parse
from appliance.usb.audio import UsbAudio
from bench import room_sim as audiosim

from .conftest import conversation, free_udp_port, transcribed_as
from .test_kiosk import ask, kiosk_config, rms, run_kiosk
from .test_sip import (
    ECHO_PHONE,
    SIPP,
    Recorder,
    finish,
    items,
    run_sip,
    sip_config,
    start_sipp,
)
from .test_web import SCHEMA

KEY, SECRET = "APIappliancetest", "s" * 24 + "ecret-for-tests-only-0123"


def lk_config(**kw: Any) -> LivekitConfig:
    return LivekitConfig(enabled=True, url="ws://127.0.0.1:7880", api_key=KEY, **kw)


CALL = {
    "call_id": "a84b4c76e66710@pc33.example.org",
    "direction": "inbound",
    "phone_number": "+15551234567",
    "display_name": "Alice",
    "uri": "sip:+15551234567@pbx.lan",
}


def test_tokens_carry_room_identity_kind_attributes_and_grants() -> None:
    cfg = lk_config(token_ttl=600)
    person = room_mod.caller_person(CALL)
    token = room_mod.mint_token(
        cfg,
        SECRET,
        room="call-1",
        identity=person.identity,
        name=person.name,
        kind=person.kind,
        attributes=person.attributes,
    )
    claims = api.TokenVerifier(KEY, SECRET).verify(token)
    assert claims.identity == "sip_+15551234567"
    assert claims.name == "Alice"
    assert claims.kind == "sip"
    assert claims.attributes["sip.callID"] == CALL["call_id"]
    assert claims.attributes["sip.phoneNumber"] == "+15551234567"
    assert claims.attributes["sip.callStatus"] == "active"
    video = claims.video
    assert video is not None
    assert (video.room_join, video.room, video.can_publish, video.can_subscribe) == (
        True,
        "call-1",
        True,
        True,
    )
    assert not video.agent and not video.room_admin and not video.room_create
    body = jwt.decode(token, SECRET, algorithms=["HS256"], issuer=KEY)
    assert body["exp"] - body["nbf"] == 600

    agent = room_mod.mint_token(
        cfg, SECRET, room="call-1", identity="agent_x", name="A", kind="agent"
    )
    agent_claims = api.TokenVerifier(KEY, SECRET).verify(agent)
    assert agent_claims.kind == "agent" and agent_claims.video and agent_claims.video.agent
    with pytest.raises(jwt.InvalidSignatureError):  # signed with our secret, no other
        api.TokenVerifier(KEY, "another-secret-of-enough-length-000").verify(token)


def test_people_in_the_room_and_room_names() -> None:
    odd = room_mod.caller_person({"call_id": "x@y", "phone_number": "", "display_name": ""})
    assert odd.identity == "sip_x_y" and odd.name == "Phone caller" and odd.kind == "sip"
    kiosk = room_mod.kiosk_person("lobby-pi")
    assert (kiosk.identity, kiosk.kind) == ("kiosk_lobby-pi", "standard")
    assert kiosk.attributes[room_mod.PROCESSED] == "true"  # echo-cancelled on the appliance

    name = room_mod.room_name("call-{call_id}", call_id=CALL["call_id"], host="h")
    assert name == "call-a84b4c76e66710-pc33.example.org"
    assert room_mod.room_name("{host}-{session}", session="sip-3", host="pi") == "pi-sip-3"


def test_livekit_config_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match=r"\[livekit\] room = .*unknown field \{caller\}"):
        parse({"livekit": {"room": "{caller}"}}, "t")
    with pytest.raises(ConfigError, match=r"\[livekit\] enabled = true needs url and api_key"):
        parse({"livekit": {"enabled": True}}, "t")
    with pytest.raises(ConfigError, match=r"\[livekit\] url = 'lan:7880'"):
        parse({"livekit": {"url": "lan:7880"}}, "t")

    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="no systemd credential 'livekit-api-secret'"):
        lk_config().secret()
    with pytest.raises(ConfigError, match="No such file"):
        lk_config(api_secret_file=str(tmp_path / "missing")).secret()
    (tmp_path / "livekit-api-secret").write_text(SECRET + "\n")
    assert lk_config(api_secret_file=str(tmp_path / "livekit-api-secret")).secret() == SECRET
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # systemd's LoadCredential=
    assert lk_config().secret() == SECRET


def participant(kind: int, **attributes: str) -> Any:
    return SimpleNamespace(kind=kind, attributes=attributes)


def test_noise_filter_is_chosen_per_participant_kind_and_is_real() -> None:
    kinds = rtc.ParticipantKind
    track = SimpleNamespace()
    sip = room_mod.noise_filter(
        room_mod.NoiseCancellationParams(participant(kinds.PARTICIPANT_KIND_SIP), track)
    )
    web = room_mod.noise_filter(
        room_mod.NoiseCancellationParams(participant(kinds.PARTICIPANT_KIND_STANDARD), track)
    )
    own = room_mod.noise_filter(
        room_mod.NoiseCancellationParams(
            participant(kinds.PARTICIPANT_KIND_STANDARD, **{room_mod.PROCESSED: "true"}), track
        )
    )
    assert isinstance(sip, room_mod.LocalNoiseFilter) and sip.telephony
    assert isinstance(web, room_mod.LocalNoiseFilter) and not web.telephony
    assert own is None

    noise = (np.random.default_rng(1).standard_normal(16000 * 3) * 2000).astype(np.int16)
    for fltr in (sip, web):
        out = []
        for i in range(0, len(noise), 320):  # RoomIO's 20 ms frames at 16 kHz
            frame = fltr._process(rtc.AudioFrame(noise[i : i + 320].tobytes(), 16000, 1, 320))
            assert frame.samples_per_channel == 320
            out.append(np.frombuffer(frame.data, np.int16))
        cleaned = np.concatenate(out)[-16000:].astype(float)
        before = float(np.sqrt(np.mean(noise[-16000:].astype(float) ** 2)))
        after = float(np.sqrt(np.mean(cleaned**2)))
        assert after < 0.5 * before, (fltr.telephony, before, after)  # at least 6 dB less


def test_the_mixer_sums_tracks_clips_and_keeps_the_newest() -> None:
    async def main() -> None:
        mixer = room_mod.RoomMixer(8000)
        mixer.add(None, "agent")
        mixer.add(None, "human")
        mixer.push("agent", np.full(160, 1000, np.int16))
        mixer.push("human", np.full(80, 30000, np.int16))
        block = mixer.pull(160)
        assert block[:80].tolist() == [31000] * 80 and block[80:].tolist() == [1000] * 80
        mixer.push("human", np.full(160, 30000, np.int16))
        mixer.push("agent", np.full(160, 30000, np.int16))
        assert mixer.pull(160).tolist() == [32767] * 160  # clipped, not wrapped
        assert mixer.pull(160).tolist() == [0] * 160  # nothing queued: silence
        for _ in range(20):  # a stalled sink keeps only the newest half second
            mixer.push("agent", np.full(800, 7, np.int16))
        assert len(mixer.pull(8000).nonzero()[0]) == 4000
        mixer.remove("human")
        assert not mixer.push("human", np.ones(10, np.int16))
        await mixer.aclose()

    asyncio.run(main())


# -- real calls --------------------------------------------------------------------------


def room_config(port: int, secret_file: Path, **lk: Any) -> Any:
    config = sip_config(port, ECHO_PHONE)  # the calls here go to an echo
    livekit = LivekitConfig(
        enabled=True,
        api_key=KEY,
        api_secret_file=str(secret_file),
        room="call-{call_id}",
        **{"url": "ws://127.0.0.1:9", "join_wait": 1.0, **lk},
    )
    return config.model_copy(update={"livekit": livekit})


@pytest.fixture
def secret_file(tmp_path: Path) -> Path:
    path = tmp_path / "livekit-secret"
    path.write_text(SECRET)
    return path


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A loopback port that accepts connections and never says a word."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    yield int(sock.getsockname()[1])
    sock.close()


def closed_tcp_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def dial_an_echo(service: Recorder, tmp_path: Path) -> tuple[Any, Any]:
    """Start a sipp that echoes RTP and have the appliance call it: (call, sipp process)."""
    echo_port = free_udp_port()
    uas = await start_sipp(tmp_path, None, "-sn", "uas", "-rtp_echo", port=echo_port)
    await asyncio.sleep(0.5)
    assert service.sip_ready is not None
    call = await service.sip_ready.result().dial(f"sip:echo@127.0.0.1:{echo_port}")
    return call, uas


async def call_an_echo(service: Recorder, tmp_path: Path, seconds: float) -> dict[str, Any]:
    """Dial a sipp echo; after `seconds` report what the call heard, then hang up."""
    call, uas = await dial_an_echo(service, tmp_path)
    await asyncio.sleep(seconds)
    conv = service.conversations[-1]
    result = {
        "up": not call.ended.is_set(),
        "items": items(conv),
        "bridge": conv.room,
        "mode": conv.room.mode if conv.room else None,
        "attempts": list(conv.room.attempts) if conv.room else [],
    }
    await call.hangup("test done")
    result["uas"] = await finish(uas, tmp_path)
    return result


@pytest.mark.skipif(SIPP is None, reason="needs sipp (Debian sip-tester)")
@pytest.mark.parametrize("server", ["refused", "never answers"])
def test_an_unreachable_server_leaves_the_call_offline_and_working(
    models: Any, tmp_path: Path, secret_file: Path, silent_server: int, server: str
) -> None:
    port = free_udp_port()
    target = closed_tcp_port() if server == "refused" else silent_server
    config = room_config(port, secret_file, url=f"ws://127.0.0.1:{target}")

    async def scenario(service: Recorder) -> dict[str, Any]:
        return await call_an_echo(service, tmp_path, 5.0)

    out = run_sip(models, config, scenario)
    assert out["uas"][0] == 0, out["uas"][1]
    assert out["up"], "the call ended"
    assert out["mode"] == "direct"
    heard = [t for r, t in out["items"] if r == "user"]
    assert any("hello" in t.lower() for t in heard), out["items"]  # its greeting, echoed
    attempts = out["attempts"]
    if server == "refused":  # tried again with backoff, every try failed
        assert len(attempts) >= 2, attempts
        assert all(a["outcome"].startswith("failed") for a in attempts), attempts
        assert attempts[1]["at"] - attempts[0]["at"] >= room_mod.RETRY_MIN_S
    else:  # the first try still hangs: the call did not wait for it
        assert all(a["outcome"] != "joined" for a in attempts), attempts


class DrainedPlayout(Playout):
    """The agent's audio track in a stand-in room: played out in real time, to nobody."""

    def __init__(self) -> None:
        super().__init__("stand-in room", padding_s=0.0)
        self._task = asyncio.create_task(self._drain())

    def sink_rate(self) -> int:
        return 16000

    async def _drain(self) -> None:
        while True:
            _, touched = self.take(320)
            self.taken(touched)
            await asyncio.sleep(0.02)


class StandInLink:
    """A room that hears nobody and drops when told (a LiveKit server is out of reach)."""

    def __init__(self) -> None:
        self.dropped = asyncio.Event()
        self.published = 0
        self.closed: bool | None = None
        self.output: DrainedPlayout | None = None

    async def attach(
        self, session: Any, local_in: LiveInput, local_out: Playout, text: Any
    ) -> None:
        self.output = DrainedPlayout()
        session.input.audio = LiveInput("stand-in room")
        session.output.audio = self.output
        local_in.divert(self._tap)
        local_out.divert(lambda n: np.zeros(n, np.int16))

    def _tap(self, frame: rtc.AudioFrame) -> None:
        self.published += 1

    def detach(self, local_in: LiveInput, local_out: Playout) -> None:
        local_in.divert(None)
        local_out.divert(None)

    async def aclose(self, hangup: bool = False) -> None:
        self.closed = hangup
        if self.output is not None:
            self.output._task.cancel()


@pytest.mark.skipif(SIPP is None, reason="needs sipp (Debian sip-tester)")
def test_a_room_that_drops_mid_call_leaves_the_call_running_and_is_rejoined(
    models: Any, tmp_path: Path, secret_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    links: list[StandInLink] = []
    tries: list[float] = []

    async def connect(*args: Any) -> StandInLink:
        tries.append(time.monotonic())
        if len(tries) == 2:
            raise ConnectionRefusedError("the server is still down")
        links.append(StandInLink())
        return links[-1]

    monkeypatch.setattr(room_mod.RoomLink, "connect", connect)
    port = free_udp_port()

    async def scenario(service: Recorder) -> dict[str, Any]:
        call, uas = await dial_an_echo(service, tmp_path)
        await asyncio.sleep(3.0)  # the greeting plays into the room
        conv = service.conversations[-1]
        bridge = conv.room
        assert bridge is not None
        out: dict[str, Any] = {"mode_before": bridge.mode, "heard_before": items(conv)}
        links[0].dropped.set()  # the server's plug is pulled
        await asyncio.sleep(0.5)
        out["mode_after"] = bridge.mode
        conv.session.say("Still here.")
        deadline = time.monotonic() + 40
        while bridge.mode != "room" or len(links) < 2:
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.2)
        out.update(
            up=not call.ended.is_set(),
            items=items(conv),
            modes=[mode for _, mode in bridge.switches],
            attempts=list(bridge.attempts),
            greeting=links[0].output.segments if links[0].output else [],
            published=links[0].published,
            snapshot=service.events.snapshot(),
        )
        await call.hangup("test done")
        out["uas"] = await finish(uas, tmp_path)
        return out

    out = run_sip(models, room_config(port, secret_file), scenario)
    assert out["uas"][0] == 0, out["uas"][1]
    assert out["mode_before"] == "room" and out["mode_after"] == "direct"
    assert out["up"], "the call ended"
    assert out["modes"] == ["room", "direct", "room"], out["modes"]
    assert out["greeting"] and not out["greeting"][0]["interrupted"]  # played in the room
    assert out["published"] > 50  # the caller's audio went to the room meanwhile
    assert not any(r == "user" for r, _ in out["heard_before"])  # the room heard nobody
    heard = [t for r, t in out["items"] if r == "user"]
    assert any("still here" in t.lower() for t in heard), out["items"]  # direct, both ways
    outcomes = [a["outcome"] for a in out["attempts"]]
    assert outcomes[0] == "joined" and outcomes[1].startswith("failed") and outcomes[2] == "joined"
    assert tries[2] - tries[1] >= 2 * room_mod.RETRY_MIN_S  # the backoff grew
    assert links[0].closed is False and links[1].closed is True  # hangup marked on leaving
    jsonschema.validate(out["snapshot"], SCHEMA)  # the events API shows the room and its mode
    rooms = [s["room"] for s in out["snapshot"]["data"]["sessions"]]
    assert rooms[-1]["mode"] == "room" and rooms[-1]["name"].startswith("call-"), rooms
    events = [m for m in out["snapshot"]["data"]["recent"] if m["type"] == "room"]
    assert [m["data"]["mode"] for m in events] == ["room", "direct", "room"], events


@pytest.mark.skipif(not audiosim.available(), reason="needs pulseaudio")
def test_a_kiosk_conversation_in_a_room_that_drops_goes_on_on_the_sound_card(
    models: Any,
    speak: Callable[..., np.ndarray],
    room: audiosim.Room,
    secret_file: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    links: list[StandInLink] = []

    async def connect(*args: Any) -> StandInLink:
        links.append(StandInLink())
        if len(links) > 1:
            raise ConnectionRefusedError("the server is still down")
        return links[-1]

    monkeypatch.setattr(room_mod.RoomLink, "connect", connect)
    lk = {"enabled": True, "url": "ws://127.0.0.1:9", "api_key": KEY}
    config = kiosk_config().model_copy(
        update={"livekit": LivekitConfig(**lk, api_secret_file=str(secret_file))}
    )
    bridges: list[Any] = []

    async def scenario(usb: UsbAudio, session: Any) -> dict[str, Any]:
        await asyncio.sleep(1.0)
        bridge = next(b for b in bridges if b is not None)
        out: dict[str, Any] = {"mode_before": bridge.mode, "published": links[0].published}
        links[0].dropped.set()
        await asyncio.sleep(0.5)
        out["mode_after"] = bridge.mode
        out["reply"] = await ask(room, usb, session, speak("What is the capital of France?"))
        out["items"] = conversation(session)
        return out

    out = run_kiosk(models, config, scenario, on_conversation=lambda c: bridges.append(c.room))
    assert out["mode_before"] == "room" and out["mode_after"] == "direct"
    assert out["published"] > 20  # 10 ms frames from the USB microphone, while in the room
    user = [t for r, t in out["items"] if r == "user"]
    assert user and transcribed_as("What is the capital of France?", user[0]), out["items"]
    assert any(r == "assistant" and t for r, t in out["items"])
    assert rms(out["reply"]) > 300  # out of the USB speaker again


def test_join_errors_name_refused_credentials_and_no_token_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from appliance.logs import guard_livekit_logs

    token = room_mod.mint_token(lk_config(), SECRET, room="r", identity="a", name="A", kind="sip")
    refused = ConnectionError(f"client error: 401 Unauthorized - invalid token: {token}, error: x")
    text = room_mod.bridge.join_error(refused)
    assert text.startswith("the server refused the credentials, check [livekit] api_key")
    assert token not in text and "<token>" in text
    assert room_mod.bridge.join_error(TimeoutError()) == "TimeoutError"
    guard_livekit_logs()
    guard_livekit_logs()  # once is enough
    with caplog.at_level(logging.WARNING, logger="livekit"):
        logging.getLogger("livekit").error("engine: %s", refused)
    assert caplog.records and all(token not in r.getMessage() for r in caplog.records)
    assert "<token>" in caplog.records[0].getMessage()


def test_room_token_command(tmp_path: Path, secret_file: Path, capsys: Any) -> None:
    from appliance.cli import main

    toml = tmp_path / "appliance.toml"
    toml.write_text(f'[livekit]\nurl = "ws://lk.lan:7880"\napi_key = "{KEY}"\n')
    assert main(["room", "token", "desk", "--identity", "s", "--config", str(toml)]) == 78
    assert "api_secret_file is not set" in capsys.readouterr().err
    toml.write_text(
        f'[livekit]\nurl = "ws://lk.lan:7880"\napi_key = "{KEY}"\n'
        f'api_secret_file = "{secret_file}"\n'
    )
    args = ["room", "token", "desk", "--identity", "sup", "--config", str(toml)]
    assert main([*args, "--listen-only", "--ttl", "600"]) == 0
    claims = api.TokenVerifier(KEY, SECRET).verify(capsys.readouterr().out.strip())
    assert claims.identity == "sup" and claims.video.room == "desk"
    assert claims.video.can_subscribe and not claims.video.can_publish
    assert not claims.video.can_update_own_metadata
    plain = toml.with_name("none.toml")
    plain.write_text("")
    assert main(["room", "token", "desk", "--identity", "s", "--config", str(plain)]) == 78
