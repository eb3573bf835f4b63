"""The kiosk in real time: a PulseAudio server with pipe source/sink stands in for the room.

`bench.room_sim.Room` starts `pulseaudio` with `module-pipe-sink` (the speaker, clocked
by the system clock) and `module-pipe-source` (the microphone); the bridge reaches them
through ALSA's pulse plugin under the names voice_in/voice_out, so the whole PortAudio path
is real and paced. The room's thread reads what the speaker plays and writes the microphone
in real time: the user's speech (Piper voice) plus, when asked, an echo of the speaker
(delayed and attenuated), as a speakerphone would pick it up.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance import config as config_mod
from appliance.usb.audio import UsbAudio
from appliance.usb.kiosk import serve_usb
from bench import room_sim as audiosim
from bench.room_sim import Room

from .conftest import transcribed_as

RATE = 16000

pytestmark = pytest.mark.skipif(not audiosim.available(), reason="needs pulseaudio")


def kiosk_config(**audio: Any) -> config_mod.Config:
    return config_mod.parse(
        {
            "session": {"turn_detection": "vad", "min_interruption_duration": 0.4},
            "audio": {"enabled": True, "input_rate": RATE, "output_rate": RATE, **audio},
            "models": {"turn_model": "smart-turn/v3.2"},
        },
        "<kiosk test>",
    )


def run_kiosk(
    models: Any,
    config: config_mod.Config,
    scenario: Any,
    timeout: float = 60,
    on_conversation: Any = None,
) -> Any:
    """Run the kiosk with `scenario(usb, session)` as the test's script; returns its result."""

    async def main() -> Any:
        stop = asyncio.Event()
        usb = UsbAudio(config.audio)
        usb.start()
        sessions: list[Any] = []

        def started(conv: Any) -> None:
            sessions.append(conv)
            if on_conversation is not None:
                on_conversation(conv)

        kiosk = asyncio.create_task(
            serve_usb(lambda: config, models, stop, usb=usb, on_session=started)
        )
        try:
            assert await usb.wait_connected(10)
            while not sessions:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            return await asyncio.wait_for(scenario(usb, sessions[-1].session), timeout)
        finally:
            stop.set()
            await asyncio.wait_for(kiosk, 30)
            usb.close()

    return asyncio.run(main())


def rms(pcm: np.ndarray) -> float:
    return float(np.sqrt(np.mean(pcm.astype(np.float64) ** 2))) if len(pcm) else 0.0


async def ask(room: Room, usb: UsbAudio, session: Any, question: np.ndarray) -> np.ndarray:
    """Say `question` into the room and wait (40 s at most) until the agent has replied and
    the speaker is quiet; returns what the room heard from the speaker meanwhile."""
    played_before = len(room.played) // 2
    room.say(question)
    deadline = time.monotonic() + 40
    while time.monotonic() < deadline:
        replies = [i for i in session.history.items if getattr(i, "role", None) == "assistant"]
        if replies and session.agent_state == "listening" and not usb.speaker.playing:
            break
        await asyncio.sleep(0.1)
    return room.played_pcm(played_before)


def test_a_spoken_question_gets_a_spoken_reply(models: Any, speak: Any, room: Room) -> None:
    async def scenario(usb: UsbAudio, session: Any) -> tuple[list[Any], np.ndarray]:
        reply = await ask(room, usb, session, speak("What is the capital of France?"))
        return list(session.history.items), reply

    items, reply = run_kiosk(models, kiosk_config(), scenario)
    user = [i.text_content for i in items if getattr(i, "role", None) == "user"]
    assistant = [i.text_content for i in items if getattr(i, "role", None) == "assistant"]
    assert user and transcribed_as("What is the capital of France?", user[0]), user
    assert assistant and assistant[0]
    assert rms(reply) > 300  # the reply came out of the speaker


LONG_REPLY = (
    "Here is a longer announcement from the kiosk. The museum opens at nine in the morning "
    "and closes at six in the evening. Guided tours start every hour from the main hall, "
    "and the cafe on the first floor serves lunch until three."
)


def _say_long(room: Room, speak_user: np.ndarray | None):  # type: ignore[no-untyped-def]
    async def scenario(usb: UsbAudio, session: Any) -> dict[str, Any]:
        handle = session.say(LONG_REPLY)
        if speak_user is not None:
            await asyncio.sleep(3.0)
            room.say(speak_user)
        await handle.wait_for_playout()
        await asyncio.sleep(0.3)
        return {"interrupted": handle.interrupted, "segments": list(usb.speaker.segments)}

    return scenario


