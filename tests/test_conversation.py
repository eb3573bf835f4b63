"""End to end on the real embedded models: every AgentSession reference feature.

Speech is synthesised with the Piper voice (see conftest.py) and fed in real time through
the WAV microphone; the agent's audio is recorded by the virtual sound card and, where the
test says so, transcribed back with Whisper.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
import pytest
from livekit.agents import AgentSession

from appliance import config as config_mod
from appliance.audio.files import RecordingAudioOutput, WavAudioInput
from appliance.audio.pcm import resample
from appliance.converse import converse, history_items, wire
from appliance.plugins.whisper.engine import transcribe
from appliance.session.builder import ApplianceAgent, build_session

from .conftest import transcribed_as, wait_until

pytestmark = pytest.mark.slow

QUESTION = "What is the capital of France?"
LONG_TEXT = (
    "Here is a long announcement. The museum opens at nine in the morning and closes at "
    "six in the evening. Tickets are sold at the main entrance, and guided tours start "
    "every hour from the information desk. Please keep your bags in the lockers."
)


def cfg(**session: Any) -> config_mod.Config:
    agent = session.pop("agent", {})
    return config_mod.parse({"session": session, "agent": agent}, "<test>")


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def transcribe_back(models: Any, pcm: np.ndarray, rate: int) -> str:
    audio = resample(pcm, rate, 16000).astype(np.float32) / 32768.0
    return transcribe(models.whisper, audio, "en", window="full")[0]  # the best ear


async def wait_for(predicate: Any, timeout: float = 30.0) -> None:
    assert await wait_until(predicate, timeout), "condition not reached in time"


@asynccontextmanager
async def running(
    models: Any, config: config_mod.Config, pcm: np.ndarray | None = None
) -> AsyncIterator[tuple[AgentSession, WavAudioInput, RecordingAudioOutput, Any]]:
    session = build_session(config, models)
    _clock, mic, speaker, events, sync = wire(
        session, pcm if pcm is not None else np.zeros(1, np.int16)
    )
    await session.start(ApplianceAgent(config.agent), record=False)
    try:
        yield session, mic, speaker, events
    finally:
        await session.aclose()
        await sync.aclose()


def test_spoken_question_gets_a_spoken_reply(models: Any, speak: Any) -> None:
    result = asyncio.run(converse(models, cfg(), speak(QUESTION)))
    user = [i["text"] for i in result.items if i["role"] == "user"]
    assistant = [i["text"] for i in result.items if i["role"] == "assistant"]
    assert user and transcribed_as(QUESTION, user[0]), result.items
    assert assistant and assistant[0].strip(), result.items

    heard = transcribe_back(models, result.reply_pcm, result.reply_rate)
    assert len(words(heard)) >= 2, heard  # the reply audio is real English speech
    assert heard.isascii()

    ev = result.events
    agent_states = [e.new_state for e in ev.of("agent_state_changed")]
    assert {"listening", "thinking", "speaking"} <= set(agent_states), agent_states
    user_states = [e.new_state for e in ev.of("user_state_changed")]
    assert "speaking" in user_states and "listening" in user_states, user_states
    finals = [e.transcript for e in ev.of("user_input_transcribed") if e.is_final]
    assert any(transcribed_as(QUESTION, t) for t in finals), finals
    roles = [getattr(e.item, "role", None) for e in ev.of("conversation_item_added")]
    assert "user" in roles and "assistant" in roles
    assert ev.of("session_usage_updated"), "no usage/metrics event"


def test_a_one_word_answer_is_one_word_in_the_history(models: Any, speak: Any) -> None:
    """Whisper's fitted window heard a spoken "No." as "No... No... No... ..."."""
    result = asyncio.run(converse(models, cfg(), speak("No.")))
    user = [i["text"] for i in result.items if i["role"] == "user"]
    assert len(user) == 1 and transcribed_as("No.", user[0]), result.items


@pytest.mark.parametrize(
    ("mode", "turn_model"),
    [
        ("model", "livekit/turn-detector-v1-mini"),
        ("model", "smart-turn/v3.2"),
        ("vad", None),
        ("stt", None),
        ("manual", None),
    ],
)
def test_turn_completes_in_each_mode(
    models: Any, speak: Any, mode: str, turn_model: str | None
) -> None:
    config = cfg(turn_detection=mode)
    if turn_model:
        config.models.turn_model = turn_model  # type: ignore[assignment]
    result = asyncio.run(converse(models, config, speak(QUESTION)))
    roles = [i["role"] for i in result.items if i["text"]]
    assert "user" in roles and "assistant" in roles, (mode, result.items)
    user = next(i["text"] for i in result.items if i["role"] == "user")
    assert transcribed_as(QUESTION, user), user


