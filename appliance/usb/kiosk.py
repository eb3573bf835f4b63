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
import logging
from collections.abc import Callable

from appliance.config import Config
from appliance.observe.events import SessionInfo
from appliance.ptt.turns import PushToTalk
from appliance.room.people import kiosk_person
from appliance.session.builder import ApplianceAgent
from appliance.session.conversation import Conversation
from appliance.session.modelset import ModelSet
from appliance.usb.audio import UsbAudio

logger = logging.getLogger("appliance.kiosk")
RETRY_MAX_S = 30.0


async def serve_usb(
    config: Callable[[], Config],
    models: ModelSet,
    stop: asyncio.Event,
    *,
    usb: UsbAudio | None = None,
    on_session: Callable[[SessionInfo], object] | None = None,
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
    on_session: Callable[[SessionInfo], object] | None,
    ptt: PushToTalk | None = None,
) -> None:
    """One conversation, from a fresh session until it closes or the daemon stops."""
    aec = config.audio.echo_cancellation
    conversation = Conversation(
        config,
        models,
        source="usb",
        mic=usb.microphone,
        speaker=usb.speaker,
        person=kiosk_person(),
        session_options={"aec_warmup_duration": config.audio.aec_warmup if aec else 0.0},
    )
    agent = ApplianceAgent(config.agent, turn_gate=ptt.should_reply if ptt else None)

    def attach_button() -> None:  # the microphone opens only while the button is held
        if ptt is not None:
            ptt.attach(conversation.session, conversation.id)

    await conversation.run(agent, on_session=on_session, stop=stop, before_start=attach_button)