def test_echo_does_not_interrupt_the_agent_with_echo_cancellation(models: Any, room: Room) -> None:
    room.echo_gain = 0.5  # -6 dB: a speakerphone's speaker close to its microphone
    result = run_kiosk(models, kiosk_config(echo_cancellation=True), _say_long(room, None))
    assert result["interrupted"] is False, (result, room.echo_resyncs)


def test_echo_interrupts_the_agent_without_echo_cancellation(models: Any, room: Room) -> None:
    room.echo_gain = 0.5
    config = kiosk_config(echo_cancellation=False, noise_suppression=False, auto_gain_control=False)
    result = run_kiosk(models, config, _say_long(room, None))
    assert result["interrupted"] is True, result


def test_a_user_talking_over_the_agent_still_interrupts_it(
    models: Any, speak: Any, room: Room
) -> None:
    room.echo_gain = 0.5
    user = speak("Stop, stop. I have a different question about parking.")
    result = run_kiosk(models, kiosk_config(echo_cancellation=True), _say_long(room, user))
    assert result["interrupted"] is True, result


def test_losing_the_sound_card_mid_reply_and_getting_it_back(
    models: Any, speak: Any, room: Room, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario(usb: UsbAudio, session: Any) -> dict[str, Any]:
        handle = session.say(LONG_REPLY)
        await asyncio.sleep(2.0)
        await asyncio.to_thread(room.stop_server)  # the card is unplugged mid-reply
        await asyncio.wait_for(handle.wait_for_playout(), 10)  # the reply does not hang
        lost_at = time.monotonic()
        while usb.microphone.device.connected.is_set() or usb.speaker.device.connected.is_set():
            assert time.monotonic() - lost_at < 5
            await asyncio.sleep(0.05)
        await asyncio.sleep(1.0)
        await asyncio.to_thread(room.start_server)  # plugged back in
        back_at = time.monotonic()
        while not (
            usb.microphone.device.connected.is_set() and usb.speaker.device.connected.is_set()
        ):
            assert time.monotonic() - back_at < 10
            await asyncio.sleep(0.05)
        reconnect_s = time.monotonic() - back_at
        frames = usb.microphone.frames
        await asyncio.sleep(1.0)
        return {
            "interrupted": handle.interrupted,
            "reconnect_s": reconnect_s,
            "frames_after": usb.microphone.frames - frames,
        }

    import logging

    caplog.set_level(logging.INFO, logger="appliance.usbaudio")
    result = run_kiosk(models, kiosk_config(), scenario)
    print(f"\nsound card back after {result['reconnect_s']:.2f} s")
    assert result["reconnect_s"] < 2.0, result
    assert result["frames_after"] > 25, result  # the microphone flows again (20 ms frames)
    lost = [r for r in caplog.records if "unavailable" in r.getMessage()]
    back = [r for r in caplog.records if "is back" in r.getMessage()]
    assert 1 <= len(lost) <= 2 and len(back) == len(lost), [r.getMessage() for r in caplog.records]


def test_appliance_run_is_a_working_kiosk_and_stops_on_sigterm(
    speak: Any, room: Room, tmp_path: Path
) -> None:
    """The real daemon (`appliance run`) in the simulated room, as a user would run it."""
    import os
    import signal
    import subprocess
    import sys

    config = tmp_path / "kiosk.toml"
    config.write_text(
        '[session]\nturn_detection = "vad"\n\n[audio]\nenabled = true\n\n'
        '[agent]\ngreeting = "Hello, ask me anything."\n'
    )
    log = tmp_path / "daemon.log"
    with log.open("w") as err:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "appliance", "run", "--config", str(config)],
            stderr=err,
            env={**os.environ},
        )
        try:
            deadline = time.monotonic() + 60
            while "kiosk session started" not in log.read_text():
                assert daemon.poll() is None, log.read_text()
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(4.0)  # the greeting plays
            greeting = room.played_pcm()
            start = len(room.played) // 2
            room.say(speak("What is the capital of France?"))
            deadline = time.monotonic() + 40
            while "assistant:" not in log.read_text().partition("user:")[2]:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
            time.sleep(3.0)
            reply = room.played_pcm(start)
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(15) == 0, log.read_text()
        finally:
            if daemon.poll() is None:
                daemon.kill()
    text = log.read_text()
    said = re.search(r"user: (.*?) \[session=", text)
    assert said and transcribed_as("What is the capital of France?", said.group(1)), text
    assert rms(greeting) > 300 and rms(reply) > 300  # both were heard in the room
    assert "ending session: the daemon is stopping" in text


def test_appliance_run_needs_a_bridge(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "appliance", "run"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 78
    assert "no bridge is enabled; set [audio] enabled = true" in out.stderr
