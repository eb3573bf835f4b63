"""Conversation quality on the real models: right answers, a pause mid-sentence kept in
one turn, a follow-up answered from the conversation, and the words' end-of-turn signal.

Speech is the Piper voice with its variation off (conftest.py); replies are sampled at
temperature 0, so each test sees the same answer every run.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
from livekit.agents import llm

from appliance import config as config_mod
from appliance.audio.files import write_wav
from appliance.converse import converse
from appliance.plugins.turn_text import TurnText, decide, ends_with_filler, settle
from appliance.session.builder import build_session
from bench.evaluation import Item, Turn, graded, load_corpus, run_item

from .conftest import transcribed_as

ROOT = Path(__file__).resolve().parent.parent


def greedy(**session: Any) -> config_mod.Config:
    return config_mod.parse({"session": session, "models": {"llm_temperature": 0.0}}, "<test>")


def spoken_item(tmp_path: Path, speak: Any, turns: list[tuple[list[Any], list[str]]]) -> Item:
    """An evaluation item from Piper speech: each turn's pieces are text or a pause (s)."""
    item = Item("t", "eval", "piper", "dialogue")
    for n, (pieces, keys) in enumerate(turns):
        audio = np.concatenate(
            [
                speak(p, lead=0.0) if isinstance(p, str) else np.zeros(int(p * 16000), np.int16)
                for p in pieces
            ]
        )
        end = len(audio) / 16000
        pcm = np.concatenate([np.zeros(4800, np.int16), audio, np.zeros(16000, np.int16)])
        path = tmp_path / f"turn{n}.wav"
        write_wav(path, pcm, 16000)
        text = " ".join(p for p in pieces if isinstance(p, str))
        item.turns.append(Turn(path, text, keys or None, [], 0.3 + end))
    return item


def run(models: Any, config: config_mod.Config, item: Item) -> list[dict[str, Any]]:
    async def go() -> list[dict[str, Any]]:
        return await run_item("appliance", models, config, item, build_session(config, models))

    return asyncio.run(go())


def test_the_demo_question_is_answered_with_paris(models: Any, speak: Any) -> None:
    result = asyncio.run(converse(models, greedy(), speak("What is the capital of France?")))
    reply = " ".join(i["text"] for i in result.items if i["role"] == "assistant")
    assert "paris" in reply.lower(), result.items


def test_an_unfinished_sentence_with_a_pause_is_one_turn(
    models: Any, speak: Any, tmp_path: Path
) -> None:
    item = spoken_item(
        tmp_path,
        speak,
        [(["I would like to know,", 0.7, "what the capital of Spain is."], [])],
    )
    (turn,) = run(models, greedy(), item)  # the default: smart-turn and the words
    assert not turn["premature"], turn  # no agent audio before the user's last word
    assert turn["user_turns"] == 1, turn
    assert transcribed_as(item.turns[0].text, turn["heard"]), turn
    assert turn["reply"].strip(), turn  # (how soon depends on the LLM: `make eval`)


def test_a_follow_up_is_answered_from_the_conversation(
    models: Any, speak: Any, tmp_path: Path
) -> None:
    item = spoken_item(
        tmp_path,
        speak,
        [
            (["What is the capital of Japan?"], [r"tokyo"]),
            (["What country is it in?"], [r"japan"]),
        ],
    )
    first, second = run(models, greedy(), item)
    assert first["right"] and second["right"], (first, second)
    assert not first["premature"] and not second["premature"]


def test_the_llm_reads_finished_and_unfinished_words(models: Any) -> None:
    engine_config = greedy()
    # as TurnText asks: without the punctuation after the last word
    finished = (
        "What is the capital of Japan",
        "How many legs does a spider have",
        "I'd like to book a table for two",
        "No, thank you",
    )
    unfinished = ("I would like to know", "Can you tell me", "So I was wondering if")

    async def probabilities() -> dict[str, float | None]:
        engine = models.llm()
        ctx = llm.ChatContext()
        ctx.add_message(role="system", content=engine_config.agent.instructions)
        return {t: await engine.end_of_turn_probability(ctx, (), t) for t in finished + unfinished}

    p = asyncio.run(probabilities())
    below = engine_config.session.text_unfinished_below
    assert all(p[t] is not None and p[t] > below for t in finished), p  # type: ignore[operator]
    assert all(p[t] is not None and p[t] < below for t in unfinished), p  # type: ignore[operator]


