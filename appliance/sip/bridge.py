"""Each phone call as its own AgentSession over the process's shared models.

The caller's audio (8 kHz from the jitter buffer) is resampled to 16 kHz and cleaned with
telephony-tuned processing (WebRTC noise suppression, high-pass and gain; no echo
cancellation: the phone does that) before the session hears it, as LiveKit SIP picks a
telephony noise filter for SIP participants. The agent's audio goes out as 20 ms G.711
packets through a `Playout` drained by the RTP clock. DTMF digits (RFC 4733 or SIP INFO)
are collected and given to the agent as the user's words ("The caller pressed 1 2 3 #."),
and kept in `userdata["call"]["dtmf"]`. The agent can hang up (`end_conversation`) and,
with `[sip] transfer_targets`, transfer the call (`transfer_call`, a REFER).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from livekit import rtc
from livekit.agents import AgentSession, RunContext, function_tool

from appliance import logs
from appliance.audio.live import LiveInput, Playout, Rechunker
from appliance.audio.pcm import SESSION_RATE
from appliance.audio.processing import TELEPHONY, AudioProcessor
from appliance.config import Config, ConfigError, PttConfig
from appliance.observe.events import SessionInfo
from appliance.room.people import caller_person
from appliance.session.builder import (
    ApplianceAgent,
)
from appliance.session.conversation import Conversation, drain
from appliance.session.modelset import ModelSet
from appliance.sip.call import Call
from appliance.sip.digest import read_users
from appliance.sip.rtp import RATE
from appliance.sip.ua import UserAgent

logger = logging.getLogger("appliance.sip")

BLOCK = SESSION_RATE // 100
NETWORK_LATENCY_S = 0.06  # our packet to the caller's ear: network and their jitter buffer


class CallAudioInput(LiveInput):
    """The caller, as the session hears them: 16 kHz, telephony noise suppression."""

    def __init__(self, label: str) -> None:
        super().__init__(label, queue_frames=100)
        self._chunker = Rechunker(RATE, SESSION_RATE, BLOCK)
        self._processor = AudioProcessor(TELEPHONY)

    def push(self, pcm8k: np.ndarray) -> None:
        """20 ms from the jitter buffer (on the event loop)."""
        for block in self._chunker.push(pcm8k, RATE):
            if not self.diverted:  # in a room, the agent's RoomIO filters the caller
                block = self._processor.process(block, SESSION_RATE)
            self.deliver(rtc.AudioFrame(block.tobytes(), SESSION_RATE, 1, BLOCK))


class CallAudioOutput(Playout):
    """The agent's voice for the caller: 8 kHz blocks taken by the RTP clock."""

    def __init__(self, label: str) -> None:
        super().__init__(label, padding_s=0.1)
        self.latency_s = NETWORK_LATENCY_S

    def sink_rate(self) -> int:
        return RATE

    def pull(self, n: int) -> np.ndarray:
        block, touched = self.take(n)
        self.taken(touched)
        return block


class CallLine:
    """The call's media (`appliance.sip.call.CallMedia`) wired to one conversation."""

    def __init__(
        self,
        mic: CallAudioInput,
        speaker: CallAudioOutput,
        dtmf: DtmfCollector,
        closed: asyncio.Event,
    ) -> None:
        self.mic, self.speaker, self.dtmf, self.closed = mic, speaker, dtmf, closed

    def heard(self, pcm8k: np.ndarray) -> None:
        self.mic.push(pcm8k)

    def next_audio(self, n: int) -> np.ndarray:
        return self.speaker.pull(n)

    def pressed(self, digit: str) -> None:
        self.dtmf.digit(digit)

    def ended(self, reason: str) -> None:
        self.closed.set()


def transfer_tool(transfer: Callable[[str], Awaitable[bool]], targets: dict[str, str]) -> Any:
    """The agent's `transfer_call` tool: `transfer(uri)` is a REFER (our SIP stack, or
    LiveKit SIP's transfer API for a trunk caller); True when it went through."""
    names = sorted(targets)

    async def transfer_call(raw_arguments: dict[str, object], context: RunContext) -> str:
        name = str(raw_arguments.get("destination", ""))
        if name not in targets:
            return f"Unknown destination. Choose one of: {', '.join(names)}."
        context.session.say("Please hold, I am transferring your call.")
        ok = await transfer(targets[name])
        return "The call was transferred." if ok else "The transfer did not go through."

    return function_tool(
        transfer_call,
        raw_schema={
            "name": "transfer_call",
            "description": "Transfer the caller to a person or department when they ask for one.",
            "parameters": {
                "type": "object",
                "properties": {"destination": {"type": "string", "enum": names}},
                "required": ["destination"],
            },
        },
    )


