"""The kiosk: one AgentSession after another on the USB sound card, until the daemon stops.

The session hears the USB microphone (echo-cancelled) and speaks through the USB speaker
wrapped in livekit's TranscriptSynchronizer. When a conversation ends (the agent's
`end_conversation` tool, or a session error) a fresh session starts on the same devices,
after a pause that grows while sessions keep failing; the devices themselves survive being
unplugged (see `usbaudio`). Each session reads the configuration when it starts, so a
reloaded `[session]` or `[agent]` applies from the next conversation on.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Callable

from livekit.agents import AgentSession

from . import logs
from .config import Config
from .events import Conversation
from .modelset import ModelSet
from .ptt import PushToTalk
from .room import conversation_bridge, kiosk_person
from .session import (
    ApplianceAgent,
    TextSink,
    build_session,
    end_session,
    log_conversation,
)
from .usbaudio import UsbAudio

logger = logging.getLogger("appliance.kiosk")
RETRY_MAX_S = 30.0
_numbers = itertools.count(1)


async def serve_usb(
    config: Callable[[], Config],
    models: ModelSet,
    stop: asyncio.Event,
    *,
    usb: UsbAudio | None = None,
    on_session: Callable[[Conversation], object] | None = None,
    ptt: PushToTalk | None = None,
) -> None:
    """Run kiosk conversations on the USB devices until `stop` is set, then drain.

    `config()` gives the configuration for each new session. `usb` lets a caller own the
    devices; `on_session` sees each conversation before it starts (metrics, the events
    stream, tests); `ptt` (a button, or the page's on-screen one) drives manual turns.
    """
    own = usb is None
    usb = usb or UsbAudio(config().audio)
    if own:
        usb.start()
    if not await usb.wait_connected(5.0):
        logger.warning("USB audio devices not ready yet; the kiosk starts and waits for them")
    failures = 0
    try:
        while not stop.is_set():
            try:
                await _one_session(config(), models, stop, usb, on_session, ptt)
                failures = 0
            except Exception:
                failures += 1
                logger.exception("kiosk session failed (%d in a row)", failures)
            if not stop.is_set():  # a session that keeps failing does not spin
                pause = min(RETRY_MAX_S, 0.5 * 2 ** min(failures, 6))
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(stop.wait(), pause)
    finally:
        if own:
            usb.close()


async def _one_session(
    config: Config,
    models: ModelSet,
    stop: asyncio.Event,
    usb: UsbAudio,
    on_session: Callable[[Conversation], object] | None,
    ptt: PushToTalk | None = None,
) -> None:
    """One conversation, from a fresh session until it closes or the daemon stops."""
    sid = f"usb-{next(_numbers)}"
    logs.SESSION.set(sid)  # tags every log line of this session
    aec = config.audio.echo_cancellation
    session = build_session(
        config, models, aec_warmup_duration=config.audio.aec_warmup if aec else 0.0
    )
    text = TextSink()
    bridge = conversation_bridge(
        config,
        session,
        usb.microphone,
        usb.speaker,
        text,
        source="usb",
        sid=sid,
        person=kiosk_person(),
    )
    closed = asyncio.Event()
    session.on("close", lambda _: closed.set())
    log_conversation(session)
    if on_session is not None:
        manual = config.turn_detection == "manual"
        on_session(Conversation(sid, "usb", session, text, manual=manual, room=bridge))
    agent = ApplianceAgent(config.agent, turn_gate=ptt.should_reply if ptt else None)
    try:
        await bridge.start()
        if ptt is not None:
            ptt.attach(session, sid)  # the microphone opens only while the button is held
        await session.start(agent, record=False)
        logger.info("kiosk session started", extra={"stage": "session"})
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(closed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if stop.is_set() and not closed.is_set():
            await drain(session, closed, config.service.drain_timeout)
    finally:
        await session.aclose()
        await bridge.aclose()


async def drain(session: AgentSession, closed: asyncio.Event, timeout: float) -> None:
    """Let the current reply finish, then close; cut it if it takes longer than `timeout`."""
    end_session(session, "the daemon is stopping")
    try:
        await asyncio.wait_for(closed.wait(), timeout)
    except asyncio.TimeoutError:
        logger.warning("the reply did not finish within %.0f s of stopping; cutting it", timeout)
        session.interrupt(force=True)
