"""Building an AgentSession from the config and the shared local model set.

The reference's flat options are mapped onto livekit-agents 1.8.9's `turn_handling`
(so no deprecation warnings), model names resolve to local plugins (never LiveKit's cloud
inference), and interruption detection is pinned to VAD (the adaptive detector is a cloud
service).
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

from livekit.agents import (
    Agent,
    AgentSession,
    ConversationItemAddedEvent,
    RunContext,
    StopResponse,
    UserInputTranscribedEvent,
    function_tool,
    llm,
)
from livekit.agents.types import NOT_GIVEN
from livekit.agents.voice import io
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer
from livekit.agents.voice.turn import TurnHandlingOptions

from appliance.config import BUILTIN_TOOLS, AgentConfig, Config, SessionConfig
from appliance.plugins.shared_vad import SharedVAD
from appliance.session.modelset import ModelSet

if TYPE_CHECKING:
    from livekit.agents.voice import SpeechHandle

    from appliance.plugins.llama.llm import LlamaLLM
    from appliance.plugins.smart_turn.detector import WordsJudge

logger = logging.getLogger("appliance.session")
TurnMode = Literal["model", "vad", "stt", "manual"]


async def _current_time() -> str:
    """Get the current local date and time, for questions about the time or the date."""
    return datetime.datetime.now().strftime("It is %H:%M on %A, %d %B %Y.")


async def _end_conversation(context: RunContext) -> str:
    """End the conversation when the user says goodbye or asks to stop."""
    end_session(context.session, "the agent ended the conversation (end_conversation tool)")
    return "Goodbye."


# each name in config.BUILTIN_TOOLS (what [agent] tools accepts) is the function `_<name>` here
_TOOLS = {name: globals()[f"_{name}"] for name in BUILTIN_TOOLS}


def build_tools(names: Sequence[str]) -> list[llm.Tool | llm.Toolset]:
    """The built-in function tools named in [agent] tools."""
    return [function_tool(_TOOLS[name], name=name) for name in names]


def tool_choice(agent: AgentConfig) -> llm.ToolChoice | None:
    """[agent] tool_choice as livekit's ToolChoice ("auto" leaves it to the model)."""
    if not agent.tools or agent.tool_choice == "auto":
        return None
    if agent.tool_choice in ("required", "none"):
        return agent.tool_choice  # type: ignore[return-value]
    return {"type": "function", "function": {"name": agent.tool_choice}}


class ApplianceAgent(Agent):
    """The configured agent: instructions, built-in tools, and the greeting on entry.

    `turn_gate`, when given, is asked for each completed user turn; False drops the turn
    (no reply, not added to the conversation): a push-to-talk cancel. `extra_tools` are a
    bridge's own (a phone call's hang-up and transfer).
    """

    def __init__(
        self,
        config: AgentConfig,
        *,
        instructions: str | None = None,
        turn_gate: Callable[[], bool] | None = None,
        extra_tools: Sequence[llm.Tool | llm.Toolset] = (),
    ) -> None:
        super().__init__(
            instructions=instructions or config.instructions,
            tools=[*build_tools(config.tools), *extra_tools],
        )
        self.greeting = config.greeting
        self.turn_gate = turn_gate

    async def on_enter(self) -> None:
        from appliance.plugins.piper.tts import PiperTTS

        greeting = None
        if self.greeting:
            engine = self.session.tts
            # the same greeting every call: Piper renders it once per process
            audio = engine.rendered(self.greeting) if isinstance(engine, PiperTTS) else NOT_GIVEN
            greeting = self.session.say(self.greeting, audio=audio, allow_interruptions=True)
        self._prefill_task = asyncio.create_task(self._prefill_instructions(greeting))
        self.session.on("conversation_item_added", self._after_item)

    async def on_exit(self) -> None:
        self.session.off("conversation_item_added", self._after_item)

    def _after_item(self, event: ConversationItemAddedEvent) -> None:
        """After each reply, the conversation so far and the start of the user's next
        turn go into the LLM's KV cache (about 5 template tokens and whatever of the reply
        was not cached as generated), so the next question evaluates only itself."""
        from appliance.plugins.llama.llm import LlamaLLM

        engine = self.session.llm
        if getattr(event.item, "role", None) != "assistant" or not isinstance(engine, LlamaLLM):
            return
        if not self._prefill_task.done():
            return  # the greeting: the session's start does it once played
        prefill = engine.prefill(self.chat_ctx, self.tools, upto_user=True, keep_others=True)
        prefill.add_done_callback(_prefill_done)

    async def _prefill_instructions(self, greeting: SpeechHandle | None) -> None:
        """Evaluate the instructions and tools into the LLM's KV cache, so that the first
        question evaluates only itself (the first question of a call took 350 ms to its
        first token, the next ones 115-130 ms). After the greeting, whose first audio
        would otherwise wait for it."""
        from appliance.plugins.llama.llm import LlamaLLM

        engine = self.session.llm
        if not isinstance(engine, LlamaLLM):
            return
        if greeting is not None:
            await greeting.wait_for_playout()
        try:
            await engine.prefill(self.chat_ctx, self.tools, upto_user=True)
        except Exception as exc:  # the model failing shows again, and is reported, on a turn
            logger.warning("LLM prefill of the instructions failed: %s", exc)

    async def on_user_turn_completed(
        self, turn_ctx: llm.ChatContext, new_message: llm.ChatMessage
    ) -> None:
        if self.turn_gate is not None and not self.turn_gate():
            logger.info("user turn dropped: %r", new_message.text_content)
            raise StopResponse()


