"""The local STT and LLM plugins through livekit's interfaces (real models)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from livekit import rtc
from livekit.agents import llm, stt, vad

from appliance.plugins.llama.engine import requantized
from appliance.plugins.llama.llm import LlamaLLM
from appliance.plugins.llama.tools import arguments_as_objects, call_or_text, parse_calls
from appliance.plugins.priority import Priority
from appliance.plugins.shared_vad import SharedVAD
from appliance.plugins.whisper.stt import WhisperSTT
from appliance.store import manifest

from .conftest import model_file, transcribed_as

pytestmark = pytest.mark.slow


def frames(pcm: np.ndarray, rate: int = 16000) -> list[rtc.AudioFrame]:
    step = rate // 100
    return [
        rtc.AudioFrame(pcm[i : i + step].tobytes(), rate, 1, len(pcm[i : i + step]))
        for i in range(0, len(pcm) - step + 1, step)
    ]


def count_transcriptions(
    engine: WhisperSTT, monkeypatch: pytest.MonkeyPatch, calls: list[int]
) -> None:
    """Count the engine's Whisper calls: `calls` gets each call's number of samples."""
    counted = engine.transcribe_pcm

    async def transcribe_pcm(pcm: np.ndarray, *, interim: bool = False) -> stt.SpeechData:
        calls.append(len(pcm))
        return await counted(pcm, interim=interim)

    monkeypatch.setattr(engine, "transcribe_pcm", transcribe_pcm)


def test_stt_flush_gives_the_final_transcript_at_once(models: Any, speak: Any) -> None:
    """Push-to-talk: a flush transcribes what was said; an empty flush still answers."""
    speech = speak("Turn on the kitchen lights.")

    async def main() -> list[stt.SpeechEvent]:
        engine = models.stt()
        stream = engine.stream()
        for frame in frames(speech):
            stream.push_frame(frame)
        stream.flush()
        stream.flush()  # nothing new: an empty final releases commit_user_turn at once
        stream.end_input()
        events = [ev async for ev in stream]
        await engine.aclose()
        return events

    events = asyncio.run(main())
    finals = [e for e in events if e.type == stt.SpeechEventType.FINAL_TRANSCRIPT]
    assert len(finals) >= 2
    text = finals[0].alternatives[0].text
    assert transcribed_as("Turn on the kitchen lights.", text), text  # Piper varies
    assert finals[0].alternatives[0].language == "en"  # the turn model needs a language
    assert finals[1].alternatives[0].text == ""


def test_stt_stream_segments_with_vad_and_sends_interims(models: Any, speak: Any) -> None:
    speech = speak("I would like to book a table for two people tonight at the restaurant.")
    padded = np.concatenate([speech, np.zeros(16000, np.int16)])

    async def main() -> list[stt.SpeechEvent]:
        engine = WhisperSTT(
            models.whisper, models.stt_executor, vad=models.vad(), interim_interval=1.0
        )
        stream = engine.stream()
        events: list[stt.SpeechEvent] = []

        async def read() -> None:
            async for ev in stream:
                events.append(ev)

        reader = asyncio.create_task(read())
        for frame in frames(padded):
            stream.push_frame(frame)
            await asyncio.sleep(0.01)  # real time, as from a microphone
        stream.end_input()
        await reader
        await engine.aclose()
        return events

    events = asyncio.run(main())
    kinds = [e.type for e in events]
    assert stt.SpeechEventType.START_OF_SPEECH in kinds
    assert stt.SpeechEventType.END_OF_SPEECH in kinds
    assert stt.SpeechEventType.INTERIM_TRANSCRIPT in kinds
    final = next(e for e in events if e.type == stt.SpeechEventType.FINAL_TRANSCRIPT)
    assert kinds.index(stt.SpeechEventType.END_OF_SPEECH) < kinds.index(final.type)
    assert {"table", "tonight"} <= set(final.alternatives[0].text.lower().replace(".", "").split())


def _chat(engine: LlamaLLM, ctx: llm.ChatContext) -> tuple[str, Any]:
    async def main() -> tuple[str, Any]:
        text, usage = "", None
        async with engine.chat(chat_ctx=ctx) as stream:
            async for chunk in stream:
                if chunk.delta and chunk.delta.content:
                    text += chunk.delta.content
                if chunk.usage:
                    usage = chunk.usage
        return text, usage

    return asyncio.run(main())


def test_llm_streams_and_reuses_the_kv_cache_of_the_unchanged_prefix(models: Any) -> None:
    async def make() -> LlamaLLM:
        return models.llm()

    engine = asyncio.run(make())
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="system", content="You are a helpful assistant. " * 20)
    ctx.add_message(role="user", content="Name a colour.")
    first, usage1 = _chat(engine, ctx)
    assert first.strip() and usage1.completion_tokens > 0
    ctx.add_message(role="assistant", content=first)
    ctx.add_message(role="user", content="Name another one.")
    second, usage2 = _chat(engine, ctx)
    assert second.strip()
    # everything before the new user message was already in the KV cache
    assert usage2.prompt_cached_tokens >= usage1.prompt_tokens
    assert usage2.prompt_cached_tokens < usage2.prompt_tokens


def _file_type(path: Path) -> str:
    from llama_cpp import Llama

    model = Llama(model_path=str(path), vocab_only=True, verbose=False)
    return str(model.metadata["general.file_type"])


def test_the_llm_is_requantized_once_and_checked_at_each_load(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    source = model_file("llama.cpp/smollm2-135m-instruct", ".gguf")
    sha256 = manifest.load().models["llama.cpp/smollm2-135m-instruct"].file(".gguf").sha256
    assert _file_type(source) == "3"  # Q4_1, as shipped
    made = requantized(source, sha256, "q4_0", tmp_path / "cache")
    assert made.parent == tmp_path / "cache" and _file_type(made) == "2"  # Q4_0
    stamp = made.stat().st_mtime_ns
    assert requantized(source, sha256, "q4_0", tmp_path / "cache") == made
    assert made.stat().st_mtime_ns == stamp  # reused, not made again
    with made.open("r+b") as fh:  # damaged on disk
        fh.seek(made.stat().st_size // 2)
        fh.write(b"\0" * 4096)
    assert requantized(source, sha256, "q4_0", tmp_path / "cache") == made
    assert made.stat().st_mtime_ns != stamp and _file_type(made) == "2"
    assert any("damaged" in r.getMessage() for r in caplog.records)
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    assert requantized(source, sha256, "q4_0", blocked) == source  # unwritable: as shipped
    assert any("using SmolLM2" in r.getMessage() for r in caplog.records)


def test_llm_generation_stops_when_the_stream_is_closed(models: Any) -> None:
    async def main() -> tuple[int, int]:
        engine = LlamaLLM(models.llama, models.llm_executor, model_name="smollm2", max_tokens=500)
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="user", content="Write a very long story about a dragon.")
        stream = engine.chat(chat_ctx=ctx)
        received = 0
        async for _chunk in stream:
            received += 1
            if received == 3:
                break
        await stream.aclose()
        # wait for the worker to finish, then see how far llama.cpp got
        await asyncio.get_running_loop().run_in_executor(models.llm_executor, lambda: None)
        prompt = len(models.llama.prompt([{"role": "user", "content": "x"}], None)[0])
        return received, models.llama.llama.n_tokens - prompt

    received, evaluated = asyncio.run(main())
    assert received == 3
    assert evaluated < 100  # far short of the 500 it was allowed: cancelled promptly


def test_a_prefilled_prompt_is_in_the_kv_cache_when_its_request_comes(models: Any) -> None:
    """`prefill` evaluates a request's prompt ahead (push-to-talk, button still held): the
    request then finds every prompt token cached; without it, only the shared start. The
    reply's first words, sampled at prefill time, are the start of the request's reply."""
    replies: list[str] = []
    ahead: list[str] = []

    async def main() -> list[tuple[int, int, int]]:
        engine = LlamaLLM(models.llama, models.llm_executor, model_name="smollm2", max_tokens=12)
        other, question = llm.ChatContext.empty(), llm.ChatContext.empty()
        other.add_message(role="user", content="Name a colour.")
        question.add_message(role="user", content="What is the capital of France?")
        usage: list[Any] = []
        engine.on("metrics_collected", usage.append)

        async def ask(ctx: llm.ChatContext) -> None:
            text = ""
            async with engine.chat(chat_ctx=ctx) as stream:
                async for chunk in stream:
                    text += chunk.delta.content or "" if chunk.delta else ""
            replies.append(text)

        out = []
        for prefill in (False, True):
            await ask(other)  # the cache holds another conversation
            evaluated = await engine.prefill(question) if prefill else 0
            if prefill:
                assert models.llama.ahead is not None
                ahead.append(models.llama.ahead.text)
            await ask(question)
            out.append((evaluated, usage[-1].prompt_tokens, usage[-1].prompt_cached_tokens))
        return out

    (_, prompt, cold), (evaluated, prompt_again, warm) = asyncio.run(main())
    assert prompt_again == prompt
    assert cold < prompt - 5  # without: the question's tokens are evaluated on request
    assert evaluated == prompt - cold and warm == prompt  # with: all there already
    assert ahead[0].strip() and replies[-1].startswith(ahead[0]), (ahead, replies)
    assert models.llama.ahead is None  # taken by the request


def test_the_next_questions_prompt_start_is_prefilled_but_not_over_another_prompt(
    models: Any,
) -> None:
    """`prefill(upto_user=True)` after a reply: the conversation and the template's start
    of the next user turn are cached, so the next question evaluates only itself; where
    the cache holds another prompt (a request came in between), it leaves it alone."""
    llama = models.llama.llama

    async def main() -> list[Any]:
        engine = LlamaLLM(models.llama, models.llm_executor, model_name="smollm2", max_tokens=8)
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="system", content="You are a helpful voice assistant.")
        ctx.add_message(role="user", content="What is the capital of France?")
        ctx.add_message(role="assistant", content="The capital of France is Paris.")
        usage: list[Any] = []
        engine.on("metrics_collected", usage.append)
        llama.reset()
        evaluated = await engine.prefill(ctx, upto_user=True)
        tail = llama.detokenize(llama._input_ids[-12:].tolist(), special=True).decode()
        ctx.add_message(role="user", content="And of Spain?")
        async with engine.chat(chat_ctx=ctx) as stream:
            async for _chunk in stream:
                pass
        other = llm.ChatContext.empty()  # another call's conversation in the cache
        other.add_message(role="user", content="Name three colours of the rainbow, please.")
        await engine.prefill(other, speculate=False)
        before = llama._input_ids.tolist()
        skipped = await engine.prefill(ctx, upto_user=True, keep_others=True)
        return [evaluated, tail, usage[-1], skipped, before == llama._input_ids.tolist()]

    evaluated, tail, usage, skipped, untouched = asyncio.run(main())
    assert evaluated > 20 and tail.endswith("Paris.<|im_end|>\n<|im_start|>user\n"), tail
    question = len(llama.tokenize(b"And of Spain?", add_bos=False))
    # only the question and the template's end of its turn were left to evaluate
    assert 0 < usage.prompt_tokens - usage.prompt_cached_tokens <= question + 6, usage
    assert skipped == 0 and untouched


def test_llm_forced_tool_choice_gives_a_valid_call(models: Any) -> None:
    from appliance.session.builder import build_tools

    async def main() -> list[llm.FunctionToolCall]:
        engine = models.llm({"type": "function", "function": {"name": "current_time"}})
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="user", content="What time is it?")
        calls: list[llm.FunctionToolCall] = []
        async with engine.chat(chat_ctx=ctx, tools=build_tools(["current_time"])) as stream:
            async for chunk in stream:
                if chunk.delta:
                    calls += chunk.delta.tool_calls
        return calls

    calls = asyncio.run(main())
    assert len(calls) == 1 and calls[0].name == "current_time"
    assert calls[0].arguments.strip().startswith("{")


@pytest.mark.parametrize(
    ("head", "decision"),
    [
        ("", "undecided"),
        ("<tool", "undecided"),
        ('<tool_call>{"name": "x"', "call"),  # Hermes / Qwen2.5
        ('{"na', "undecided"),
        ('{"name": "current_time", "parameters": {}}', "call"),  # Llama 3.x
        ("Paris is", "text"),
        ("{curly} text", "text"),
    ],
)
def test_the_reply_start_decides_between_a_tool_call_and_speech(head: str, decision: str) -> None:
    assert call_or_text(head) == decision


def test_tool_calls_parse_in_the_hermes_and_the_llama_formats() -> None:
    hermes = parse_calls('<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>', None)
    llama = parse_calls('{"name": "f", "parameters": {"a": 1}}', None)
    for [call] in (hermes, llama):
        assert call.name == "f" and json.loads(call.arguments) == {"a": 1}


def test_templates_with_tools_get_arguments_as_objects() -> None:
    """Qwen2.5 and Llama 3.x templates render `arguments | tojson`: a string would be quoted."""
    msg = {
        "role": "assistant",
        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": '{"a": 1}'}}],
    }
    out = arguments_as_objects(msg)
    assert out["tool_calls"][0]["function"]["arguments"] == {"a": 1}
    assert msg["tool_calls"][0]["function"]["arguments"] == '{"a": 1}'  # input untouched


@pytest.mark.parametrize("vad_kind", ["own", "shared"])
def test_a_pause_gives_a_preflight_transcript_that_the_final_reuses(
    models: Any, speak: Any, monkeypatch: pytest.MonkeyPatch, vad_kind: str
) -> None:
    """The words are transcribed at the first pause, before the VAD ends the segment; the
    final transcript is those words, and Whisper ran once for both.

    "shared": the STT runs no VAD stream of its own but hears the events of the stream
    its session runs (here the test runs it, as livekit would), and that stream's reader
    gets every event as well."""
    speech = speak("What is the capital of France?")
    padded = np.concatenate([speech, np.zeros(16000, np.int16)])
    calls: list[int] = []
    session_heard: list[vad.VADEventType] = []

    async def main() -> list[tuple[float, stt.SpeechEvent]]:
        shared = SharedVAD(models.vad()) if vad_kind == "shared" else None
        engine = WhisperSTT(
            models.whisper, models.stt_executor, vad=shared or models.vad(), preflight_after=0.05
        )
        session_vad = shared.stream() if shared is not None else None

        async def session_reads() -> None:
            assert session_vad is not None
            async for ev in session_vad:
                session_heard.append(ev.type)

        session_reader = asyncio.create_task(session_reads())
        count_transcriptions(engine, monkeypatch, calls)
        stream = engine.stream()
        events: list[tuple[float, stt.SpeechEvent]] = []
        loop = asyncio.get_running_loop()

        async def read() -> None:
            async for ev in stream:
                events.append((loop.time(), ev))

        reader = asyncio.create_task(read())
        for frame in frames(padded):
            stream.push_frame(frame)
            if session_vad is not None:
                session_vad.push_frame(frame)
            await asyncio.sleep(0.01)
        stream.end_input()
        await reader
        await engine.aclose()
        if session_vad is not None:
            await session_vad.aclose()
        session_reader.cancel()
        return events

    events = asyncio.run(main())
    if vad_kind == "shared":
        assert vad.VADEventType.START_OF_SPEECH in session_heard
        assert vad.VADEventType.END_OF_SPEECH in session_heard
    kinds = [e.type for _, e in events]
    preflight = kinds.index(stt.SpeechEventType.PREFLIGHT_TRANSCRIPT)
    final = kinds.index(stt.SpeechEventType.FINAL_TRANSCRIPT)
    assert preflight < kinds.index(stt.SpeechEventType.END_OF_SPEECH) < final
    words = events[preflight][1].alternatives[0].text
    assert transcribed_as("What is the capital of France?", words), words
    assert events[final][1].alternatives[0].text == words
    assert len(calls) == 1  # the final reused the preflight's words


@pytest.mark.parametrize(("goes_on", "interims"), [(False, 0.0), (True, 0.0), (False, 0.5)])
def test_push_to_talk_transcribes_at_the_pause_and_the_release_finds_it_done(
    models: Any, speak: Any, monkeypatch: pytest.MonkeyPatch, goes_on: bool, interims: float
) -> None:
    """Manual turns (`segment=False`): the session's VAD does not cut the utterance, it
    only times a preflight at the first pause while the button is held; the flush at the
    release gives those words as the final without a second Whisper call. A user who goes
    on after the pause gets a final with all the words. Interim transcripts come while
    the user talks, none in the pause."""
    first, second = "What is the capital of France?", "And what about Spain?"
    pause = np.zeros(24000 if interims else 9600, np.int16)  # 1.5 s, 0.6 s
    parts = [speak(first), pause] + ([speak(second), np.zeros(1600, np.int16)] if goes_on else [])
    calls: list[int] = []

    async def main() -> tuple[list[stt.SpeechEvent], int]:
        shared = SharedVAD(models.vad())
        engine = WhisperSTT(
            models.whisper,
            models.stt_executor,
            vad=shared,
            preflight_after=0.05,
            segment=False,
            interim_interval=interims,
        )
        session_vad = shared.stream()

        async def session_reads() -> None:
            async for _ev in session_vad:
                pass

        session_reader = asyncio.create_task(session_reads())
        count_transcriptions(engine, monkeypatch, calls)
        stream = engine.stream()
        events: list[stt.SpeechEvent] = []
        final = asyncio.Event()

        async def read() -> None:
            async for ev in stream:
                events.append(ev)
                if ev.type == stt.SpeechEventType.FINAL_TRANSCRIPT:
                    final.set()

        reader = asyncio.create_task(read())
        for frame in frames(np.concatenate(parts)):
            stream.push_frame(frame)
            session_vad.push_frame(frame)
            await asyncio.sleep(0.01)
        before_release = len(events)
        stream.flush()  # the button is released
        await asyncio.wait_for(final.wait(), 10)
        stream.end_input()
        await reader
        await engine.aclose()
        await session_vad.aclose()
        session_reader.cancel()
        return events, before_release

    events, before_release = asyncio.run(main())
    kinds = [e.type for e in events]
    assert stt.SpeechEventType.END_OF_SPEECH not in kinds  # the VAD did not cut the turn
    final = events[kinds.index(stt.SpeechEventType.FINAL_TRANSCRIPT)].alternatives[0].text
    preflights = [
        e.alternatives[0].text
        for e in events[:before_release]
        if e.type == stt.SpeechEventType.PREFLIGHT_TRANSCRIPT
    ]
    assert preflights and transcribed_as(first, preflights[0]), preflights  # while held
    if interims:
        interim_calls = calls[:-1]  # then the preflight, which the final reuses
        spoken = len(parts[0]) + 0.3 * 16000  # the VAD hears the pause a little late
        assert stt.SpeechEventType.INTERIM_TRANSCRIPT in kinds[:before_release]
        assert interim_calls and all(n <= spoken for n in interim_calls), (calls, spoken)
        assert final == preflights[0]
    elif goes_on:
        assert transcribed_as(f"{first} {second}", final), final
        assert len(calls) == 2  # the first pause's words, then all of them once
    else:
        assert final == preflights[0]
        assert len(calls) == 1  # the release found the words transcribed


@pytest.mark.parametrize("window", ["fit", "full"])
@pytest.mark.parametrize("beam_size", [1, 5])
def test_whisper_in_a_fitted_window_and_in_the_full_one(
    models: Any, speak: Any, window: str, beam_size: int
) -> None:
    from appliance.plugins.whisper.engine import transcribe

    speech = speak("How many legs does a spider have?").astype(np.float32) / 32768
    text, confidence = transcribe(models.whisper, speech, "en", window=window, beam_size=beam_size)
    assert transcribed_as("How many legs does a spider have?", text), text  # Piper varies
    assert 0.3 < confidence <= 1.0
    silence = np.zeros(32000, np.float32)
    assert transcribe(models.whisper, silence, "en", window=window, beam_size=beam_size)[0] == ""


@pytest.mark.parametrize("answer", ["Yes.", "No.", "Thank you.", "Goodbye."])
def test_a_short_answer_is_heard_once_in_the_fitted_window(
    models: Any, speak: Any, answer: str
) -> None:
    """tiny.en in a fitted window heard these (with the half second of silence the VAD
    leaves after them) as "Yes? Yes? Yes? ...": such a loop is transcribed again in the
    full window."""
    from appliance.plugins.whisper.engine import _loops, transcribe

    speech = np.concatenate([speak(answer), np.zeros(8000, np.int16)]).astype(np.float32)
    text, _confidence = transcribe(models.whisper, speech / 32768, "en")
    assert transcribed_as(answer, text) and not _loops(text), text


def test_an_interim_that_loops_gives_no_words(models: Any, speak: Any) -> None:
    """Interims are not redone in the full window (that would delay the final): a looping
    one is dropped. This "No." loops in the fitted window (the test above fails without
    the redo)."""
    from appliance.plugins.whisper.engine import transcribe

    speech = np.concatenate([speak("No."), np.zeros(8000, np.int16)]).astype(np.float32)
    assert transcribe(models.whisper, speech / 32768, "en", redo_loops=False) == ("", 0.0)


def test_a_replys_first_words_are_generated_on_more_threads(
    models: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`[models] llm_first_threads = 2` with `llm_threads = 1`: the tokens of a reply's
    first three words, Piper's first chunk, which the listener waits for, are evaluated on
    two threads; the tokens after them, and every prompt, on one. (The x86-dev profile runs
    its LLM on two threads throughout; a small model shows the switch.)"""
    import llama_cpp

    from appliance.plugins.llama.engine import LocalLlama

    gguf = model_file("llama.cpp/smollm2-135m-instruct", ".gguf")
    local = LocalLlama(str(gguf), n_ctx=512, threads=1, first_threads=2)
    llama = local.llama
    evals: list[tuple[list[int], int, int]] = []
    evaluate = llama.eval

    def recording(tokens: list[int]) -> None:
        threads = llama_cpp.llama_n_threads(llama.ctx), llama_cpp.llama_n_threads_batch(llama.ctx)
        evals.append((list(tokens), *threads))
        evaluate(tokens)

    monkeypatch.setattr(llama, "eval", recording)
    engine = LlamaLLM(local, models.llm_executor, model_name="smollm2", max_tokens=16)
    ctx = llm.ChatContext.empty()
    ctx.add_message(role="user", content="Count from one to ten in words, please.")
    text, _usage = _chat(engine, ctx)
    prompt, *generated = evals
    assert len(prompt[0]) > 1 and all(len(tokens) == 1 for tokens, _, _ in generated)
    assert all(batch == 1 for _, _, batch in evals)
    assert len(text.split()) > 4 and len(generated) >= 8
    # the k-th token is evaluated (for the next one's logits) once the reply's text is
    # its first k tokens: two threads while those are three words or fewer
    ids = [tokens[0] for tokens, _, _ in generated]
    expected = [
        2 if len(llama.detokenize(ids[: k + 1]).decode().split()) <= 3 else 1
        for k in range(len(ids))
    ]
    assert [threads for _, threads, _ in generated] == expected
    assert 2 in expected and 1 in expected
    assert llama_cpp.llama_n_threads(llama.ctx) == 1  # and one thread again after the reply


