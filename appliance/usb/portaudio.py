"""PortAudio through PyAudio: loading it, listing and finding devices, and the child probe.

Pa_Initialize enumerates the ALSA devices and, on some ALSA configurations, fails a C
assertion there, which aborts the whole process. So before PortAudio is initialised in
this process, the `portaudio` self-test (appliance.native.selftest) lists the devices in
a child: a crash there becomes an `AudioDeviceError` naming the ALSA config and the fix.
This module imports no numpy or livekit, so that child starts quickly.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

from appliance.native import selftest

if TYPE_CHECKING:
    import pyaudio

logger = logging.getLogger("appliance.usbaudio")

PROBE_TIMEOUT = 30.0
PROBE_FIX = (
    "fix the ALSA config (firmware/alsa/asound.conf is known to work; docs/kiosk.md), "
    "check it with `aplay -L`"
)
# PortAudio's initialise/terminate/open are not thread-safe: the device threads take turns.
PA_LOCK = threading.Lock()
_PROBE_LOCK = threading.Lock()
# the last probe: the environment it ran with, when it ended, what it found
_probed: tuple[tuple[str | None, ...], float, selftest.Result] | None = None


class AudioDeviceError(Exception):
    """PortAudio is missing or cannot list devices, or no device matches the configured name."""


# C callbacks that drop ALSA's and JACK's own messages; kept alive for the process.
_ALSA_HANDLER = ctypes.CFUNCTYPE(
    None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p
)(lambda *_: None)
_JACK_HANDLER = ctypes.CFUNCTYPE(None, ctypes.c_char_p)(lambda _: None)
_quieted = False


def _quiet_native_logs() -> None:
    """Stop ALSA and JACK printing every failed probe to stderr while PortAudio enumerates.

    On a board without JACK or with few cards each (re)scan prints dozens of lines, every
    half second while a device is unplugged; the bridge logs what matters itself. With
    debug logging (`appliance -v`) the native messages are kept.
    """
    global _quieted
    if _quieted or logger.isEnabledFor(logging.DEBUG):
        return
    _quieted = True
    for name, setters, handler in (
        ("asound", ("snd_lib_error_set_handler",), _ALSA_HANDLER),
        ("jack", ("jack_set_error_function", "jack_set_info_function"), _JACK_HANDLER),
    ):
        path = ctypes.util.find_library(name)
        if path is None:
            continue
        try:
            lib = ctypes.CDLL(path)
            for setter in setters:
                getattr(lib, setter)(handler)
        except (OSError, AttributeError):
            continue


def load_pyaudio() -> Any:
    try:
        import pyaudio
    except ImportError as exc:  # pragma: no cover - pyaudio is a dependency
        raise AudioDeviceError(
            f"PyAudio is not installed ({exc}); apt-get install portaudio19-dev, then "
            "pip install pyaudio==0.2.14"
        ) from None
    _quiet_native_logs()
    return pyaudio


def alsa_config() -> str:
    """The ALSA configuration PortAudio reads in this environment."""
    return os.environ.get("ALSA_CONFIG_PATH") or "/etc/asound.conf, ~/.asoundrc"


def probe(max_age: float | None = None) -> selftest.Result:
    """List the devices in a child process with this environment (see the module doc).

    A result at most `max_age` s old is reused (the device threads share one per retry);
    with None a success is reused for the life of the process, a failure never. Either
    only while ALSA_CONFIG_PATH and HOME (where ALSA finds its config) are unchanged.
    """
    global _probed
    env = (os.environ.get("ALSA_CONFIG_PATH"), os.environ.get("HOME"))
    with _PROBE_LOCK:
        if _probed is not None and _probed[0] == env:
            _, ended, result = _probed
            if result.ok if max_age is None else time.monotonic() - ended <= max_age:
                return result
        crash = "PortAudio aborted while listing the ALSA devices"
        result = selftest.start("portaudio", fix=PROBE_FIX, crash=crash).result(PROBE_TIMEOUT)
        _probed = (env, time.monotonic(), result)
        return result


def require(max_age: float | None = None) -> str:
    """`probe`, raising AudioDeviceError if PortAudio cannot list the devices here."""
    result = probe(max_age)
    if not result.ok:
        raise AudioDeviceError(
            f"PortAudio cannot list the audio devices with the ALSA config {alsa_config()}: "
            f"{result.detail}; {result.fix}"
        )
    return result.detail


def list_devices(pa: pyaudio.PyAudio | None = None) -> list[dict[str, Any]]:
    """Every PortAudio device: index, name, input/output channels, default rate.

    Without `pa`, PortAudio is initialised here, once a child has shown that it can be.
    """
    own = pa is None
    if pa is None:
        require()
        with PA_LOCK:
            pa = load_pyaudio().PyAudio()
    try:
        out = []
        for i in range(pa.get_device_count()):
            info = pa.get_device_info_by_index(i)
            out.append(
                {
                    "index": i,
                    "name": str(info["name"]),
                    "inputs": int(info["maxInputChannels"]),
                    "outputs": int(info["maxOutputChannels"]),
                    "default_rate": int(info["defaultSampleRate"]),
                }
            )
        return out
    finally:
        if own:
            with PA_LOCK:
                pa.terminate()


def find_device(devices: list[dict[str, Any]], name: str, direction: str) -> dict[str, Any]:
    """The device called `name` exactly, else the only one whose name contains it."""
    usable = [d for d in devices if d[direction] > 0]
    exact = [d for d in usable if d["name"] == name]
    if exact:
        return exact[0]
    partial = [d for d in usable if name.lower() in d["name"].lower()]
    if len(partial) == 1:
        return partial[0]
    names = ", ".join(repr(d["name"]) for d in usable) or "none"
    kind = "input" if direction == "inputs" else "output"
    what = "several match" if partial else "none matches"
    raise AudioDeviceError(f"{kind} device {name!r}: {what}; {kind} devices: {names}")


def show_devices(*, as_json: bool) -> int:
    """`appliance devices`: print the devices (a table or JSON); the exit status."""
    try:
        devices = list_devices()
    except AudioDeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps({"devices": devices}, indent=2))
        return 0
    if not devices:
        print(
            "no audio devices: is the USB sound card plugged in, and the ALSA config "
            "(/etc/asound.conf) installed? See `aplay -l`.",
            file=sys.stderr,
        )
        return 1
    for d in devices:
        kinds = "/".join(k for k, n in (("in", d["inputs"]), ("out", d["outputs"])) if n)
        print(f"{d['index']:3}  {kinds:6}  {d['default_rate']:6} Hz  {d['name']}")
    return 0