class DtmfCollector:
    """Digits until '#' or `timeout` seconds of quiet, then one user turn."""

    def __init__(self, session: AgentSession, record: list[str], timeout: float) -> None:
        self.session, self.record, self.timeout = session, record, timeout
        self.digits = ""
        self._timer: asyncio.TimerHandle | None = None

    def digit(self, digit: str) -> None:
        logger.info("DTMF %s", digit)
        self.record.append(digit)
        self.digits += digit
        if self._timer is not None:
            self._timer.cancel()
        if digit == "#":
            self.flush()
        else:
            self._timer = asyncio.get_running_loop().call_later(self.timeout, self.flush)

    def flush(self) -> None:
        self._timer = None
        digits, self.digits = self.digits, ""
        if digits:
            with contextlib.suppress(RuntimeError):  # the session closed meanwhile
                self.session.generate_reply(
                    user_input=f"The caller pressed {' '.join(digits)} on the keypad."
                )


def phone_config(config: Config) -> Config:
    """A caller has no push-to-talk button: calls ignore `[ptt]`, and turn on silence ("vad")
    where `[session] turn_detection` is "manual"."""
    session = config.session
    if session.turn_detection == "manual":
        session = session.model_copy(update={"turn_detection": "vad"})
    return config.model_copy(update={"session": session, "ptt": PttConfig()})


async def serve_call(
    call: Call,
    config: Config,
    models: ModelSet,
    on_session: Callable[[SessionInfo], object] | None = None,
) -> None:
    """The conversation of one answered call, until either side hangs up."""
    logs.CALL_ID.set(call.call_id)
    info: dict[str, Any] = {
        "call_id": call.call_id,
        "direction": "inbound" if call.inbound else "outbound",
        "phone_number": call.number,
        "display_name": call.caller.display,
        "uri": call.caller.uri,
        "headers": dict(call.headers),
        "dtmf": [],
    }
    config = phone_config(config)
    mic = CallAudioInput(f"sip-in:{call.call_id}")
    speaker = CallAudioOutput(f"sip-out:{call.call_id}")
    conversation = Conversation(
        config,
        models,
        source="sip",
        mic=mic,
        speaker=speaker,
        person=caller_person(info),
        session_options={"userdata": {"call": info}},
        call_id=call.call_id,
        number=call.number,
    )
    dtmf = DtmfCollector(conversation.session, info["dtmf"], config.sip.dtmf_timeout)
    call.attach(CallLine(mic, speaker, dtmf, conversation.closed))
    targets = config.sip.transfer_targets
    tools = [transfer_tool(call.transfer, targets)] if targets else []

    async def hang_up() -> None:  # nothing if the call already ended
        await call.hangup("the agent ended the call")

    await conversation.run(
        ApplianceAgent(config.agent, extra_tools=tools), on_session=on_session, after_close=hang_up
    )


async def drain_call(session: AgentSession, call: Call, timeout: float) -> None:
    """Shutdown: the agent finishes its sentence, then BYE."""
    await drain(session, call.ended, timeout, reason="the appliance is stopping")
    await call.hangup("the appliance is stopping")


async def serve_sip(
    config: Callable[[], Config],
    models: ModelSet,
    stop: asyncio.Event,
    *,
    on_session: Callable[[SessionInfo], object] | None = None,
    on_call: Callable[[Call, bool], object] | None = None,
    ready: asyncio.Future[UserAgent] | None = None,
) -> None:
    """Answer (and place) calls until `stop`; then 503 to new calls, drain, BYE, unregister.

    `on_call(call, started)` sees calls start and end; `ready` gets the user agent once it
    listens (tests and `appliance dial` use it to place calls).
    """
    cfg = config().sip
    try:
        users = read_users(cfg.users_file) if cfg.users_file else None
        password = (
            Path(cfg.register_password_file).read_text().strip()
            if cfg.register_password_file
            else ""
        )
    except (OSError, ValueError) as exc:
        raise ConfigError(f"[sip] credentials: {exc}") from None
    sessions: dict[str, tuple[AgentSession, Call]] = {}
    tasks: set[asyncio.Task[None]] = set()

    def conversation_started(conv: SessionInfo) -> None:
        call = ua.calls.get(conv.call or "")
        if call is not None:
            sessions[call.call_id] = (conv.session, call)
        if on_session is not None:
            on_session(conv)

    async def run_call(call: Call) -> None:
        if on_call is not None:
            on_call(call, True)
        try:
            await serve_call(call, config(), models, conversation_started)
        except Exception:
            logger.exception("call %s failed", call.call_id)
            await call.hangup("internal error")
        finally:
            sessions.pop(call.call_id, None)
            if on_call is not None:
                on_call(call, False)

    def answered(call: Call) -> None:
        task = asyncio.create_task(run_call(call), name=f"call {call.call_id}")
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    ua = UserAgent(cfg, answered, users=users, register_password=password)
    await ua.start()
    if ready is not None:
        ready.set_result(ua)
    try:
        await stop.wait()
    finally:
        ua.stopping = True  # new INVITEs get 503 from now on
        drain = config().service.drain_timeout
        await asyncio.gather(
            *(drain_call(s, c, drain) for s, c in list(sessions.values())),
            return_exceptions=True,
        )
        if tasks:
            await asyncio.wait(list(tasks), timeout=5)
        await ua.stop()