def turn_handling(
    session: SessionConfig, detector: Any | None, mode: TurnMode | None = None
) -> TurnHandlingOptions:
    """The reference's flat options as 1.8.9's grouped turn_handling.

    `mode` overrides `session.turn_detection` (a push-to-talk button makes it "manual").
    In manual mode the application ends the turn, so livekit's minimum endpointing delay
    (which it would otherwise still wait out after the last speech) is 0.
    """
    mode = mode or session.turn_detection
    preemptive = session.preemptive_generation and mode != "manual"
    return {
        "turn_detection": detector if mode == "model" else mode,
        "endpointing": {
            "min_delay": 0.0 if mode == "manual" else session.min_endpointing_delay,
            "max_delay": session.max_endpointing_delay,
        },
        "interruption": {
            "enabled": session.allow_interruptions,
            "mode": "vad",
            "min_duration": session.min_interruption_duration,
            "min_words": session.min_interruption_words,
        },
        # preemptive: the LLM and the TTS start on the STT's first transcript of a pause
        # (our Whisper's preflight), before the turn is confirmed; a user who pauses more
        # than once in a turn gets a fresh attempt each time. Not for manual turns: the
        # release is the end of the turn (nothing to gain), and a push-to-talk cancel must
        # leave no trace of the turn
        "preemptive_generation": {
            "enabled": preemptive,
            "preemptive_tts": preemptive,
            "max_retries": 6,
        },
    }


def build_session(
    config: Config,
    models: ModelSet,
    *,
    aec_warmup_duration: float = 0.0,
    userdata: dict[str, Any] | None = None,
) -> AgentSession:
    """A new AgentSession over the shared models. Call inside the running event loop.

    `aec_warmup_duration`: seconds from the agent's first speech in the session during
    which the user cannot interrupt, while a local echo canceller adapts (livekit's default
    is 3 s; with no local echo canceller, as on a phone call, there is nothing to wait for).
    `userdata` is added to `[session] userdata` (a call's caller, number, headers).
    """
    cfg = config.session
    mode = config.turn_detection
    vad = SharedVAD(models.vad())  # one Silero stream for livekit, the STT and smart-turn
    engine = models.llm(tool_choice(config.agent))
    words = text_turn(cfg, engine, lambda: session) if mode == "model" else None
    detector = models.turn_detector(vad=vad, words=words) if mode == "model" else None
    session: AgentSession = AgentSession(
        stt=models.stt(vad=vad, segment=mode != "manual", turn_text=words.text if words else None),
        vad=vad,
        llm=engine,
        tts=models.tts(),
        turn_handling=turn_handling(cfg, detector, mode),
        userdata={**cfg.userdata, **(userdata or {})},
        aec_warmup_duration=aec_warmup_duration,
        user_away_timeout=cfg.user_away_timeout,
    )
    if mode == "manual" or config.models.stt_interim_interval > 0:
        prefill_from_transcripts(session, engine)
    if words is not None:
        turn_text = words.text

        def added(ev: ConversationItemAddedEvent) -> None:
            if getattr(ev.item, "role", None) == "user":
                turn_text.committed()

        session.on("conversation_item_added", added)
    return session


