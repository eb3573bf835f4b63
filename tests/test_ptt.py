"""Push-to-talk: three button backends, one behaviour; then the real session in a real room.

GPIO pins cannot be reached here, so each backend gets the test double its library offers
or that stands in for the kernel: gpiozero's MockFactory (callbacks on the thread that
drives the pin; it does not emulate bounce), a fake libgpiod line request (edge events with
kernel timestamps), and a fake evdev device (an async stream of key events). Everything
after the edges is the real code: debouncer, PushToTalk, AgentSession, the USB bridge in
the simulated PulseAudio room, the real models.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
import pytest
from gpiozero.pins.mock import MockFactory

from appliance import config as config_mod
from appliance.ptt.inputs import Debouncer, EvdevButton, GpiodButton, GpiozeroButton
from appliance.ptt.led import make_led
from appliance.ptt.turns import PushToTalk, serve_button
from appliance.usb.audio import UsbAudio
from appliance.usb.kiosk import serve_usb
from bench.room_sim import Room

from .conftest import conversation, transcribed_as

RATE = 16000


def ptt_config(**over: Any) -> config_mod.PttConfig:
    return config_mod.PttConfig(backend="gpiozero", **over)


class Recorder:
    """Presses and releases as they come out of the debouncer."""

    def __init__(self, debounce_ms: int = 20) -> None:
        self.events: list[str] = []
        self.debouncer = Debouncer(
            debounce_ms / 1000,
            lambda _: self.events.append("press"),
            lambda _: self.events.append("release"),
        )


# -- gpiozero ----------------------------------------------------------------------------------


def test_gpiozero_pin_edges_become_one_press_and_one_release() -> None:
    factory = MockFactory()
    pin = factory.pin(17)

    async def main() -> list[str]:
        rec = Recorder()
        button = GpiozeroButton(ptt_config(pin=17), pin_factory=factory)
        button.start(asyncio.get_running_loop(), rec.debouncer.edge, lambda: None)
        try:
            # a press with contact bounce, a hold, a release with bounce (from this thread,
            # as a GPIO thread would: the callbacks hop to the loop)
            for level in ("low", "high", "low", "high", "low"):
                await asyncio.to_thread(getattr(pin, f"drive_{level}"))
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.2)
            for level in ("high", "low", "high"):
                await asyncio.to_thread(getattr(pin, f"drive_{level}"))
                await asyncio.sleep(0.002)
            await asyncio.sleep(0.1)
            # a quick tap, inside the debounce time: still a press and a release
            await asyncio.to_thread(pin.drive_low)
            await asyncio.sleep(0.005)
            await asyncio.to_thread(pin.drive_high)
            await asyncio.sleep(0.1)
            return rec.events
        finally:
            button.close()

    assert asyncio.run(main()) == ["press", "release", "press", "release"]


def test_gpiozero_pull_and_active_level_follow_the_config() -> None:
    factory = MockFactory()

    async def main() -> list[str]:
        rec = Recorder()
        cfg = ptt_config(pin=5, pull="none", active_low=False)
        button = GpiozeroButton(cfg, pin_factory=factory)
        button.start(asyncio.get_running_loop(), rec.debouncer.edge, lambda: None)
        try:
            pin = factory.pin(5)
            await asyncio.to_thread(pin.drive_high)  # active high: high = pressed
            await asyncio.sleep(0.05)
            await asyncio.to_thread(pin.drive_low)
            await asyncio.sleep(0.05)
            return rec.events
        finally:
            button.close()

    assert asyncio.run(main()) == ["press", "release"]


# -- gpiod -------------------------------------------------------------------------------------


class FakeEdge:
    def __init__(self, rising: bool, at: float) -> None:
        import gpiod

        self.event_type = (
            gpiod.EdgeEvent.Type.RISING_EDGE if rising else gpiod.EdgeEvent.Type.FALLING_EDGE
        )
        self.timestamp_ns = int(at * 1e9)
        self.line_offset = 17


class FakeLineRequest:
    """libgpiod's LineRequest as the kernel drives it: edge events, already debounced."""

    def __init__(self) -> None:
        import queue

        self.events: queue.Queue[FakeEdge] = queue.Queue()
        self.released = False

    def wait_edge_events(self, timeout: datetime.timedelta) -> bool:
        deadline = time.monotonic() + timeout.total_seconds()
        while time.monotonic() < deadline and not self.released:
            if not self.events.empty():
                return True
            time.sleep(0.005)
        return False

    def read_edge_events(self) -> list[FakeEdge]:
        out = []
        while not self.events.empty():
            out.append(self.events.get())
        return out

    def release(self) -> None:
        self.released = True


