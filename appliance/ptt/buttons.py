"""Push-to-talk: a button (and a status LED) driving the session's manual turn mode.

Backends turn a physical button into edges: `gpiozero` (Raspberry Pi), `gpiod` (libgpiod
v2: Jetson, any GPIO character device, debounced in the kernel) and `evdev` (a
device-tree gpio-key or a USB HID button). Thread backends hand edges to the event loop
with `call_soon_threadsafe`; a software debouncer there makes every backend behave the same.

`PushToTalk` gives the edges their meaning for the current AgentSession:

- press: interrupt the agent (if its speech may be interrupted), clear any partial user
  turn, open the microphone;
- release: close the microphone and commit the turn (`commit_user_turn()`);
- a press shorter than `min_press_ms` is ignored (its audio is dropped, no turn);
- a hold longer than `max_hold_s` commits at the limit (the release then does nothing);
- a press that starts within `cancel_window_ms` of the previous release cancels: the agent
  stops, the microphone stays closed and the turn just committed gets no reply and is
  left out of the agent's memory;
- while the button is up the microphone is closed: the session hears nothing.

`StatusLed` shows the state: on while the microphone is open (listening), a fast blink
while the agent thinks, a slow blink while it speaks, off when idle.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from appliance.config import PttConfig

logger = logging.getLogger("appliance.ptt")

# LED patterns: (seconds on, seconds off); None = steady
LED_PATTERNS: dict[str, tuple[float, float] | None] = {
    "idle": (0.0, 1.0),
    "listening": None,
    "thinking": (0.1, 0.1),
    "speaking": (0.5, 0.5),
}
RETRY_S = 2.0


class ButtonError(Exception):
    """The button (or LED) cannot be opened: wrong chip, line, device or permissions."""


def _hint(package: str, exc: ImportError) -> ButtonError:
    return ButtonError(f"{package} is not installed ({exc}); pip install 'appliance[ptt]'")


Edge = Callable[[bool, float], None]  # (pressed, monotonic time), called on the event loop
Lost = Callable[[], None]  # the device went away (called on the event loop)


class Button(Protocol):
    def start(self, loop: asyncio.AbstractEventLoop, edge: Edge, lost: Lost) -> None: ...

    def close(self) -> None: ...


# -- backends --------------------------------------------------------------------------------


class GpiozeroButton:
    """A header pin through gpiozero (Raspberry Pi; lgpio pin factory on the Pi 5)."""

    def __init__(self, cfg: PttConfig, pin_factory: Any = None) -> None:
        self.cfg, self.pin_factory = cfg, pin_factory
        self._button: Any = None

    def start(self, loop: asyncio.AbstractEventLoop, edge: Edge, lost: Lost) -> None:
        try:
            from gpiozero import Button as GzButton
            from gpiozero.exc import GPIOZeroError
        except ImportError as exc:
            raise _hint("gpiozero", exc) from None
        pull = {"up": True, "down": False, "none": None}[self.cfg.pull]
        active = None if pull is not None else not self.cfg.active_low
        try:
            self._button = GzButton(
                self.cfg.pin, pull_up=pull, active_state=active, pin_factory=self.pin_factory
            )
        except (GPIOZeroError, OSError) as exc:
            raise ButtonError(f"GPIO{self.cfg.pin}: {exc}") from None
        self._button.when_pressed = lambda: loop.call_soon_threadsafe(edge, True, time.monotonic())
        self._button.when_released = lambda: loop.call_soon_threadsafe(
            edge, False, time.monotonic()
        )

    def close(self) -> None:
        if self._button is not None:
            self._button.close()
            self._button = None


def find_gpiochip(name: str) -> str:
    """A GPIO chip by path (/dev/gpiochip0), name (gpiochip0) or label (tegra234-gpio)."""
    try:
        import gpiod
    except ImportError as exc:
        raise _hint("gpiod", exc) from None
    if name.startswith("/") and Path(name).exists():
        return name
    labels = []
    for path in sorted(Path("/dev").glob("gpiochip*")):
        if path.name == name:
            return str(path)
        try:
            with gpiod.Chip(str(path)) as chip:
                label = chip.get_info().label
        except OSError:
            continue
        if label == name:
            return str(path)
        labels.append(f"{path.name} ({label})")
    raise ButtonError(f"GPIO chip {name!r} not found; chips: {', '.join(labels) or 'none'}")


class GpiodButton:
    """A GPIO line through libgpiod v2 (Jetson, any board): edges debounced by the kernel."""

    def __init__(self, cfg: PttConfig, request_lines: Callable[..., Any] | None = None) -> None:
        self.cfg = cfg
        self._request_lines = request_lines
        self._request: Any = None
        self._running = False
        self._thread: threading.Thread | None = None

    def settings(self) -> Any:
        from gpiod import LineSettings
        from gpiod.line import Bias, Direction, Edge

        bias = {"up": Bias.PULL_UP, "down": Bias.PULL_DOWN, "none": Bias.DISABLED}[self.cfg.pull]
        return LineSettings(
            direction=Direction.INPUT,
            edge_detection=Edge.BOTH,
            bias=bias,
            active_low=self.cfg.active_low,
            debounce_period=datetime.timedelta(milliseconds=self.cfg.debounce_ms),
        )

    def start(self, loop: asyncio.AbstractEventLoop, edge: Edge, lost: Lost) -> None:
        try:
            import gpiod
        except ImportError as exc:
            raise _hint("gpiod", exc) from None
        request_lines = self._request_lines or gpiod.request_lines
        path = self.cfg.chip if self._request_lines else find_gpiochip(self.cfg.chip)
        try:
            self._request = request_lines(
                path, consumer="appliance-ptt", config={self.cfg.line: self.settings()}
            )
        except (OSError, ValueError) as exc:
            raise ButtonError(f"{path} line {self.cfg.line}: {exc}") from None
        self._running = True
        self._thread = threading.Thread(
            target=self._run, args=(loop, edge, lost), name="ptt-gpiod", daemon=True
        )
        self._thread.start()

    def _run(self, loop: asyncio.AbstractEventLoop, edge: Edge, lost: Lost) -> None:
        import gpiod

        rising = gpiod.EdgeEvent.Type.RISING_EDGE  # with active_low: rising = pressed
        while self._running:
            try:
                if not self._request.wait_edge_events(datetime.timedelta(seconds=0.5)):
                    continue
                events = self._request.read_edge_events()
            except OSError as exc:
                if self._running:
                    logger.debug("push-to-talk line lost: %s", exc)
                    loop.call_soon_threadsafe(lost)
                return
            for ev in events:
                at = ev.timestamp_ns / 1e9  # CLOCK_MONOTONIC, as time.monotonic()
                loop.call_soon_threadsafe(edge, ev.event_type == rising, at)

    def close(self) -> None:
        self._running = False
        if self._thread is not None:
            self._thread.join(2)
        if self._request is not None:
            self._request.release()
            self._request = None


def key_code(key: str) -> int:
    if key.isdigit():
        return int(key)
    try:
        from evdev import ecodes
    except ImportError as exc:
        raise _hint("evdev", exc) from None
    code = ecodes.ecodes.get(key)
    if not isinstance(code, int):
        raise ButtonError(f"[ptt] key = {key!r}: not a key name (e.g. KEY_F13) or code")
    return code


class EvdevButton:
    """A key of an input device: a device-tree gpio-key, or a USB HID button."""

    def __init__(self, cfg: PttConfig, device: Any = None) -> None:
        self.cfg = cfg
        self._device = device
        self._task: asyncio.Task[None] | None = None

    def open(self) -> Any:
        """The device by path, else by exact name, else the only one whose name contains it."""
        try:
            import evdev
        except ImportError as exc:
            raise _hint("evdev", exc) from None
        name = self.cfg.device
        try:
            if name.startswith("/"):
                return evdev.InputDevice(name)
            devices = [evdev.InputDevice(path) for path in evdev.list_devices()]
        except OSError as exc:
            raise ButtonError(f"input device {name!r}: {exc}") from None
        exact = [d for d in devices if d.name == name]
        partial = [d for d in devices if name.lower() in d.name.lower()]
        chosen = exact[0] if exact else partial[0] if len(partial) == 1 else None
        for d in devices:
            if d is not chosen:
                d.close()
        if chosen is None:
            what = "several match" if partial else "none matches"
            names = (
                ", ".join(repr(d.name) for d in devices) or "none (is the service in group input?)"
            )
            raise ButtonError(f"input device {name!r}: {what}; devices: {names}")
        return chosen

    def start(self, loop: asyncio.AbstractEventLoop, edge: Edge, lost: Lost) -> None:
        code = key_code(self.cfg.key)
        device = self._device or self.open()
        self._device = device
        self._task = loop.create_task(self._read(device, code, edge, lost), name="ptt-evdev")

    async def _read(self, device: Any, code: int, edge: Edge, lost: Lost) -> None:
        ev_key = 1  # evdev.ecodes.EV_KEY
        try:
            async for event in device.async_read_loop():
                if event.type == ev_key and event.code == code and event.value in (0, 1):
                    edge(event.value == 1, time.monotonic())  # on the loop already
        except OSError as exc:
            logger.debug("push-to-talk device %r lost: %s", self.cfg.device, exc)
        lost()  # unplugged (a USB button), or the stream ended

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._device is not None:
            self._device.close()
            self._device = None


def make_button(cfg: PttConfig) -> Button:
    if cfg.backend == "gpiozero":
        return GpiozeroButton(cfg)
    if cfg.backend == "gpiod":
        return GpiodButton(cfg)
    if cfg.backend == "evdev":
        return EvdevButton(cfg)
    raise ButtonError("[ptt] backend is 'none'")


# -- debounce --------------------------------------------------------------------------------


class Debouncer:
    """Edges in, presses and releases out (on the event loop), bounces removed.

    An edge within `debounce_s` of the last accepted one is not passed on at once; when the
    window ends, the line's last level decides (a fast tap still gives press and release).
    """

    def __init__(
        self,
        debounce_s: float,
        on_press: Callable[[float], None],
        on_release: Callable[[float], None],
    ) -> None:
        self.debounce_s = debounce_s
        self.on_press, self.on_release = on_press, on_release
        self.pressed = False
        self._raw = False
        self._accepted_at = -1e9
        self._timer: asyncio.TimerHandle | None = None

    def edge(self, pressed: bool, at: float) -> None:
        self._raw = pressed
        if at - self._accepted_at < self.debounce_s:
            if self._timer is None:
                delay = self._accepted_at + self.debounce_s - at
                self._timer = asyncio.get_running_loop().call_later(delay, self._settle, at)
            return
        self._accept(pressed, at)

    def _settle(self, at: float) -> None:
        self._timer = None
        self._accept(self._raw, max(at, self._accepted_at + self.debounce_s))

    def _accept(self, pressed: bool, at: float) -> None:
        if pressed == self.pressed:
            return
        self.pressed, self._accepted_at = pressed, at
        (self.on_press if pressed else self.on_release)(at)


# -- LED ---------------------------------------------------------------------------------------


class StatusLed:
    """Shows a state as a pattern; a thread does the blinking, `set(bool)` drives the LED."""

    def __init__(self, set_led: Callable[[bool], None], close: Callable[[], None] = lambda: None):
        self._set, self._close = set_led, close
        self.state = "idle"
        self.history: list[str] = ["idle"]
        self._changed = threading.Event()
        self._running = True
        self._thread = threading.Thread(target=self._run, name="ptt-led", daemon=True)
        self._thread.start()

    def show(self, state: str) -> None:
        if state == self.state:
            return
        self.state = state
        self.history.append(state)
        self._changed.set()

    def _run(self) -> None:
        while self._running:
            pattern = LED_PATTERNS[self.state]
            self._changed.clear()
            if pattern is None:
                self._set(True)
                self._changed.wait()
                continue
            on, off = pattern
            if on:
                self._set(True)
                if self._changed.wait(on):
                    continue
            self._set(False)
            self._changed.wait(off)

    def close(self) -> None:
        self._running = False
        self._changed.set()
        self._thread.join(2)
        self._set(False)
        self._close()


def make_led(cfg: PttConfig, pin_factory: Any = None) -> StatusLed | None:
    if cfg.led_backend == "none":
        return None
    if cfg.led_backend == "gpiozero":
        try:
            from gpiozero import LED
        except ImportError as exc:
            raise _hint("gpiozero", exc) from None
        led = LED(cfg.led_pin, pin_factory=pin_factory)
        return StatusLed(lambda on: setattr(led, "value", on), led.close)
    if cfg.led_backend == "gpiod":
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError as exc:
            raise _hint("gpiod", exc) from None
        path = find_gpiochip(cfg.led_chip)
        request = gpiod.request_lines(
            path,
            consumer="appliance-led",
            config={cfg.led_line: gpiod.LineSettings(direction=Direction.OUTPUT)},
        )
        values = {True: Value.ACTIVE, False: Value.INACTIVE}
        return StatusLed(lambda on: request.set_value(cfg.led_line, values[on]), request.release)
    brightness = Path("/sys/class/leds") / cfg.led_name / "brightness"
    if not brightness.exists():
        raise ButtonError(f"LED {cfg.led_name!r}: {brightness} not found (overlay loaded?)")

    def write(on: bool) -> None:
        brightness.write_text("1" if on else "0")

    return StatusLed(write)


# -- the session side ---------------------------------------------------------------------------


class PushToTalk:
    """Press/release semantics for the current session, and the LED."""

    def __init__(
        self,
        cfg: PttConfig,
        led: StatusLed | None = None,
        on_action: Callable[[str, str, str | None], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.led = led
        self.on_action = on_action  # (action, source, session id): the events stream
        self.session: AgentSession | None = None
        self.session_id: str | None = None
        self._source = "button"
        self.mic_open = False
        self.turns_committed = 0
        self.ignored_presses = 0
        self.cancels = 0
        self._pressed_at: float | None = None
        self._released_at = -1e9
        self._limit: asyncio.TimerHandle | None = None
        self._awaiting_turn = False  # a committed turn that has not reached the agent yet
        self._cancel_pending = False
        self._transcribing = False  # released, the agent not yet thinking
        self._forget: asyncio.Future[None] | None = None
        self.debouncer = Debouncer(cfg.debounce_ms / 1000, self.press, self.release)

    def edge(self, pressed: bool, at: float, source: str = "button") -> None:
        """A level change from a button ("button") or the kiosk page ("page")."""
        self._source = source
        self.debouncer.edge(pressed, at)

    def _report(self, action: str) -> None:
        if self.on_action is not None:
            self.on_action(action, self._source, self.session_id)

    def attach(self, session: AgentSession, session_id: str | None = None) -> None:
        """Drive this session (its audio input must be set): the microphone starts closed."""
        self.session = session
        self.session_id = session_id
        self.mic_open = False
        session.input.set_audio_enabled(False)
        session.on("agent_state_changed", self._agent_state_changed)
        session.on("close", lambda _: self.detach(session))

    def detach(self, session: AgentSession) -> None:
        """The session closed: forget its turn state (a held button waits for the next one)."""
        if self.session is not session:
            return
        self.session = None
        self._pressed_at = None
        if self._limit is not None:
            self._limit.cancel()
            self._limit = None
        self.mic_open = self._transcribing = self._awaiting_turn = self._cancel_pending = False
        self._show()

    def _agent_state_changed(self, ev: Any) -> None:
        if ev.new_state in ("thinking", "speaking"):
            self._transcribing = False  # the agent has the turn now
        self._show()

    def _show(self) -> None:
        if self.led is None:
            return
        state = self.session.agent_state if self.session is not None else "idle"
        if self.mic_open:
            self.led.show("listening")
        elif state == "thinking" or (self._transcribing and self.session is not None):
            self.led.show("thinking")  # from the release on: the turn is being worked on
        elif state == "speaking":
            self.led.show("speaking")
        else:
            self.led.show("idle")

    def _set_mic(self, session: AgentSession, open_: bool) -> None:
        self.mic_open = open_
        session.input.set_audio_enabled(open_)
        self._show()

    def press(self, at: float) -> None:
        session = self.session
        if session is None:
            return
        try:
            session.interrupt()
            session.clear_user_turn()
        except RuntimeError:  # the session is starting or closing: no turn to take
            return
        window = self.cfg.cancel_window_ms / 1000
        if window and at - self._released_at < window:
            self._cancel(session)
            return
        self._report("press")
        self._pressed_at = at
        self._set_mic(session, True)
        loop = asyncio.get_running_loop()
        self._limit = loop.call_later(self.cfg.max_hold_s, self._hold_limit)

    def release(self, at: float) -> None:
        if self._pressed_at is None or self.session is None:
            return  # already committed at the hold limit, cancelled, or no session
        if at - self._pressed_at < self.cfg.min_press_ms / 1000:
            held = at - self._pressed_at
            self._end_press(self.session, commit=False)
            with contextlib.suppress(RuntimeError):
                self.session.clear_user_turn()
            self.ignored_presses += 1
            self._report("ignored")
            logger.info("push-to-talk: %.0f ms press ignored (too short)", held * 1000)
            return
        self._released_at = at
        self._report("release")
        self._end_press(self.session, commit=True)

    def _hold_limit(self) -> None:
        if self._pressed_at is None or self.session is None:
            return
        logger.info("push-to-talk: held for %.0f s; committing the turn", self.cfg.max_hold_s)
        self._report("limit")
        self._end_press(self.session, commit=True)

    def _end_press(self, session: AgentSession, *, commit: bool) -> None:
        """Close the microphone; with `commit`, hand the turn to the agent."""
        self._pressed_at = None
        if self._limit is not None:
            self._limit.cancel()
            self._limit = None
        self._transcribing = commit  # the LED goes from listening straight to thinking
        self._set_mic(session, False)
        if not commit:
            return
        try:
            done = session.commit_user_turn(transcript_timeout=10.0)
        except RuntimeError:  # the session closed under the button
            self._transcribing = False
            self._show()
            return
        self.turns_committed += 1
        self._awaiting_turn = True
        done.add_done_callback(self._transcribed)

    def _transcribed(self, done: asyncio.Future[str]) -> None:
        """A turn with no words never reaches the agent: nothing to wait for."""
        if done.cancelled() or done.exception() is not None or not done.result().strip():
            self._awaiting_turn = False
            self._transcribing = False
            self._show()

    def _cancel(self, session: AgentSession) -> None:
        self.cancels += 1
        self._report("cancel")
        self._released_at = -1e9  # a third press is a new press
        self._transcribing = False
        self._show()
        session.interrupt(force=True)
        if self._awaiting_turn:
            self._cancel_pending = True  # the gate stops the reply when the turn arrives
        else:
            self._forget = asyncio.ensure_future(_forget_last_turn(session))
        logger.info("push-to-talk: double press; turn cancelled")

    def should_reply(self) -> bool:
        """The agent's gate for each completed user turn (False: no reply, not remembered)."""
        self._awaiting_turn = False
        if self._cancel_pending:
            self._cancel_pending = False
            self._transcribing = False
            self._show()
            return False
        return True


