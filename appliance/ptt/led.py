"""The push-to-talk status LED: on while the microphone is open (listening), a fast blink
while the agent thinks, a slow blink while it speaks, off when idle.

The LED is a gpiozero pin, a libgpiod line or a sysfs LED (`/sys/class/leds`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.ptt.inputs import ButtonError, find_gpiochip, not_installed

if TYPE_CHECKING:
    from appliance.config import PttConfig

# LED patterns: (seconds on, seconds off); None = steady
LED_PATTERNS: dict[str, tuple[float, float] | None] = {
    "idle": (0.0, 1.0),
    "listening": None,
    "thinking": (0.1, 0.1),
    "speaking": (0.5, 0.5),
}


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
            raise not_installed("gpiozero", exc) from None
        led = LED(cfg.led_pin, pin_factory=pin_factory)
        return StatusLed(lambda on: setattr(led, "value", on), led.close)
    if cfg.led_backend == "gpiod":
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError as exc:
            raise not_installed("gpiod", exc) from None
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