def test_gpiod_requests_a_debounced_pulled_up_line_and_turns_edges_into_presses() -> None:
    from gpiod.line import Bias, Direction, Edge

    request = FakeLineRequest()
    asked: dict[str, Any] = {}

    def request_lines(path: str, consumer: str, config: dict[int, Any]) -> FakeLineRequest:
        asked.update(path=path, consumer=consumer, config=config)
        return request

    async def main() -> list[str]:
        rec = Recorder()
        button = GpiodButton(ptt_config(chip="/dev/gpiochip0", line=17), request_lines)
        button.start(asyncio.get_running_loop(), rec.debouncer.edge, lambda: None)
        try:
            now = time.monotonic()
            request.events.put(FakeEdge(True, now))  # active low: rising = pressed
            request.events.put(FakeEdge(False, now + 0.3))
            await asyncio.sleep(0.2)
            return rec.events
        finally:
            button.close()

    assert asyncio.run(main()) == ["press", "release"]
    settings = asked["config"][17]
    assert asked["path"] == "/dev/gpiochip0" and asked["consumer"] == "appliance-ptt"
    assert settings.direction == Direction.INPUT and settings.edge_detection == Edge.BOTH
    assert settings.bias == Bias.PULL_UP and settings.active_low is True
    assert settings.debounce_period == datetime.timedelta(milliseconds=20)
    assert request.released


# -- evdev -------------------------------------------------------------------------------------


class FakeInputEvent:
    def __init__(self, type_: int, code: int, value: int) -> None:
        self.type, self.code, self.value = type_, code, value


class FakeInputDevice:
    """An evdev InputDevice: key events, then (optionally) unplugged."""

    def __init__(self, events: list[tuple[int, int, int]], unplug: bool = False) -> None:
        self.events = events
        self.unplug = unplug
        self.closed = False

    async def async_read_loop(self) -> AsyncIterator[FakeInputEvent]:
        for type_, code, value in self.events:
            await asyncio.sleep(0.03)
            yield FakeInputEvent(type_, code, value)
        if self.unplug:
            raise OSError(19, "No such device")
        await asyncio.Event().wait()

    def close(self) -> None:
        self.closed = True


EV_KEY, EV_SYN, KEY_F13, KEY_A = 1, 0, 183, 30


def test_evdev_key_events_become_presses_and_a_lost_device_is_reopened(
    caplog: pytest.LogCaptureFixture,
) -> None:
    first = FakeInputDevice(
        [
            (EV_KEY, KEY_F13, 1),
            (EV_SYN, 0, 0),
            (EV_KEY, KEY_F13, 2),  # autorepeat while held: ignored
            (EV_KEY, KEY_A, 1),  # another key: ignored
            (EV_KEY, KEY_F13, 0),
        ],
        unplug=True,
    )
    second = FakeInputDevice([(EV_KEY, KEY_F13, 1), (EV_KEY, KEY_F13, 0)])
    devices = [first, second]
    cfg = config_mod.PttConfig(backend="evdev", key="KEY_F13", min_press_ms=0)

    async def main() -> list[str]:
        rec: list[str] = []
        ptt = PushToTalk(cfg)
        ptt.debouncer = Debouncer(
            0.02, lambda _: rec.append("press"), lambda _: rec.append("release")
        )
        stop = asyncio.Event()
        task = asyncio.create_task(
            serve_button(cfg, ptt, stop, make=lambda: EvdevButton(cfg, devices.pop(0)))
        )
        await asyncio.sleep(3.0)  # events, unplug, 2 s retry, events again
        stop.set()
        await task
        return rec

    caplog.set_level("INFO", logger="appliance.ptt")
    assert asyncio.run(main()) == ["press", "release", "press", "release"]
    messages = [r.getMessage() for r in caplog.records]
    assert any("push-to-talk button lost" in m for m in messages), messages
    assert any("push-to-talk button is back" in m for m in messages), messages
    assert first.closed and second.closed


# -- LED ---------------------------------------------------------------------------------------


