"""Sound cards that are not there, for tests and benchmarks.

`file_pcms`: ALSA's `file` plugin over a `null` slave as named PCMs (capture reads a raw
file, playback writes one): bit-exact, no daemon, not paced in real time.

`Room`: a simulated kiosk room on a private PulseAudio server.

`pulseaudio` runs with `module-pipe-sink` (the speaker, clocked by the system clock) and
`module-pipe-source` (the microphone). The bridge reaches them through ALSA's pulse plugin
under the names `voice_in`/`voice_out` (see `alsa_config`), so the whole PortAudio path is
real and paced. A thread reads what the speaker plays and writes the microphone in real
time: speech queued with `say`, plus, when `echo_gain` is set, the speaker's own sound
delayed and attenuated, as a speakerphone's microphone picks it up.

Not used by the daemon; needs the `pulseaudio` program (Debian package `pulseaudio`).
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

RATE = 16000
BLOCK = 160  # 10 ms
LATE = int(0.2 * RATE)  # the echo path relocks if the speaker gets this far from it


def available() -> bool:
    return shutil.which("pulseaudio") is not None


class Room:
    """The speakerphone's acoustic side: what the speaker plays, what the mic hears."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.echo_gain = 0.0
        self.echo_delay = int(0.03 * RATE)
        self.played = bytearray()  # everything the speaker played, 16 kHz int16
        self.played_at: list[tuple[float, int]] = []  # (monotonic time, samples played by then)
        self.echo_written = bytearray()  # the echo part of what the microphone heard
        self.echo_resyncs = 0  # times the echo path lost its lock on the speaker (see _run)
        self.said_at: list[float] = []  # when each `say` clip started reaching the microphone
        self._say: list[np.ndarray] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.server: subprocess.Popen[bytes] | None = None

    def alsa_config(self) -> str:
        """ALSA config text naming the room's speaker and microphone voice_out/voice_in."""
        server = f"unix:{self.root}/native"
        return (
            f'pcm.voice_in {{ type pulse; device "mic"; server "{server}" }}\n'
            f'pcm.voice_out {{ type pulse; device "spk"; server "{server}" }}\n'
        )

    def start_server(self) -> None:
        for name in ("spk.fifo", "mic.fifo", "native"):
            (self.root / name).unlink(missing_ok=True)
        fmt = f"format=s16le rate={RATE} channels=1"
        (self.root / "default.pa").write_text(
            "load-module module-native-protocol-unix auth-anonymous=1 "
            f"socket={self.root}/native\n"
            f"load-module module-pipe-sink sink_name=spk file={self.root}/spk.fifo {fmt} "
            "use_system_clock_for_timing=yes\n"
            f"load-module module-pipe-source source_name=mic file={self.root}/mic.fifo {fmt}\n"
        )
        env = {**os.environ, "HOME": str(self.root), "PULSE_RUNTIME_PATH": str(self.root / "run")}
        self.server = subprocess.Popen(
            [
                "pulseaudio",
                "-n",
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--disallow-exit",
                "-F",
                str(self.root / "default.pa"),
                "--log-target=stderr",
            ],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while not (self.root / "mic.fifo").exists() or not (self.root / "native").exists():
            if time.monotonic() > deadline:
                self.stop_server()
                raise RuntimeError("pulseaudio did not start")
            time.sleep(0.05)
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def stop_server(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        if self.server is not None:
            self.server.terminate()
            self.server.wait(10)
            self.server = None

    def say(self, pcm: np.ndarray) -> None:
        """Queue speech (int16, 16 kHz) for the microphone, after what is queued already."""
        with self._lock:
            self._say.append(pcm.astype(np.int16))

    def played_pcm(self, since: int = 0) -> np.ndarray:
        """What the speaker played from sample `since` on."""
        data = bytes(self.played[since * 2 : len(self.played) // 2 * 2])
        return np.frombuffer(data, np.int16)

    def time_of_sample(self, index: int) -> float | None:
        """When speaker sample `index` was read off the sink (monotonic), if it was."""
        for at, total in self.played_at:
            if total > index:
                return at
        return None

    def _read_speaker(self, spk: int) -> int:
        """Take what the speaker has played since the last call; returns the total."""
        try:
            while data := os.read(spk, 65536):
                self.played.extend(data)
                self.played_at.append((time.monotonic(), len(self.played) // 2))
        except BlockingIOError:
            pass
        return len(self.played) // 2

    def _run(self) -> None:
        """Write the microphone in real time; the echo follows the speaker sample by sample
        (a fixed delay, as in a room), whatever this thread's own timing."""
        spk = os.open(self.root / "spk.fifo", os.O_RDONLY | os.O_NONBLOCK)
        mic = os.open(self.root / "mic.fifo", os.O_RDWR)
        speech: np.ndarray = np.zeros(0, np.int16)
        echo_at: int | None = None  # the speaker sample this mic block's echo starts at
        t0, n = time.monotonic(), 0
        try:
            while not self._stop.is_set():
                heard = self._read_speaker(spk)  # speaker samples out so far
                with self._lock:
                    if self._say and not len(speech):
                        speech = self._say.pop(0)
                        self.said_at.append(time.monotonic())
                block = np.zeros(BLOCK, np.float32)
                if len(speech):
                    part, speech = speech[:BLOCK], speech[BLOCK:]
                    block[: len(part)] += part
                echo: np.ndarray = np.zeros(BLOCK, np.float32)
                if self.echo_gain and echo_at is not None and heard < echo_at + BLOCK:  # late sink
                    select.select([spk], [], [], 0.05)
                    heard = self._read_speaker(spk)
                if echo_at is None or not 0 <= heard - echo_at - BLOCK <= LATE:
                    if echo_at is not None:
                        self.echo_resyncs += 1
                    echo_at = max(heard - self.echo_delay - BLOCK, 0)  # (re)lock the path
                if self.echo_gain and heard >= echo_at + BLOCK:
                    echo = self.echo_gain * self.played_pcm(echo_at)[:BLOCK]
                echo_at += BLOCK
                self.echo_written.extend(echo.astype(np.int16).tobytes())
                try:
                    os.write(mic, np.clip(block + echo, -32768, 32767).astype(np.int16).tobytes())
                except OSError:
                    return
                n += 1
                delay = t0 + n * BLOCK / RATE - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        finally:
            os.close(spk)
            os.close(mic)


@contextlib.contextmanager
def simulated_room(root: Path | None = None) -> Iterator[Room]:
    """A started Room as ALSA's voice_in/voice_out (`ALSA_CONFIG_PATH`, restored after)."""
    with contextlib.ExitStack() as stack:
        if root is None:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="room-")))
        room = Room(root)
        conf = root / "asound.conf"
        conf.write_text(room.alsa_config())
        before = os.environ.get("ALSA_CONFIG_PATH")
        os.environ["ALSA_CONFIG_PATH"] = f"/usr/share/alsa/alsa.conf:{conf}"
        room.start_server()
        try:
            yield room
        finally:
            room.stop_server()
            if before is None:
                os.environ.pop("ALSA_CONFIG_PATH", None)
            else:
                os.environ["ALSA_CONFIG_PATH"] = before


def file_pcms(
    root: Path, capture: str = "voice_in", playback: str = "voice_out", before: str = ""
) -> str:
    """An ALSA config whose capture/playback PCMs are files in `root`; ALSA_CONFIG_PATH.

    Capture reads `root/mic.raw` (s16le; write it first), playback writes
    `root/speaker.raw`. `before` is a config file loaded first (the production
    asound.conf): the file PCMs then override its PCMs of the same names (`pcm.!name`).
    """
    conf = root / "asound-test.conf"
    conf.write_text(
        f"""
pcm.!{capture} {{
  type file
  slave.pcm {{ type null }}
  file "/dev/null"
  infile "{root / "mic.raw"}"
  format "raw"
}}
pcm.!{playback} {{
  type file
  slave.pcm {{ type null }}
  file "{root / "speaker.raw"}"
  format "raw"
}}
"""
    )
    return ":".join(p for p in ("/usr/share/alsa/alsa.conf", before, str(conf)) if p)
