"""`appliance run` as a systemd service: notify protocol, watchdog, reload, drain, metrics.

systemd is not running here, so the tests play its part: a real AF_UNIX datagram socket in
`NOTIFY_SOCKET` receives what the daemon sends, `WATCHDOG_USEC` sets the ping interval,
and signals are sent as systemctl would. The daemon runs for real (models, the USB bridge
in the simulated PulseAudio room of `bench.room_sim`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from appliance import logs
from appliance.config import Config
from appliance.service import Service
from appliance.systemd import JournalHandler, Notifier
from bench.room_sim import Room

from .conftest import free_tcp_port

UNIT = Path(__file__).parent.parent / "systemd" / "appliance.service"
LONG_GREETING = (
    "Welcome to the museum kiosk. I can tell you about the exhibitions, the opening hours, "
    "the cafe and the shop. Just ask me a question whenever you are ready."
)


class NotifySocket:
    """What systemd would receive on $NOTIFY_SOCKET: (monotonic time, {key: value})."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append((time.monotonic(), fields))

    def wait_for(self, key: str, value: str | None = None, timeout: float = 90) -> float:
        """When the first message with `key` (= `value`) arrived."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for at, fields in list(self.messages):
                if key in fields and (value is None or fields[key] == value):
                    return at
            time.sleep(0.05)
        raise AssertionError(f"no {key}={value} within {timeout} s: {self.messages}")

    def times(self, key: str, after: float = 0.0) -> list[float]:
        return [at for at, fields in self.messages if key in fields and at >= after]

    def statuses(self) -> list[str]:
        return [f["STATUS"] for _, f in self.messages if "STATUS" in f]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


@pytest.fixture
def notify(tmp_path: Path) -> Iterator[NotifySocket]:
    n = NotifySocket(tmp_path / "notify.sock")
    yield n
    n.close()


class Daemon:
    """`appliance run --config FILE` as systemd would start it."""

    def __init__(self, tmp_path: Path, config: str, env: dict[str, str]) -> None:
        self.config = tmp_path / "appliance.toml"
        self.config.write_text(config)
        self.log = tmp_path / "daemon.log"
        with self.log.open("w") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "appliance", "run", "--config", str(self.config)],
                stderr=err,
                env={**os.environ, **env},
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_log(self, needle: str, timeout: float = 40, after: str = "") -> None:
        deadline = time.monotonic() + timeout
        while needle not in (self.text().partition(after)[2] if after else self.text()):
            assert self.proc.poll() is None, self.text()
            assert time.monotonic() < deadline, f"no {needle!r} in:\n{self.text()}"
            time.sleep(0.1)

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def kiosk_toml(port: int, greeting: str = "", threads: int = 2) -> str:
    return (
        f'[session]\nturn_detection = "vad"\n\n[models]\nthreads = {threads}\n\n'
        f"[audio]\nenabled = true\n\n[agent]\ngreeting = {greeting!r}\n\n"
        f"[http]\nport = {port}\n"
    )


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the metrics endpoint, parsed as Prometheus text."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        assert response.headers["Content-Type"].startswith("text/plain")
        text = response.read().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def loud_seconds(pcm: np.ndarray, threshold: int = 300) -> float:
    """Seconds from the first to the last sample louder than `threshold`."""
    loud = np.flatnonzero(np.abs(pcm.astype(np.int32)) > threshold)
    return (loud[-1] - loud[0]) / 16000 if len(loud) else 0.0


def test_ready_status_watchdog_metrics_and_reload(
    room: Room, notify: NotifySocket, speak: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    port = free_tcp_port()
    env = {"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "2000000"}
    daemon = Daemon(tmp_path, kiosk_toml(port), env)
    try:
        ready = notify.wait_for("READY", "1")
        # READY only once the models are loaded and the metrics endpoint is bound
        assert notify.statuses()[0] == "verifying and loading models"
        first = scrape(port)
        assert first[("appliance_ready", ())] == 1.0
        assert first[("appliance_model_load_seconds", (("step", "llm"),))] > 0
        daemon.wait_log("kiosk session started")

        room.say(speak("What is the capital of France?"))
        daemon.wait_log("assistant:", after="user:")
        time.sleep(0.5)
        after = scrape(port)
        assert after[("appliance_turns_total", (("role", "user"),))] >= 1
        assert after[("appliance_turns_total", (("role", "assistant"),))] >= 1
        stages = {
            dict(labels)["stage"]: value
            for (name, labels), value in after.items()
            if name == "appliance_stage_seconds_count"
        }
        assert stages["voice_to_voice"] >= 1 and stages["end_of_turn"] >= 1, stages
        assert after[("appliance_sessions_active", (("bridge", "usb"),))] == 1.0
        assert any(name == "appliance_event_loop_lag_seconds_count" for name, _ in after)
        assert any(s.startswith("ready: usb kiosk; 1 session active") for s in notify.statuses())

        # SIGHUP: [agent] applies to the next conversation, [models] needs a restart
        daemon.config.write_text(kiosk_toml(port, greeting="Hi again.", threads=1))
        hup = time.monotonic()
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("needs a restart")
        reloading = notify.wait_for("RELOADING", "1")
        assert reloading >= hup and any(at > reloading for at in notify.times("READY"))
        text = daemon.text()
        assert "reloaded [agent]: applies from the next conversation" in text
        assert "[models] changed: needs a restart" in text

        # a broken file on reload: the running configuration stays
        daemon.config.write_text("[session]\nturn_detection = 'magic'\n")
        daemon.signal(signal.SIGHUP)
        daemon.wait_log("reload failed, the running configuration stays")
        assert "[session] turn_detection = 'magic'" in daemon.text()
        assert daemon.proc.poll() is None

        pings = notify.times("WATCHDOG", after=ready)
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0, daemon.text()
    finally:
        daemon.stop()
    gaps = np.diff([ready, *pings])
    assert len(pings) >= 5 and gaps.max() < 2.0, gaps  # every WATCHDOG_USEC, with margin
    assert notify.times("STOPPING")


def test_sigterm_during_a_reply_lets_it_finish_then_exits(
    room: Room, notify: NotifySocket, speak: Callable[..., np.ndarray], tmp_path: Path
) -> None:
    env = {"NOTIFY_SOCKET": str(notify.path)}
    daemon = Daemon(tmp_path, kiosk_toml(free_tcp_port(), greeting=LONG_GREETING), env)
    try:
        notify.wait_for("READY", "1")
        deadline = time.monotonic() + 20
        while loud_seconds(room.played_pcm()) < 1.0:  # the greeting is playing
            assert time.monotonic() < deadline, daemon.text()
            time.sleep(0.05)
        term = time.monotonic()
        daemon.signal(signal.SIGTERM)
        status = daemon.proc.wait(30)
        stopped = time.monotonic()
    finally:
        daemon.stop()
    assert status == 0, daemon.text()
    assert notify.times("STOPPING")
    whole = loud_seconds(speak(LONG_GREETING))
    played = loud_seconds(room.played_pcm())
    assert played > whole - 0.5, (played, whole)  # the reply played to its end
    assert stopped - term < 25, daemon.text()  # within the unit's stop timeout (30 s)
    assert "ending session: the daemon is stopping" in daemon.text()


def test_a_blocked_event_loop_stops_the_watchdog_pings(
    notify: NotifySocket, monkeypatch: pytest.MonkeyPatch
) -> None:
    notifier = Notifier({"NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "200000"})
    service = Service(Config(), None, notifier=notifier)

    async def main() -> tuple[float, float]:
        watchdog = asyncio.create_task(service._watchdog())
        await asyncio.sleep(1.0)
        blocked = time.monotonic()
        time.sleep(1.5)  # a stalled loop: e.g. inference run on it by mistake
        released = time.monotonic()
        await asyncio.sleep(1.0)
        watchdog.cancel()
        return blocked, released

    blocked, released = asyncio.run(main())
    pings = notify.times("WATCHDOG")
    before = [t for t in pings if t < blocked]
    during = [t for t in pings if blocked + 0.05 < t < released]
    after = [t for t in pings if t > released]
    assert len(before) >= 5 and not during and len(after) >= 3, pings


def test_journal_entries_carry_structured_fields(tmp_path: Path) -> None:
    path = tmp_path / "journal.sock"
    journal = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    journal.bind(str(path))
    handler = JournalHandler(path=str(path))
    handler.addFilter(logs.ContextFilter())
    log = logging.getLogger("appliance.test-journal")
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        token = logs.SESSION.set("usb-7")
        log.warning("two\nlines", extra={"stage": "stt", "call_id": "abc@pbx"})
        logs.SESSION.reset(token)
        data = journal.recv(65536)
    finally:
        log.removeHandler(handler)
        handler.close()
        journal.close()
    fields: dict[str, bytes] = {}
    rest = data
    while rest:
        line, _, rest = rest.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value
        else:  # binary-safe form: KEY\n<u64 length><value>\n
            size = int.from_bytes(rest[:8], "little")
            fields[line.decode()] = rest[8 : 8 + size]
            rest = rest[8 + size + 1 :]
    assert fields["MESSAGE"] == b"two\nlines"
    assert fields["PRIORITY"] == b"4"
    assert fields["SESSION"] == b"usb-7"
    assert fields["CALL_ID"] == b"abc@pbx"
    assert fields["STAGE"] == b"stt"
    assert fields["SYSLOG_IDENTIFIER"] == b"appliance"
    assert fields["LOGGER"] == b"appliance.test-journal"


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def test_a_bad_config_exits_78_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[audio]\nenabled = true\necho_delay_ms = 'soon'\n")
    out = run_cli("run", "--config", str(bad))
    assert out.returncode == 78
    assert f"{bad}: invalid configuration" in out.stderr
    assert "[audio] echo_delay_ms = 'soon'" in out.stderr


def test_a_missing_model_exits_78_naming_the_fix(tmp_path: Path, notify: NotifySocket) -> None:
    config = tmp_path / "kiosk.toml"
    config.write_text("[audio]\nenabled = true\n")
    empty = tmp_path / "models"
    empty.mkdir()
    env = {"APPLIANCE_MODELS_DIR": str(empty), "NOTIFY_SOCKET": str(notify.path)}
    out = run_cli("run", "--config", str(config), env=env)
    assert out.returncode == 78, out.stderr
    assert "appliance models fetch whisper/tiny.en" in out.stderr
    assert not notify.times("READY")  # never claimed to be ready


def _unit_for_verify(tmp_path: Path) -> Path:
    """The unit with ExecStart pointing at an existing program (the venv is not installed)."""
    unit = tmp_path / "appliance.service"
    unit.write_text(UNIT.read_text().replace("/opt/appliance/venv/bin/appliance", "/bin/true"))
    return unit


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_the_unit_verifies_cleanly_and_is_hardened(tmp_path: Path) -> None:
    unit = _unit_for_verify(tmp_path)
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and verify.stderr == "", verify.stderr
    security = subprocess.run(
        ["systemd-analyze", "security", "--offline=yes", "--threshold=20", str(unit)],
        capture_output=True,
        text=True,
    )
    assert security.returncode == 0, security.stdout + security.stderr
    exposure = float(
        security.stdout.split("Overall exposure level for")[1].split(":")[1].split()[0]
    )
    assert exposure <= 2.0
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=30",
        "RestartPreventExitStatus=78",
        "Restart=on-failure",
        "User=appliance",
    ):
        assert f"\n{line}\n" in text


def test_a_bad_unit_key_is_caught(tmp_path: Path) -> None:
    """The check above can fail: verify exits 0 on an unknown key but says so on stderr."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze")
    unit = _unit_for_verify(tmp_path)
    unit.write_text(unit.read_text().replace("[Service]\n", "[Service]\nWatchdogSecs=30\n"))
    verify = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True
    )
    assert verify.returncode == 0 and "Unknown key 'WatchdogSecs'" in verify.stderr


def test_a_missing_button_is_reported_and_the_kiosk_keeps_serving(
    room: Room, notify: NotifySocket, tmp_path: Path
) -> None:
    toml = kiosk_toml(free_tcp_port()) + '\n[ptt]\nbackend = "gpiod"\nchip = "no-such-chip"\n'
    toml += 'led_backend = "sysfs"\nled_name = "no-such-led"\n'
    daemon = Daemon(tmp_path, toml, {"NOTIFY_SOCKET": str(notify.path)})
    try:
        notify.wait_for("READY", "1")
        daemon.wait_log("kiosk session started")
        time.sleep(4.5)  # two more retries of the button
        text = daemon.text()
        daemon.signal(signal.SIGTERM)
        assert daemon.proc.wait(30) == 0, daemon.text()
    finally:
        daemon.stop()
    assert text.count("push-to-talk button unavailable: GPIO chip 'no-such-chip' not found") == 1
    assert "status LED unavailable: LED 'no-such-led'" in text
    assert "the button ends each turn; [session] turn_detection = 'vad' is not used" in text