def test_led_patterns_are_distinct_per_state() -> None:
    factory = MockFactory()
    cfg = ptt_config(led_backend="gpiozero", led_pin=27)
    led = make_led(cfg, pin_factory=factory)
    assert led is not None
    pin = factory.pin(27)

    def toggles(state: str, seconds: float = 1.0) -> tuple[int, bool]:
        """Level changes of the pin over `seconds` once the state has settled, and its level."""
        led.show(state)
        time.sleep(0.15)
        pin.clear_states()
        time.sleep(seconds)
        levels = [s.state for s in pin.states]
        return sum(a != b for a, b in itertools.pairwise(levels)), bool(pin.state)

    try:
        listening = toggles("listening")
        thinking = toggles("thinking")
        speaking = toggles("speaking")
        idle = toggles("idle")
    finally:
        led.close()
    assert listening == (0, True)  # steady on
    assert thinking[0] >= 8  # 5 Hz blink: about 10 changes a second
    assert 1 <= speaking[0] <= 3  # 1 Hz blink: about 2
    assert idle == (0, False)  # off
    assert led.history == ["idle", "listening", "thinking", "speaking", "idle"]


# -- the real session ---------------------------------------------------------------------------


def kiosk_ptt_config() -> config_mod.Config:
    return config_mod.parse(
        {
            "session": {"turn_detection": "model"},  # the button wins: turns are manual
            "audio": {"enabled": True, "input_rate": RATE, "output_rate": RATE},
            "ptt": {"backend": "gpiozero", "pin": 17, "led_backend": "gpiozero", "led_pin": 27},
        },
        "<ptt test>",
    )


def run_ptt_kiosk(models: Any, scenario: Callable[..., Any], timeout: float = 90) -> Any:
    """The kiosk with a mock-pin button and LED; `scenario(usb, session, pin, ptt)`."""
    config = kiosk_ptt_config()
    factory = MockFactory()
    pin = factory.pin(17)

    async def main() -> Any:
        stop = asyncio.Event()
        usb = UsbAudio(config.audio)
        usb.start()
        led = make_led(config.ptt, pin_factory=factory)
        ptt = PushToTalk(config.ptt, led)
        button = asyncio.create_task(
            serve_button(config.ptt, ptt, stop, make=lambda: GpiozeroButton(config.ptt, factory))
        )
        sessions: list[Any] = []
        kiosk = asyncio.create_task(
            serve_usb(lambda: config, models, stop, usb=usb, on_session=sessions.append, ptt=ptt)
        )
        try:
            assert await usb.wait_connected(10)
            while not sessions:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.5)
            return await asyncio.wait_for(scenario(usb, sessions[-1].session, pin, ptt), timeout)
        finally:
            stop.set()
            await asyncio.wait_for(kiosk, 30)
            await button
            usb.close()
            if led is not None:
                led.close()

    return asyncio.run(main())


async def wait_reply_done(session: Any, usb: UsbAudio, replies: int, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done = sum(r == "assistant" for r, _ in conversation(session)) >= replies
        if done and session.agent_state == "listening" and not usb.speaker.playing:
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"no reply: {conversation(session)}")


async def hold(pin: Any, seconds: float) -> None:
    await asyncio.to_thread(pin.drive_low)
    await asyncio.sleep(seconds)
    await asyncio.to_thread(pin.drive_high)