def test_the_words_and_the_audio_decide_together() -> None:
    assert decide(0.2, 0.95, 0.001, 0.5) == 0.95  # a finished question in an unseen voice
    assert decide(0.7, 0.3, 0.001, 0.5) == 0.7  # the audio says done, the words agree enough
    assert decide(0.7, None, 0.001, 0.5) == 0.7  # no transcript in time: the audio decides
    assert decide(0.2, 1e-6, 0.001, 0.5) == 1e-6  # both say not done: hold
    # "I would like to know" sounds finished; unsure words; no words yet: wait, then settle
    assert decide(0.9, 1e-6, 0.001, 0.5) is None
    assert decide(0.2, 0.3, 0.001, 0.5) is None
    assert decide(0.2, None, 0.001, 0.5) is None
    assert settle(0.9, 1e-6, 0.001) >= 0.5  # still disagreeing after the wait: done
    assert settle(0.2, 0.3, 0.001) >= 0.5
    assert settle(0.2, 1e-6, 0.001) < 0.5  # the words, heard by then, are unfinished too


def test_turn_text_judges_the_whole_turn_and_starts_afresh() -> None:
    async def go() -> list[str]:
        judged: list[str] = []

        def judge(text: str) -> asyncio.Future[float | None]:
            judged.append(text)
            done: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
            done.set_result(0.9 if text.endswith("time is") else 0.0)
            return done

        turn = TurnText(judge)
        turn.transcribing()
        waiting = asyncio.ensure_future(turn.probability(1.0))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # a transcript is on its way: wait for it
        turn.heard("I would like to know,", final=True)
        assert await waiting == 0.0
        turn.transcribing()
        turn.heard("what the time is?", final=False)
        assert await turn.probability(1.0) == 0.9
        turn.committed()
        assert await turn.probability(1.0) is None
        turn.transcribing()
        turn.heard(None, final=False)  # a dropped transcript releases the wait
        assert await turn.probability(1.0) is None
        return judged

    # judged without the punctuation the STT put after the last word
    assert asyncio.run(go()) == ["I would like to know", "I would like to know, what the time is"]


def test_words_that_end_with_a_hesitation_are_unfinished_without_asking_the_llm() -> None:
    async def go() -> tuple[float | None, list[str]]:
        judged: list[str] = []

        def judge(text: str) -> asyncio.Future[float | None]:
            judged.append(text)
            done: asyncio.Future[float | None] = asyncio.get_running_loop().create_future()
            done.set_result(0.97)
            return done

        turn = TurnText(judge)
        turn.heard("What colour is um?", final=True)
        return await turn.probability(1.0), judged

    assert asyncio.run(go()) == (0.0, [])
    assert not ends_with_filler("Drums.") and ends_with_filler("Which, uh,")


def test_graded_answers_need_a_key_and_no_rejected_word() -> None:
    turn = Turn(
        Path("x.wav"),
        "How many legs does a spider have?",
        [r"\beight\b", r"\b8\b"],
        [r"\bsix\b"],
        1.0,
    )
    assert graded("A spider has eight legs.", turn)
    assert not graded("Six or eight.", turn)
    assert not graded("Many legs.", turn)
    assert graded("Hello.", Turn(Path("x.wav"), "Hi.", None, [], 1.0)) is None


def test_the_corpus_is_whole_and_split_into_tuning_and_evaluation() -> None:
    corpus = ROOT / "bench" / "eval" / "corpus.json"
    items = load_corpus(corpus, "all")
    assert len(load_corpus(corpus, "eval")) >= 80
    assert load_corpus(corpus, "tune")
    assert len({i.voice for i in items}) >= 4 and not any("joe" in i.voice for i in items)
    for item in items:
        for turn in item.turns:
            assert turn.audio.is_file(), turn.audio
