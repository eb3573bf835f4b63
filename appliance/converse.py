"""The main job without hardware: one spoken question in a WAV file, one spoken reply out.

A real AgentSession hears the file through `WavAudioInput` in real time and speaks through
`RecordingAudioOutput` (wrapped in livekit's TranscriptSynchronizer, so an interrupted
reply is stored truncated). The result carries the conversation, the session's events and
the timeline figures the benchmark uses.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from livekit.agents import AgentSession, llm
from livekit.agents.voice.transcription.synchronizer import TranscriptSynchronizer

from appliance.audio.files import Clock, RecordingAudioOutput, WavAudioInput, read_audio, write_wav
from appliance.config import Config
from appliance.session.builder import ApplianceAgent, build_session, connect_audio, end_session
from appliance.session.modelset import ModelSet

logger = logging.getLogger("appliance.converse")

SESSION_EVENTS = (
    "user_state_changed",
    "agent_state_changed",
    "conversation_item_added",
    "session_usage_updated",
    "user_input_transcribed",
    "close",
)


class EventLog:
    """Every session event of interest, as plain dicts with the clock time."""

    def __init__(self, session: AgentSession, clock: Clock) -> None:
        self.events: list[dict[str, Any]] = []
        for name in SESSION_EVENTS:
            session.on(name, self._recorder(name, clock))  # type: ignore[arg-type]

    def _recorder(self, name: str, clock: Clock) -> Callable[[Any], None]:
        def record(ev: Any) -> None:
            self.events.append({"type": name, "t": round(clock.now(), 3), "event": ev})

        return record

    def of(self, name: str) -> list[Any]:
        return [e["event"] for e in self.events if e["type"] == name]


@dataclass
class ConverseResult:
    items: list[dict[str, Any]]
    reply_pcm: np.ndarray
    reply_rate: int
    input_start: float
    input_seconds: float
    origin: float  # the timeline's zero, on the event loop's (monotonic) clock
    events: EventLog
    segments: list[dict[str, Any]] = field(default_factory=list)
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def first_audio_after(self, t: float, threshold: int = 300) -> float | None:
        """Time of the first non-silent output sample at or after `t` on the timeline."""
        return first_loud(self.reply_pcm, self.reply_rate, t, threshold)


def first_loud(pcm: np.ndarray, rate: int, t: float, threshold: int = 300) -> float | None:
    """Seconds to the first sample of `pcm` at or after `t` louder than `threshold`."""
    start = int(t * rate)
    loud = np.flatnonzero(np.abs(pcm[start:].astype(np.int32)) > threshold)
    return (start + int(loud[0])) / rate if len(loud) else None


def history_items(ctx: llm.ChatContext) -> list[dict[str, Any]]:
    """The conversation as JSON-ready items with at least `role` and `text`."""
    out: list[dict[str, Any]] = []
    for item in ctx.items:
        if item.type == "message":
            out.append(
                {
                    "role": item.role,
                    "text": item.text_content or "",
                    "interrupted": item.interrupted,
                }
            )
        elif item.type == "function_call":
            out.append({"role": "tool_call", "text": item.arguments, "name": item.name})
        elif item.type == "function_call_output":
            out.append({"role": "tool", "text": item.output, "name": item.name})
    return out


def wire(
    session: AgentSession, pcm: np.ndarray
) -> tuple[Clock, WavAudioInput, RecordingAudioOutput, EventLog, TranscriptSynchronizer]:
    """Give a session a WAV microphone and a recording speaker on one clock.

    The speaker is wrapped in livekit's TranscriptSynchronizer so an interrupted reply is
    stored in the history truncated to what was played. Close the synchronizer after the
    session (`await sync.aclose()`), or its tasks outlive the conversation.
    """
    clock = Clock()
    events = EventLog(session, clock)
    mic = WavAudioInput(pcm, clock)
    speaker = RecordingAudioOutput(clock)
    sync, _ = connect_audio(session, mic, speaker)
    return clock, mic, speaker, events, sync


def _reply_done(session: AgentSession, output: RecordingAudioOutput, after_user: int) -> bool:
    items = session.history.items
    replied = any(i.type == "message" and i.role == "assistant" for i in items[after_user:])
    return replied and session.agent_state == "listening" and not output.playing


async def converse(
    models: ModelSet,
    config: Config,
    pcm: np.ndarray,
    *,
    timeout: float = 60.0,
    session: AgentSession | None = None,
) -> ConverseResult:
    """Run one conversation turn over 16 kHz int16 mono audio; returns its record."""
    session = session or build_session(config, models)
    clock, mic, speaker, events, sync = wire(session, pcm)

    await session.start(ApplianceAgent(config.agent), record=False)
    try:
        await asyncio.wait_for(greeting_played(session), timeout)
        users_before = len(session.history.items)
        mic.start()
        await asyncio.wait_for(mic.finished.wait(), timeout)
        if config.turn_detection == "manual":
            await session.commit_user_turn(transcript_timeout=10.0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not _reply_done(session, speaker, users_before) and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if loop.time() >= deadline:
            logger.warning("no complete reply within %.0f s", timeout)
    finally:
        end_session(session, "converse finished")
        await session.aclose()
        await sync.aclose()
    metrics = [
        {"role": i.role, **dict(i.metrics)}
        for i in session.history.items
        if i.type == "message" and getattr(i, "metrics", None)
    ]
    assert mic.start_at is not None
    return ConverseResult(
        items=history_items(session.history),
        reply_pcm=speaker.recording(until=clock.now()),
        reply_rate=speaker.rate or 16000,
        input_start=mic.start_at,
        input_seconds=len(pcm) / 16000,
        origin=clock.origin,
        events=events,
        segments=speaker.segments,
        metrics=metrics,
    )


async def greeting_played(session: AgentSession) -> None:
    """Wait until the agent's greeting (if any) has finished playing."""
    await asyncio.sleep(0.05)
    while (speech := session.current_speech) is not None:
        await speech.wait_for_playout()
        await asyncio.sleep(0.05)


def run_file(
    models: ModelSet,
    config: Config,
    in_path: str | Path,
    out_path: str | Path,
    transcript_path: str | Path | None,
) -> ConverseResult:
    """`appliance converse`: read, converse, write the reply WAV and the transcript."""
    import json

    pcm = read_audio(in_path)
    result = asyncio.run(converse(models, config, pcm))
    write_wav(out_path, result.reply_pcm, result.reply_rate)
    if transcript_path is not None:
        Path(transcript_path).write_text(json.dumps(result.items, indent=2) + "\n")
    return result


EX_DATAERR = 65  # sysexits.h: the input file is not usable


def converse_command(
    models: ModelSet,
    config: Config,
    in_path: str | Path,
    out_path: str | Path,
    transcript_path: str | Path | None,
) -> int:
    """`appliance converse`: run the file, print the transcript; the exit status."""
    from appliance.audio.files import AudioFileError

    try:
        result = run_file(models, config, in_path, out_path, transcript_path)
    except AudioFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_DATAERR
    for item in result.items:
        print(f"{item['role']:>9}: {item['text']}")
    print(f"reply audio: {out_path}", file=sys.stderr)
    if not any(i["role"] == "assistant" and i["text"] for i in result.items):
        print("error: the agent gave no reply", file=sys.stderr)
        return 1
    return 0