def test_push_to_talk_end_to_end(models: Any, speak: Callable[..., np.ndarray], room: Room) -> None:
    question = speak("What is the capital of France?")

    async def scenario(usb: UsbAudio, session: Any, pin: Any, ptt: PushToTalk) -> dict[str, Any]:
        out: dict[str, Any] = {}
        # 1. talking while the button is up: the session hears nothing
        frames = usb.microphone.frames
        room.say(question)
        await asyncio.sleep(len(question) / RATE + 2.0)
        out["while_up"] = conversation(session)
        out["mic_frames_while_up"] = usb.microphone.frames - frames  # captured, then dropped
        out["user_state_while_up"] = session.user_state
        # 2. a too-short press: no turn
        await hold(pin, 0.1)
        await asyncio.sleep(1.5)
        out["after_tap"] = conversation(session)
        # 3. hold, speak, release: one turn, one reply; the LED follows
        ptt.led.history[:] = [ptt.led.state]  # type: ignore[union-attr]
        requests: list[Any] = []
        session.llm.on("metrics_collected", requests.append)
        await asyncio.to_thread(pin.drive_low)
        await asyncio.sleep(0.2)
        room.say(question)
        await asyncio.sleep(len(question) / RATE + 0.3)
        await asyncio.to_thread(pin.drive_high)
        await wait_reply_done(session, usb, 1)
        out["after_turn"] = conversation(session)
        out["led"] = list(ptt.led.history)  # type: ignore[union-attr]
        out["prompts"] = [(m.prompt_tokens, m.prompt_cached_tokens) for m in requests]
        # 4. a press during a reply stops playback at once
        handle = session.say(
            "The museum opens at nine in the morning and closes at six in the evening, "
            "every day except Monday, and guided tours start every hour from the main hall."
        )
        while not usb.speaker.playing:
            await asyncio.sleep(0.01)
        await asyncio.sleep(1.5)
        taken = usb.speaker.samples_taken
        await asyncio.to_thread(pin.drive_low)
        await handle.wait_for_playout()
        out["after_press_s"] = (usb.speaker.samples_taken - taken) / usb.speaker.device.rate
        out["interrupted"] = handle.interrupted
        await asyncio.to_thread(pin.drive_high)
        await asyncio.sleep(0.5)
        out["turns_committed"] = ptt.turns_committed
        return out

    out = run_ptt_kiosk(models, scenario)
    assert out["while_up"] == [], out  # nothing reached the STT
    assert out["mic_frames_while_up"] > 100  # the microphone was live, its audio dropped
    assert out["user_state_while_up"] != "speaking"
    assert out["after_tap"] == []
    users = [t for r, t in out["after_turn"] if r == "user"]
    replies = [t for r, t in out["after_turn"] if r == "assistant"]
    assert len(users) == 1 and transcribed_as("What is the capital of France?", users[0]), out[
        "after_turn"
    ]
    assert len(replies) == 1 and replies[0]
    # the words were transcribed at the pause while the button was held and put into the
    # LLM's KV cache as the reply's prompt: the request after the release found all of it
    [(prompt, cached)] = out["prompts"]
    assert cached == prompt, out["prompts"]
    assert out["led"][:5] == ["idle", "listening", "thinking", "speaking", "idle"], out["led"]
    assert out["interrupted"] is True
    # one 10 ms block may already be on its way to the device when the press lands
    assert out["after_press_s"] <= 0.03, out["after_press_s"]


def test_a_double_press_cancels_the_turn_without_a_reply(
    models: Any, speak: Callable[..., np.ndarray], room: Room
) -> None:
    question = speak("How many days are in a week?")

    async def scenario(usb: UsbAudio, session: Any, pin: Any, ptt: PushToTalk) -> dict[str, Any]:
        await asyncio.to_thread(pin.drive_low)
        await asyncio.sleep(0.2)
        room.say(question)
        await asyncio.sleep(len(question) / RATE + 0.3)
        await asyncio.to_thread(pin.drive_high)
        await asyncio.sleep(0.15)
        await hold(pin, 0.1)  # the second press of a double press
        played = len(room.played) // 2
        await asyncio.sleep(5.0)
        return {
            "roles": conversation(session),
            "reply_audio": room.played_pcm(played),
            "memory": [getattr(i, "role", None) for i in session.current_agent.chat_ctx.items],
            "cancels": ptt.cancels,
        }

    out = run_ptt_kiosk(models, scenario)
    assert out["cancels"] == 1
    # Whisper is done before the second press, so the turn was committed and its reply
    # started: the reply is cut before a word is spoken and the turn leaves the agent's
    # memory; the session's history still logs what the user said
    assert "assistant" not in [r for r, _ in out["roles"]], out["roles"]
    assert "user" not in out["memory"]
    assert np.abs(out["reply_audio"].astype(np.int32)).max(initial=0) < 300  # nothing spoken


def test_the_button_wins_over_turn_detection_and_needs_the_microphone(tmp_path: Any) -> None:
    import subprocess
    import sys

    config = config_mod.parse(
        {
            "session": {"turn_detection": "vad"},
            "audio": {"enabled": True},
            "ptt": {"backend": "gpiod"},
        },
        "<test>",
    )
    assert config.turn_detection == "manual"
    assert "livekit/turn-detector-v1-mini" not in config.models_in_use()
    path = tmp_path / "ptt.toml"
    path.write_text(
        '[session]\nturn_detection = "model"\n[audio]\nenabled = true\n[ptt]\nbackend = "evdev"\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "config", "check", str(path)],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0
    assert "turn_detection='manual'" in out.stdout
    assert "[session] turn_detection = 'model' is not used" in out.stdout
    with pytest.raises(config_mod.ConfigError, match=r"needs the USB microphone"):
        config_mod.parse({"ptt": {"backend": "gpiozero"}}, "<test>")
