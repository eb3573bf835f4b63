"""A real LiveKit deployment on loopback for the tests and the benchmarks: livekit-server,
and for the trunk path Redis and LiveKit SIP (built by scripts/build-livekit.sh; never on
a device).

Single node, no TURN; signalling, RTC over TCP and the one UDP port on free loopback
ports, media candidates and SIP/RTP addresses on 127.0.0.1 only, each with its own config
file and log.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from google.protobuf.duration_pb2 import Duration
from livekit import api

REPO = Path(__file__).parent.parent
BINARY = Path(os.environ.get("LIVEKIT_SERVER", REPO / ".venv" / "bin" / "livekit-server"))
SIP_BINARY = Path(os.environ.get("LIVEKIT_SIP", REPO / ".venv" / "bin" / "livekit-sip"))
KEY, SECRET = "APIappliancetest", "s" * 24 + "ecret-for-tests-only-0123"


P = TypeVar("P", bound="_Process")


def free_port(kind: socket.SocketKind = socket.SOCK_DGRAM) -> int:
    """A loopback port free now (UDP, or TCP with SOCK_STREAM); the caller binds it soon."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Process:
    """A server process with a log: `start` waits until `ready()`; `kill`; `stop`."""

    name = "server"

    def __init__(self, workdir: Path, binary: Path) -> None:
        if not binary.exists():
            raise FileNotFoundError(
                f"{binary} is missing: `make install` builds it (scripts/build-livekit.sh)"
            )
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.binary = workdir, binary
        self.log = workdir / f"{self.name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def ready(self) -> bool:
        raise NotImplementedError

    def start(self, timeout: float = 30) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command(), stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.tail()}")
            if self.ready():
                return
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} did not answer in {timeout} s: {self.tail()}")

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

    def tail(self, n: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-n:] if self.log.exists() else ""

    def __enter__(self: P) -> P:
        self.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            return bool(r.status == 200)
    except OSError:
        return False


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


class LiveKitServer(_Process):
    """One livekit-server: `start`, `kill` (the plug pulled), `start` again on the same
    ports, `stop`. With `redis` (host:port) it is the node LiveKit SIP talks to."""

    name = "livekit"

    def __init__(self, workdir: Path, redis: str = "") -> None:
        super().__init__(workdir, BINARY)
        self.port, self.tcp_port = free_port(socket.SOCK_STREAM), free_port(socket.SOCK_STREAM)
        self.udp_port = free_port(socket.SOCK_DGRAM)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.key, self.secret = KEY, SECRET
        self.config = workdir / "livekit.yaml"
        text = CONFIG.format(
            port=self.port, tcp=self.tcp_port, udp=self.udp_port, key=KEY, secret=SECRET
        )
        if redis:
            text += f"redis:\n  address: {redis}\n"
        self.config.write_text(text)

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(self.config)]

    def ready(self) -> bool:
        return _http_ok(f"http://127.0.0.1:{self.port}/")

    def api(self) -> api.LiveKitAPI:
        """The server API (RoomService, SIP, dispatch); close it with `aclose`."""
        return api.LiveKitAPI(f"http://127.0.0.1:{self.port}", KEY, SECRET)

    def token(self, room: str, identity: str, *, can_publish: bool = True) -> str:
        """A join token for a test participant ("a browser")."""
        video = api.VideoGrants(room_join=True, room=room, can_publish=can_publish)
        return api.AccessToken(KEY, SECRET).with_identity(identity).with_grants(video).to_jwt()


class Redis(_Process):
    """A throwaway redis-server on loopback (no persistence): LiveKit SIP's bus."""

    name = "redis"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir, Path(shutil.which("redis-server") or "/usr/bin/redis-server"))
        self.port = free_port(socket.SOCK_STREAM)
        self.address = f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary),
            *("--port", str(self.port), "--bind", "127.0.0.1", "--save", ""),
            *("--appendonly", "no", "--dir", str(self.workdir)),
        ]

    def ready(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), 1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False


SIP_CONFIG = """\
api_key: {key}
api_secret: "{secret}"
ws_url: {url}
redis:
  address: {redis}
sip_port: {sip}
listen_ip: 127.0.0.1
use_external_ip: false
nat_1_to_1_ip: 127.0.0.1
rtp_port: {rtp_low}-{rtp_high}
health_port: {health}
logging:
  level: debug
"""


class LiveKitSip(_Process):
    """LiveKit SIP on loopback: SIP on `sip_port` (UDP and TCP), RTP in a small range."""

    name = "livekit-sip"

    def __init__(self, workdir: Path, server: LiveKitServer, redis: Redis) -> None:
        super().__init__(workdir, SIP_BINARY)
        self.sip_port = free_port(socket.SOCK_DGRAM)
        self.health = free_port(socket.SOCK_STREAM)
        low = 32000 + (os.getpid() % 100) * 100
        self.config = workdir / "livekit-sip.yaml"
        self.config.write_text(
            SIP_CONFIG.format(
                key=KEY,
                secret=SECRET,
                url=server.url,
                redis=redis.address,
                sip=self.sip_port,
                rtp_low=low,
                rtp_high=low + 99,
                health=self.health,
            )
        )

    def command(self) -> list[str]:
        return [str(self.binary), "--config", str(self.config)]

    def ready(self) -> bool:
        return _http_ok(f"http://127.0.0.1:{self.health}/")


class Deployment:
    """A whole LiveKit site on loopback: Redis, a livekit-server on it and LiveKit SIP, with
    an inbound trunk (any number, from 127.0.0.1, 8 s ringing timeout) whose dispatch rule
    puts each call in its own room `call-...` and dispatches `agent_name` there."""

    def __init__(self, workdir: Path, agent_name: str) -> None:
        self.redis = Redis(workdir / "redis")
        self.server = LiveKitServer(workdir / "server", redis=self.redis.address)
        self.sip = LiveKitSip(workdir / "sip", self.server, self.redis)
        self.agent_name = agent_name
        self.trunk_id = ""

    def start(self) -> None:
        self.redis.start()
        self.server.start()
        self.sip.start()

    async def configure(self) -> None:
        """Create the trunk and the dispatch rule with the server's SIP service."""
        lkapi = self.server.api()
        try:
            trunk = await lkapi.sip.create_inbound_trunk(
                api.CreateSIPInboundTrunkRequest(
                    trunk=api.SIPInboundTrunkInfo(
                        name="pbx",
                        numbers=[],
                        allowed_addresses=["127.0.0.1"],
                        ringing_timeout=Duration(seconds=8),  # no agent: refused after
                    )
                )
            )
            self.trunk_id = trunk.sip_trunk_id
            await lkapi.sip.create_dispatch_rule(
                api.CreateSIPDispatchRuleRequest(
                    rule=api.SIPDispatchRule(
                        dispatch_rule_individual=api.SIPDispatchRuleIndividual(room_prefix="call-")
                    ),
                    trunk_ids=[self.trunk_id],
                    room_config=api.RoomConfiguration(
                        agents=[api.RoomAgentDispatch(agent_name=self.agent_name)]
                    ),
                )
            )
        finally:
            await lkapi.aclose()

    def cpu_s(self) -> dict[str, float]:
        """CPU seconds so far of each LiveKit process."""
        import psutil

        from bench.latency import _cpu_seconds

        parts = (self.server, self.sip, self.redis)
        return {p.name: _cpu_seconds(psutil.Process(p.proc.pid)) for p in parts if p.proc}

    def stop(self) -> None:
        for part in (self.sip, self.server, self.redis):
            part.stop()
