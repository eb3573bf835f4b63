"""One conversation's mode, room or direct: the retries, the moves between them, and the
wiring of a conversation's audio (`conversation_bridge`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Literal

from livekit.agents import AgentSession
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from appliance.audio.live import LiveInput, Playout
from appliance.config import Config, ConfigError, LivekitConfig
from appliance.logs import guard_livekit_logs, redact_tokens
from appliance.room.link import Connect, Link, RoomLink
from appliance.room.people import Person, room_name
from appliance.session.builder import TextSink, connect_audio

logger = logging.getLogger("appliance.room")
RETRY_MIN_S = 1.0
ATTEMPTS_KEPT = 100


def join_error(exc: BaseException) -> str:
    """Why joining a room failed, for the log and the events API: a refusal of the
    credentials named as such, and never the token (LiveKit echoes a refused token back)."""
    text = redact_tokens(str(exc)) or type(exc).__name__
    if "401" in text:
        return f"the server refused the credentials, check [livekit] api_key and the secret: {text}"
    return text


class RoomBridge:
    """One conversation's mode, room or direct, and the retries between them.

    `connect` joins the room (None: the bridge is off, the conversation is direct); the
    direct path is the conversation's own microphone and speaker, wired by `connect_audio`.
    """

    def __init__(
        self,
        cfg: LivekitConfig,
        connect: Connect | None,
        session: AgentSession,
        local_in: LiveInput,
        local_out: Playout,
        text: TextSink,
        *,
        room: str = "",
    ) -> None:
        self.cfg, self._connect = cfg, connect
        self.session = session
        self.local_in, self.local_out, self.text = local_in, local_out, text
        self.room = room
        self.mode: Literal["starting", "room", "direct"] = "starting"
        self.link: Link | None = None
        # the latest tries: when, how long, the outcome (bounded: a server away for days)
        self.attempts: deque[dict[str, Any]] = deque(maxlen=ATTEMPTS_KEPT)
        self.switches: list[tuple[float, str]] = []  # (monotonic time, mode)
        self.listeners: list[Callable[[str], None]] = []  # each mode change (events stream)
        self._syncs: list[TranscriptSynchronizer] = []
        self._task: asyncio.Task[None] | None = None
        self._first = asyncio.Event()
        self._closing = False
        self._leaving: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Try the room for up to `join_wait` seconds, else go direct; retries run on."""
        if self._connect is None:
            self._direct()
            return
        self._task = asyncio.create_task(self._run(), name=f"room bridge {self.room}")
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(self._first.wait(), self.cfg.join_wait)
        if self.mode == "starting":
            if self.cfg.join_wait > 0:
                logger.warning(
                    "room %r: no answer from %s within %.1f s; the conversation starts offline",
                    self.room,
                    self.cfg.url,
                    self.cfg.join_wait,
                )
            self._direct()

    def _direct(self) -> None:
        sync, _ = connect_audio(self.session, self.local_in, self.local_out, self.text)
        self._syncs.append(sync)
        self._set_mode("direct")

    def _set_mode(self, mode: Literal["room", "direct"]) -> None:
        self.mode = mode
        self.switches.append((time.monotonic(), mode))
        if self.room:
            for listener in self.listeners:
                listener(mode)

    async def _run(self) -> None:
        assert self._connect is not None
        failures = 0
        while not self._closing:
            started = time.monotonic()
            try:
                link = await self._connect()
            except Exception as exc:
                failures += 1
                self._record(started, f"failed: {join_error(exc)}")
                self._first.set()
                await asyncio.sleep(self._backoff(failures))
                continue
            self._record(started, "joined")
            try:
                await self._between_turns()
                if self._closing:
                    await link.aclose(hangup=True)
                    return
                await link.attach(self.session, self.local_in, self.local_out, self.text)
            except Exception as exc:
                logger.warning(
                    "room %r: could not attach the conversation: %s", self.room, join_error(exc)
                )
                link.detach(self.local_in, self.local_out)
                await link.aclose()
                if self.mode != "starting":  # RoomIO may have taken the session's audio
                    self._direct()
                self._first.set()
                failures += 1
                await asyncio.sleep(self._backoff(failures))
                continue
            self.link = link
            self._set_mode("room")
            self._first.set()
            failures = 0
            await link.dropped.wait()
            if self._closing:
                return
            logger.warning("room %r dropped; the conversation goes on offline", self.room)
            with contextlib.suppress(RuntimeError):  # a reply into a dead room never ends
                self.session.interrupt(force=True)
            link.detach(self.local_in, self.local_out)
            self.link = None
            self._direct()
            leaving = asyncio.create_task(link.aclose())  # leaving a dead room takes a while
            self._leaving.add(leaving)
            leaving.add_done_callback(self._leaving.discard)
            failures = 1
            await asyncio.sleep(self._backoff(failures))

    def _backoff(self, failures: int) -> float:
        """Seconds before the next try: 1, 2, 4 ... up to `retry_max`."""
        return min(self.cfg.retry_max, RETRY_MIN_S * 2 ** (failures - 1))

    def _record(self, started: float, outcome: str) -> None:
        took = time.monotonic() - started
        again = bool(self.attempts) and self.attempts[-1]["outcome"] == outcome
        self.attempts.append({"at": started, "took_s": round(took, 3), "outcome": outcome})
        log = logger.info if outcome == "joined" else logger.debug if again else logger.warning
        log("room %r at %s: %s (%.1f s)", self.room, self.cfg.url, outcome, took)

    async def _between_turns(self) -> None:
        """Wait until nobody speaks and the agent is not replying (the session may not
        have started yet: then it is free)."""
        while not self._closing and self.mode != "starting":
            s = self.session
            if s.agent_state in ("listening", "initializing") and s.user_state != "speaking":
                return
            await asyncio.sleep(0.1)

    async def aclose(self, hangup: bool = False) -> None:
        """Stop retrying and leave the room; call after the session has closed."""
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
        if self.link is not None:
            self.link.detach(self.local_in, self.local_out)
            await self.link.aclose(hangup=hangup)
            self.link = None
        for task in list(self._leaving):
            with contextlib.suppress(Exception):
                await task
        for sync in self._syncs:
            await sync.aclose()


def conversation_bridge(
    config: Config,
    session: AgentSession,
    local_in: LiveInput,
    local_out: Playout,
    text: TextSink,
    *,
    source: Literal["sip", "usb"],
    sid: str,
    person: Person,
    call_id: str = "",
    number: str = "",
) -> RoomBridge:
    """The audio wiring of one conversation: through a room when `[livekit]` bridges this
    source, else direct. An unreadable API secret is logged and the conversation is direct."""
    lk = config.livekit
    if not lk.enabled or lk.mode != "bridge" or source not in lk.sources:
        return RoomBridge(lk, None, session, local_in, local_out, text)
    guard_livekit_logs()
    name = room_name(lk.room, source=source, session=sid, call_id=call_id, number=number)
    try:
        secret = lk.secret()
    except ConfigError as exc:
        logger.error("%s; the conversation runs offline", exc)
        return RoomBridge(lk, None, session, local_in, local_out, text, room=name)
    agent = f"agent_{socket.gethostname()}"

    def connect() -> Awaitable[Link]:
        return RoomLink.connect(lk, secret, name, person, agent)

    return RoomBridge(lk, connect, session, local_in, local_out, text, room=name)
