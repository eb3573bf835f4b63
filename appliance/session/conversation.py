"""The lifecycle of one conversation, the same for every bridge (the USB kiosk, a phone call).

A bridge gives its microphone and speaker; `Conversation` numbers the session, builds it on the
shared model set, wires the audio (through a LiveKit room when `[livekit]` bridges the source,
else direct), logs the transcript, tells the observers, starts the agent and, when it ends,
closes the session, then the bridge's own side (`after_close`), then the audio wiring.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Literal

from livekit.agents import AgentSession

from appliance import logs
from appliance.audio.live import LiveInput, Playout
from appliance.config import Config
from appliance.observe.events import SessionInfo
from appliance.room.bridge import conversation_bridge
from appliance.room.people import Person
from appliance.session.builder import (
    ApplianceAgent,
    TextSink,
    build_session,
    end_session,
    log_conversation,
)
from appliance.session.modelset import ModelSet

logger = logging.getLogger("appliance.session")
_numbers: defaultdict[str, Iterator[int]] = defaultdict(lambda: itertools.count(1))


class Conversation:
    """One session on one bridge's audio, from `__init__` (built) through `run` (until closed)."""

    def __init__(
        self,
        config: Config,
        models: ModelSet,
        *,
        source: Literal["usb", "sip"],
        mic: LiveInput,
        speaker: Playout,
        person: Person,
        session_options: dict[str, Any] | None = None,
        call_id: str = "",
        number: str = "",
    ) -> None:
        self.config = config
        self.source = source
        self.call_id = call_id or None
        self.id = f"{source}-{next(_numbers[source])}"
        logs.SESSION.set(self.id)  # tags every log line of this conversation
        self.session = build_session(config, models, **(session_options or {}))
        self.text = TextSink()
        self.bridge = conversation_bridge(
            config,
            self.session,
            mic,
            speaker,
            self.text,
            source=source,
            sid=self.id,
            person=person,
            call_id=call_id,
            number=number,
        )
        self.closed = asyncio.Event()
        self.session.on("close", lambda _: self.closed.set())
        log_conversation(self.session)

    def info(self) -> SessionInfo:
        """What the observers (metrics, the events stream, tests) see of it."""
        manual = self.config.turn_detection == "manual"
        return SessionInfo(
            self.id,
            self.source,
            self.session,
            self.text,
            manual=manual,
            call=self.call_id,
            room=self.bridge,
        )

    async def run(
        self,
        agent: ApplianceAgent,
        *,
        on_session: Callable[[SessionInfo], object] | None = None,
        stop: asyncio.Event | None = None,
        before_start: Callable[[], None] | None = None,
        after_close: Callable[[], Awaitable[object]] | None = None,
    ) -> None:
        """Start `agent` and wait until the session closes; when `stop` is set first, let the
        current reply finish (`[service] drain_timeout`). Everything is closed on the way out."""
        if on_session is not None:
            on_session(self.info())
        try:
            await self.bridge.start()
            if before_start is not None:
                before_start()
            await self.session.start(agent, record=False)
            label = "kiosk" if self.source == "usb" else "call"
            logger.info("%s session started", label, extra={"stage": "session"})
            await self._until_closed_or(stop)
        finally:
            await self.session.aclose()
            if after_close is not None:
                await after_close()
            await self.bridge.aclose(hangup=self.source == "sip")

    async def _until_closed_or(self, stop: asyncio.Event | None) -> None:
        if stop is None:
            await self.closed.wait()
            return
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self.closed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if stop.is_set() and not self.closed.is_set():
            await drain(self.session, self.closed, self.config.service.drain_timeout)


async def drain(
    session: AgentSession,
    done: asyncio.Event,
    timeout: float,
    reason: str = "the daemon is stopping",
) -> None:
    """Let the current reply finish (the session then ends and `done` is set); cut the reply
    if that takes longer than `timeout`."""
    end_session(session, reason)
    try:
        await asyncio.wait_for(done.wait(), timeout)
    except asyncio.TimeoutError:
        logger.warning("the reply did not finish within %.0f s of stopping; cutting it", timeout)
        session.interrupt(force=True)