def test_barge_in_stops_playback_and_history_keeps_what_was_played(models: Any, speak: Any) -> None:
    question = speak("Sorry, can you stop for a moment please?")

    async def main() -> None:
        async with running(models, cfg(), question) as (session, mic, speaker, _ev):
            handle = session.say(LONG_TEXT, allow_interruptions=True)
            await wait_for(lambda: session.agent_state == "speaking")
            await asyncio.sleep(1.5)
            mic.start()  # the user talks over the agent
            await asyncio.wait_for(handle.wait_for_playout(), 20)
            assert handle.interrupted
            segment = speaker.segments[0]
            assert segment["interrupted"] is True
            full_seconds = models.voice.synthesize(LONG_TEXT).size / models.voice.sample_rate
            assert segment["played"] < full_seconds - 2.0
            said = next(i for i in history_items(session.history) if i["role"] == "assistant")
            assert said["interrupted"] is True
            assert 0 < len(said["text"]) < len(LONG_TEXT) * 0.8, said
            assert LONG_TEXT.startswith(said["text"].strip()[:20])

    asyncio.run(main())


@pytest.mark.parametrize("greeting", ["", "Hello."], ids=["no greeting", "after the greeting"])
def test_the_first_question_finds_the_instructions_in_the_llm_cache(
    models: Any, greeting: str
) -> None:
    base = cfg()
    config = base.model_copy(update={"agent": base.agent.model_copy(update={"greeting": greeting})})

    async def main() -> tuple[int, int]:
        models.llama.llama.reset()  # nothing in the KV cache
        async with running(models, config) as (session, _mic, _speaker, _ev):
            await asyncio.wait_for(session.current_agent._prefill_task, 30)
            usage: list[Any] = []
            session.on("metrics_collected", lambda e: usage.append(e.metrics))
            handle = session.generate_reply(user_input="What is two plus three?")
            await asyncio.wait_for(handle.wait_for_playout(), 60)
            first = next(m for m in usage if getattr(m, "prompt_tokens", 0))
            return first.prompt_tokens, first.prompt_cached_tokens

    prompt, cached = asyncio.run(main())
    # all but the question (and the greeting) was evaluated before it came; without: 0
    print(f"\nprompt {prompt} tokens, {cached} cached")
    assert cached >= prompt - 25, (prompt, cached)


def test_after_a_reply_the_next_question_finds_the_conversation_in_the_llm_cache(
    models: Any,
) -> None:
    async def main() -> list[tuple[int, int]]:
        async with running(models, cfg()) as (session, _mic, _speaker, _ev):
            await asyncio.wait_for(session.current_agent._prefill_task, 30)
            usage: list[Any] = []
            session.on("metrics_collected", lambda e: usage.append(e.metrics))
            for question in ("What is two plus three?", "And four plus five?"):
                handle = session.generate_reply(user_input=question)
                await asyncio.wait_for(handle.wait_for_playout(), 60)
                await asyncio.sleep(0.5)  # the prefill after the reply
            firsts = [m for m in usage if getattr(m, "prompt_tokens", 0)]
            return [(m.prompt_tokens, m.prompt_cached_tokens) for m in firsts]

    (_, _), (prompt, cached) = asyncio.run(main())[:2]
    question = len(models.llama.llama.tokenize(b"And four plus five?", add_bos=False))
    # the question and the template's end of its turn; without the prefill 5 more (the end
    # of the reply's turn and the start of the question's)
    assert prompt - cached <= question + 6, (prompt, cached, question)