def text_turn(
    cfg: SessionConfig, engine: LlamaLLM, session: Callable[[], AgentSession]
) -> WordsJudge | None:
    """The words' part of the end-of-turn decision ([session] text_turn_detection): each
    transcript of the turn judged by the LLM, in the prompt its reply would have."""
    if not cfg.text_turn_detection:
        return None
    from appliance.plugins.smart_turn.detector import WordsJudge
    from appliance.plugins.turn_text import TurnText

    def judge(text: str) -> asyncio.Future[float | None]:
        agent = session().current_agent
        return engine.end_of_turn_probability(agent.chat_ctx, agent.tools, text)

    return WordsJudge(
        TurnText(judge),
        cfg.text_unfinished_below,
        cfg.text_finished_above,
        unsure_wait=cfg.uncertain_endpointing_delay,
    )


def prefill_from_transcripts(session: AgentSession, engine: LlamaLLM) -> None:
    """The words transcribed before the turn ends (interim transcripts, and Whisper's
    preflight at a pause) go into the LLM's KV cache as the prompt the reply will have, so
    when the turn ends the LLM evaluates only the words that came after (or nothing). For
    manual turns above all (push-to-talk: interims every [models] stt_interim_manual
    seconds while the button is held); in the other modes when [models]
    stt_interim_interval is set. Nothing enters the conversation: a push-to-talk cancel
    leaves no trace."""

    def transcribed(ev: UserInputTranscribedEvent) -> None:
        if ev.is_final or not ev.transcript.strip():
            return
        try:
            agent = session.current_agent
        except RuntimeError:  # starting or closing
            return
        ctx = agent.chat_ctx.copy()
        ctx.add_message(role="user", content=ev.transcript)
        engine.prefill(ctx, agent.tools).add_done_callback(_prefill_done)

    session.on("user_input_transcribed", transcribed)


def _prefill_done(done: asyncio.Future[int]) -> None:
    if not done.cancelled() and (exc := done.exception()) is not None:
        logger.warning("LLM prefill failed: %s", exc)


def end_session(session: AgentSession, reason: str) -> None:
    """Graceful shutdown: finish the current reply, then close; the reason is logged."""
    logger.info("ending session: %s", reason, extra={"reason": reason})
    session.shutdown(drain=True)


def log_conversation(session: AgentSession) -> None:
    """Log each user and agent message (stage=conversation: the transcript in the journal)."""

    def added(ev: Any) -> None:
        item = ev.item
        role = getattr(item, "role", None)
        if role in ("user", "assistant") and item.text_content:
            logger.info("%s: %s", role, item.text_content, extra={"stage": "conversation"})

    session.on("conversation_item_added", added)


class TextSink(io.TextOutput):
    """Collects the agent's transcription text as it is played.

    Behind livekit's TranscriptSynchronizer the text arrives in step with the speech;
    `listeners` get each piece, and None when a reply segment ends.
    """

    def __init__(self) -> None:
        super().__init__(label="text-sink", next_in_chain=None)
        self.text: list[str] = []
        self.listeners: list[Callable[[str | None], None]] = []

    async def capture_text(self, text: str) -> None:
        self.text.append(text)
        for listener in self.listeners:
            listener(text)

    def flush(self) -> None:
        for listener in self.listeners:
            listener(None)


def connect_audio(
    session: AgentSession,
    audio_in: io.AudioInput,
    audio_out: io.AudioOutput,
    text: TextSink | None = None,
) -> tuple[TranscriptSynchronizer, TextSink]:
    """Give a session its microphone and speaker, the speaker behind livekit's
    TranscriptSynchronizer (an interrupted reply is stored truncated to what was played),
    and a TextSink with the agent's words in step with its speech.

    Close the synchronizer after the session (`await sync.aclose()`), or its tasks outlive
    the conversation.
    """
    text = text or TextSink()
    sync = TranscriptSynchronizer(next_in_chain_audio=audio_out, next_in_chain_text=text)
    session.input.audio = audio_in
    session.output.audio = sync.audio_output
    session.output.transcription = sync.text_output
    return sync, text