async def _forget_last_turn(session: AgentSession) -> None:
    """Drop the last user message and what followed it from the agent's memory."""
    agent = session.current_agent
    ctx = agent.chat_ctx.copy()
    users = [i for i, item in enumerate(ctx.items) if getattr(item, "role", None) == "user"]
    if not users:
        return
    ctx.items[:] = ctx.items[: users[-1]]
    await agent.update_chat_ctx(ctx)


async def serve_button(
    cfg: PttConfig, ptt: PushToTalk, stop: asyncio.Event, make: Callable[[], Button] | None = None
) -> None:
    """Keep the button open until `stop`; while it is missing or lost, retry every 2 s.

    One error line when it goes, one line when it is back; the kiosk keeps running.
    """
    loop = asyncio.get_running_loop()
    missing = False
    while not stop.is_set():
        button = make() if make is not None else make_button(cfg)
        gone = asyncio.Event()
        try:
            button.start(loop, ptt.edge, gone.set)
        except ButtonError as exc:
            if not missing:
                logger.error(
                    "push-to-talk button unavailable: %s; retrying every %.0f s", exc, RETRY_S
                )
                missing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)
            continue
        logger.log(
            logging.WARNING if missing else logging.INFO,
            "push-to-talk button %s (%s)",
            "is back" if missing else "ready",
            cfg.backend,
        )
        missing = False
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gone.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            button.close()
        if gone.is_set() and not stop.is_set():
            ptt.edge(False, time.monotonic())  # a lost button is not held
            logger.error("push-to-talk button lost; retrying every %.0f s", RETRY_S)
            missing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)
