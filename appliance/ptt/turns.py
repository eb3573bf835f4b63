"""Push-to-talk turns: what presses and releases of the button mean for the session.

`PushToTalk` gives the edges their meaning for the current AgentSession:

- press: interrupt the agent (if its speech may be interrupted), clear any partial user
  turn, open the microphone;
- release: close the microphone and commit the turn (`commit_user_turn()`);
- a press shorter than `min_press_ms` is ignored (its audio is dropped, no turn);
- a hold longer than `max_hold_s` commits at the limit (the release then does nothing);
- a press that starts within `cancel_window_ms` of the previous release cancels: the agent
  stops, the microphone stays closed and the turn just committed gets no reply and is
  left out of the agent's memory;
- while the button is up the microphone is closed: the session hears nothing.

`serve_button` keeps the configured button open and feeding a `PushToTalk`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from appliance.ptt.inputs import Button, ButtonError, Debouncer, make_button

if TYPE_CHECKING:
    from livekit.agents import AgentSession

    from appliance.config import PttConfig
    from appliance.ptt.led import StatusLed

logger = logging.getLogger("appliance.ptt")

RETRY_S = 2.0


class PushToTalk:
    """Press/release semantics for the current session, and the LED."""

    def __init__(
        self,
        cfg: PttConfig,
        led: StatusLed | None = None,
        on_action: Callable[[str, str, str | None], None] | None = None,
    ) -> None:
        self.cfg = cfg
        self.led = led
        self.on_action = on_action  # (action, source, session id): the events stream
        self.session: AgentSession | None = None
        self.session_id: str | None = None
        self._source = "button"
        self.mic_open = False
        self.turns_committed = 0
        self.ignored_presses = 0
        self.cancels = 0
        self._pressed_at: float | None = None
        self._released_at = -1e9
        self._limit: asyncio.TimerHandle | None = None
        self._awaiting_turn = False  # a committed turn that has not reached the agent yet
        self._cancel_pending = False
        self._transcribing = False  # released, the agent not yet thinking
        self._forget: asyncio.Future[None] | None = None
        self.debouncer = Debouncer(cfg.debounce_ms / 1000, self.press, self.release)

    def edge(self, pressed: bool, at: float, source: str = "button") -> None:
        """A level change from a button ("button") or the kiosk page ("page")."""
        self._source = source
        self.debouncer.edge(pressed, at)

    def _report(self, action: str) -> None:
        if self.on_action is not None:
            self.on_action(action, self._source, self.session_id)

    def attach(self, session: AgentSession, session_id: str | None = None) -> None:
        """Drive this session (its audio input must be set): the microphone starts closed."""
        self.session = session
        self.session_id = session_id
        self.mic_open = False
        session.input.set_audio_enabled(False)
        session.on("agent_state_changed", self._agent_state_changed)
        session.on("close", lambda _: self.detach(session))

    def detach(self, session: AgentSession) -> None:
        """The session closed: forget its turn state (a held button waits for the next one)."""
        if self.session is not session:
            return
        self.session = None
        self._pressed_at = None
        if self._limit is not None:
            self._limit.cancel()
            self._limit = None
        self.mic_open = self._transcribing = self._awaiting_turn = self._cancel_pending = False
        self._show()

    def _agent_state_changed(self, ev: Any) -> None:
        if ev.new_state in ("thinking", "speaking"):
            self._transcribing = False  # the agent has the turn now
        self._show()

    def _show(self) -> None:
        if self.led is None:
            return
        state = self.session.agent_state if self.session is not None else "idle"
        if self.mic_open:
            self.led.show("listening")
        elif state == "thinking" or (self._transcribing and self.session is not None):
            self.led.show("thinking")  # from the release on: the turn is being worked on
        elif state == "speaking":
            self.led.show("speaking")
        else:
            self.led.show("idle")

    def _set_mic(self, session: AgentSession, open_: bool) -> None:
        self.mic_open = open_
        session.input.set_audio_enabled(open_)
        self._show()

    def press(self, at: float) -> None:
        session = self.session
        if session is None:
            return
        try:
            session.interrupt()
            session.clear_user_turn()
        except RuntimeError:  # the session is starting or closing: no turn to take
            return
        window = self.cfg.cancel_window_ms / 1000
        if window and at - self._released_at < window:
            self._cancel(session)
            return
        self._report("press")
        self._pressed_at = at
        self._set_mic(session, True)
        loop = asyncio.get_running_loop()
        self._limit = loop.call_later(self.cfg.max_hold_s, self._hold_limit)

    def release(self, at: float) -> None:
        if self._pressed_at is None or self.session is None:
            return  # already committed at the hold limit, cancelled, or no session
        if at - self._pressed_at < self.cfg.min_press_ms / 1000:
            held = at - self._pressed_at
            self._end_press(self.session, commit=False)
            with contextlib.suppress(RuntimeError):
                self.session.clear_user_turn()
            self.ignored_presses += 1
            self._report("ignored")
            logger.info("push-to-talk: %.0f ms press ignored (too short)", held * 1000)
            return
        self._released_at = at
        self._report("release")
        self._end_press(self.session, commit=True)

    def _hold_limit(self) -> None:
        if self._pressed_at is None or self.session is None:
            return
        logger.info("push-to-talk: held for %.0f s; committing the turn", self.cfg.max_hold_s)
        self._report("limit")
        self._end_press(self.session, commit=True)

    def _end_press(self, session: AgentSession, *, commit: bool) -> None:
        """Close the microphone; with `commit`, hand the turn to the agent."""
        self._pressed_at = None
        if self._limit is not None:
            self._limit.cancel()
            self._limit = None
        self._transcribing = commit  # the LED goes from listening straight to thinking
        self._set_mic(session, False)
        if not commit:
            return
        try:
            done = session.commit_user_turn(transcript_timeout=10.0)
        except RuntimeError:  # the session closed under the button
            self._transcribing = False
            self._show()
            return
        self.turns_committed += 1
        self._awaiting_turn = True
        done.add_done_callback(self._transcribed)

    def _transcribed(self, done: asyncio.Future[str]) -> None:
        """A turn with no words never reaches the agent: nothing to wait for."""
        if done.cancelled() or done.exception() is not None or not done.result().strip():
            self._awaiting_turn = False
            self._transcribing = False
            self._show()

    def _cancel(self, session: AgentSession) -> None:
        self.cancels += 1
        self._report("cancel")
        self._released_at = -1e9  # a third press is a new press
        self._transcribing = False
        self._show()
        session.interrupt(force=True)
        if self._awaiting_turn:
            self._cancel_pending = True  # the gate stops the reply when the turn arrives
        else:
            self._forget = asyncio.ensure_future(_forget_last_turn(session))
        logger.info("push-to-talk: double press; turn cancelled")

    def should_reply(self) -> bool:
        """The agent's gate for each completed user turn (False: no reply, not remembered)."""
        self._awaiting_turn = False
        if self._cancel_pending:
            self._cancel_pending = False
            self._transcribing = False
            self._show()
            return False
        return True