def test_the_llm_waits_between_tokens_while_a_first_audio_renders(models: Any) -> None:
    """While a job runs `urgent()` (Piper on a reply's first chunk) the LLM gives no
    further token; when it ends, the reply goes on."""
    priority = Priority()

    async def main() -> tuple[list[float], float]:
        engine = LlamaLLM(
            models.llama,
            models.llm_executor,
            model_name="smollm2",
            max_tokens=20,
            priority=priority,
        )
        ctx = llm.ChatContext.empty()
        ctx.add_message(role="user", content="Count from one to twenty.")
        loop = asyncio.get_running_loop()
        arrivals: list[float] = []
        released = 0.0
        urgent = priority.urgent()
        urgent.__enter__()

        async def release_soon() -> None:
            nonlocal released
            await asyncio.sleep(0.1)  # well under the LLM's longest wait (MAX_WAIT_S)
            released = loop.time()
            urgent.__exit__(None, None, None)

        tasks = []
        async with engine.chat(chat_ctx=ctx) as stream:
            async for chunk in stream:
                if chunk.delta and chunk.delta.content:
                    arrivals.append(loop.time())
                    if len(arrivals) == 1:
                        tasks.append(asyncio.create_task(release_soon()))
        await asyncio.gather(*tasks)
        return arrivals, released

    arrivals, released = asyncio.run(main())
    assert len(arrivals) > 2 and released > 0
    assert all(t >= released for t in arrivals[1:])  # none while the urgent job ran
