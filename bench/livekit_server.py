"""A real livekit-server on loopback for the tests and `python -m bench room` (built by
scripts/build-livekit-server.sh; never on a device).

Single node, no Redis, no TURN; signalling, RTC over TCP and the one UDP port all on free
loopback ports, media candidates on 127.0.0.1 only, its own config file and log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType

from livekit import api

REPO = Path(__file__).parent.parent
BINARY = Path(os.environ.get("LIVEKIT_SERVER", REPO / ".venv" / "bin" / "livekit-server"))
KEY, SECRET = "APIappliancetest", "s" * 24 + "ecret-for-tests-only-0123"


def _free_port(kind: socket.SocketKind) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


CONFIG = """\
port: {port}
bind_addresses: ["127.0.0.1"]
rtc:
  tcp_port: {tcp}
  udp_port: {udp}
  node_ip: 127.0.0.1
  use_external_ip: false
  enable_loopback_candidate: true
  interfaces:
    includes: [lo]
keys:
  {key}: "{secret}"
logging:
  level: info
"""


class LiveKitServer:
    """One livekit-server process: `start`, `kill` (the plug pulled), `start` again on the
    same ports, `stop`. Also a context manager."""

    def __init__(self, workdir: Path) -> None:
        if not BINARY.exists():
            raise FileNotFoundError(
                f"{BINARY} is missing: `make install` builds it (scripts/build-livekit-server.sh)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self.port, self.tcp_port = _free_port(socket.SOCK_STREAM), _free_port(socket.SOCK_STREAM)
        self.udp_port = _free_port(socket.SOCK_DGRAM)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.key, self.secret = KEY, SECRET
        self.config = workdir / "livekit.yaml"
        self.config.write_text(
            CONFIG.format(
                port=self.port, tcp=self.tcp_port, udp=self.udp_port, key=KEY, secret=SECRET
            )
        )
        self.log = workdir / "livekit.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        """Start the server and wait until it answers HTTP."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [str(BINARY), "--config", str(self.config)], stdout=log, stderr=log
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"livekit-server exited: {self.tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/", timeout=1) as r:
                    if r.status == 200:
                        return
            except OSError:
                time.sleep(0.1)
        raise TimeoutError(f"livekit-server did not answer in {timeout} s: {self.tail()}")

    def kill(self) -> None:
        """SIGKILL: the server vanishes without a word to its clients."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def api(self) -> api.LiveKitAPI:
        """The server API (RoomService and the rest); close it with `aclose`."""
        return api.LiveKitAPI(f"http://127.0.0.1:{self.port}", KEY, SECRET)

    def token(self, room: str, identity: str, *, can_publish: bool = True) -> str:
        """A join token for a test participant ("a browser")."""
        video = api.VideoGrants(room_join=True, room=room, can_publish=can_publish)
        return api.AccessToken(KEY, SECRET).with_identity(identity).with_grants(video).to_jwt()

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def __enter__(self) -> LiveKitServer:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
