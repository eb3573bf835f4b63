"""Push-to-talk inputs: button backends that turn a physical button into edges, and the
debouncer that turns edges into presses and releases.

Backends: `gpiozero` (Raspberry Pi), `gpiod` (libgpiod v2: Jetson, any GPIO character
device, debounced in the kernel) and `evdev` (a device-tree gpio-key or a USB HID button).
Thread backends hand edges to the event loop with `call_soon_threadsafe`; a software
debouncer there makes every backend behave the same.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from appliance.config import PttConfig

logger = logging.getLogger("appliance.ptt")


class ButtonError(Exception):
    """The button (or LED) cannot be opened: wrong chip, line, device or permissions."""


def not_installed(package: str, exc: ImportError) -> ButtonError:
    """The error for a backend whose library is missing, with the command that installs it."""
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
            raise not_installed("gpiozero", exc) from None
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
        raise not_installed("gpiod", exc) from None
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
            raise not_installed("gpiod", exc) from None
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
        raise not_installed("evdev", exc) from None
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
            raise not_installed("evdev", exc) from None
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
