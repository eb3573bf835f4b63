"""The kiosk: one AgentSession after another on the USB sound card, until the daemon stops.

The session hears the USB microphone (echo-cancelled) and speaks through the USB speaker
wrapped in livekit's TranscriptSynchronizer. When a conversation ends (the agent's
`end_conversation` tool, or a session error) a fresh session starts on the same devices,
after a pause that grows while sessions keep failing; the devices themselves survive being
unplugged (see `usbaudio`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from livekit.agents import AgentSession
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from .config import Config
from .converse import TextSink
from .modelset import ModelSet
from .session import ApplianceAgent, build_session, end_session
from .usbaudio import UsbAudio

logger = logging.getLogger("appliance.kiosk")
RETRY_MAX_S = 30.0


def _log_items(session: AgentSession) -> None:
    def added(ev: Any) -> None:
        item = ev.item
        role = getattr(item, "role", None)
        if role in ("user", "assistant") and item.text_content:
            logger.info("%s: %s", role, item.text_content, extra={"stage": "conversation"})

    session.on("conversation_item_added", added)


async def serve_usb(
    config: Config,
    models: ModelSet,
    stop: asyncio.Event,
    *,
    usb: UsbAudio | None = None,
    sessions: list[AgentSession] | None = None,
) -> None:
    """Run kiosk conversations on the USB devices until `stop` is set.

    `usb` and `sessions` let a caller (a test, the service) see the devices and sessions.
    """
    own = usb is None
    usb = usb or UsbAudio(config.audio)
    if own:
        usb.start()
    if not await usb.wait_connected(5.0):
        logger.warning("USB audio devices not ready yet; the kiosk starts and waits for them")
    failures = 0
    try:
        while not stop.is_set():
            try:
                await _one_session(config, models, stop, usb, sessions)
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
    sessions: list[AgentSession] | None,
) -> None:
    """One conversation, from a fresh session until it closes or the daemon stops."""
    aec = config.audio.echo_cancellation
    session = build_session(
        config, models, aec_warmup_duration=config.audio.aec_warmup if aec else None
    )
    sync = TranscriptSynchronizer(next_in_chain_audio=usb.speaker, next_in_chain_text=TextSink())
    session.input.audio = usb.microphone
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    closed = asyncio.Event()
    session.on("close", lambda _: closed.set())
    _log_items(session)
    if sessions is not None:
        sessions.append(session)
    try:
        await session.start(ApplianceAgent(config.agent), record=False)
        logger.info("kiosk session started", extra={"stage": "session"})
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(closed.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
        if stop.is_set():
            end_session(session, "the daemon is stopping")
    finally:
        await session.aclose()
        await sync.aclose()