async def _forget_last_turn(session: AgentSession) -> None:
    """Drop the last user message and what followed it from the agent's memory."""
    agent = session.current_agent
    ctx = agent.chat_ctx.copy()
    users = [i for i, item in enumerate(ctx.items) if getattr(item, "role", None) == "user"]
    if not users:
        return
    ctx.items[:] = ctx.items[: users[-1]]
    await agent.update_chat_ctx(ctx)


async def serve_button(
    cfg: PttConfig, ptt: PushToTalk, stop: asyncio.Event, make: Callable[[], Button] | None = None
) -> None:
    """Keep the button open until `stop`; while it is missing or lost, retry every 2 s.

    One error line when it goes, one line when it is back; the kiosk keeps running.
    """
    loop = asyncio.get_running_loop()
    missing = False
    while not stop.is_set():
        button = make() if make is not None else make_button(cfg)
        gone = asyncio.Event()
        try:
            button.start(loop, ptt.edge, gone.set)
        except ButtonError as exc:
            if not missing:
                logger.error(
                    "push-to-talk button unavailable: %s; retrying every %.0f s", exc, RETRY_S
                )
                missing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)
            continue
        logger.log(
            logging.WARNING if missing else logging.INFO,
            "push-to-talk button %s (%s)",
            "is back" if missing else "ready",
            cfg.backend,
        )
        missing = False
        waiters = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(gone.wait())]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            button.close()
        if gone.is_set() and not stop.is_set():
            ptt.edge(False, time.monotonic())  # a lost button is not held
            logger.error("push-to-talk button lost; retrying every %.0f s", RETRY_S)
            missing = True
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), RETRY_S)