def test_the_greeting_is_rendered_once_and_played_from_memory(
    models: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    greeting = "Hello, you are through to the front desk."
    config = cfg(agent={"greeting": greeting})
    phonemized: list[str] = []  # every synthesis, streamed or whole, phonemizes its text
    phonemize = models.voice.phonemize
    monkeypatch.setattr(
        models.voice, "phonemize", lambda text: phonemized.append(text) or phonemize(text)
    )

    async def call() -> tuple[list[str], str]:
        async with running(models, config) as (session, _mic, speaker, _ev):
            await asyncio.wait_for(session.current_agent._prefill_task, 30)  # after playout
            said = [i["text"] for i in history_items(session.history) if i["role"] == "assistant"]
            assert speaker.rate is not None
            return said, transcribe_back(models, speaker.recording(), speaker.rate)

    for n in range(3):  # three calls: the first renders it, the others play it
        said, heard = asyncio.run(call())
        assert said == [greeting] and transcribed_as(greeting, heard), (said, heard)
        assert phonemized == [greeting], (n, phonemized)


def test_tool_call_runs(models: Any, speak: Any) -> None:
    config = cfg(agent={"tools": ["current_time"], "tool_choice": "current_time"})

    async def main() -> None:
        async with running(models, config) as (session, _mic, _speaker, _ev):
            handle = session.generate_reply(user_input="What time is it?")
            await asyncio.wait_for(handle.wait_for_playout(), 60)
            await wait_for(lambda: session.agent_state == "listening")
            items = history_items(session.history)
            calls = [i for i in items if i["role"] == "tool_call"]
            outputs = [i for i in items if i["role"] == "tool"]
            assert calls and calls[0]["name"] == "current_time", items
            assert outputs and outputs[0]["text"].startswith("It is "), items
            assert any(i["role"] == "assistant" and i["text"] for i in items), items

    asyncio.run(main())


def test_reference_methods_and_state(models: Any, caplog: Any) -> None:
    config = cfg(userdata={"site": "lobby"})

    class Other(ApplianceAgent):
        pass

    async def main() -> None:
        async with running(models, config) as (session, _mic, speaker, ev):
            assert session.userdata == {"site": "lobby"}
            assert session.agent_state == "listening"
            assert session.user_state == "listening"

            handle = session.say("Hello! How can I help you today?")
            await asyncio.wait_for(handle.wait_for_playout(), 30)
            assert not handle.interrupted and speaker.segments[-1]["interrupted"] is False

            handle = session.generate_reply(instructions="Greet the user warmly.")
            await asyncio.wait_for(handle.wait_for_playout(), 60)
            handle = session.generate_reply(user_input="Hello!")
            await asyncio.wait_for(handle.wait_for_playout(), 60)
            items = history_items(session.history)
            assert [i["role"] for i in items if i["role"] == "user"] == ["user"]
            assert next(i for i in items if i["role"] == "user")["text"] == "Hello!"
            assert sum(1 for i in items if i["role"] == "assistant" and i["text"]) == 3

            handle = session.say(LONG_TEXT)
            await wait_for(lambda: session.agent_state == "speaking")
            await asyncio.sleep(0.5)
            await session.interrupt()
            await asyncio.wait_for(handle.wait_for_playout(), 10)
            assert handle.interrupted and speaker.segments[-1]["interrupted"] is True

            other = Other(config.agent, instructions="You are the second agent.")
            session.update_agent(other)
            await wait_for(lambda: session.current_agent is other)

            states = {e.new_state for e in ev.of("agent_state_changed")}
            assert {"thinking", "speaking", "listening"} <= states
            with caplog.at_level(logging.INFO, logger="appliance.session"):
                from appliance.session.builder import end_session

                end_session(session, "test finished")
                await wait_for(lambda: bool(ev.of("close")), 20)
            assert "ending session: test finished" in caplog.text

    asyncio.run(main())


def test_manual_commit_and_clear_user_turn(models: Any, speak: Any) -> None:
    config = cfg(turn_detection="manual")
    first = speak("Please forget what I am saying now.")

    async def main() -> None:
        async with running(models, config, first) as (session, mic, _speaker, _ev):
            mic.start()
            await asyncio.wait_for(mic.finished.wait(), 20)
            session.clear_user_turn()  # the push-to-talk cancel gesture
            await asyncio.sleep(0.5)
            assert not [i for i in history_items(session.history) if i["role"] == "user"]

            # now a real question, committed by hand (the button's release)
            mic._pcm = speak(QUESTION)  # the same microphone, next utterance
            mic.finished.clear()
            mic.start()
            await asyncio.wait_for(mic.finished.wait(), 20)
            transcript = await session.commit_user_turn(transcript_timeout=10.0)
            assert transcribed_as(QUESTION, transcript), transcript
            await wait_for(
                lambda: any(
                    i["role"] == "assistant" and i["text"] for i in history_items(session.history)
                ),
                60,
            )
            users = [i["text"] for i in history_items(session.history) if i["role"] == "user"]
            assert len(users) == 1 and "forget" not in users[0].lower(), users

    asyncio.run(main())
