"""The benchmark's own arithmetic (the critical path from plugin marks, word error rate)
and its barge-in measurement on a real session."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from appliance.observe import trace
from bench.latency import word_error_rate


def test_the_critical_path_follows_the_reply_that_was_heard(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    marks = [
        (9.0, "tts.first_audio"),  # an earlier reply: before the end of speech
        (10.20, "stt.transcript"),  # preflight
        (10.21, "llm.start"),  # a preemptive attempt, later superseded
        (10.30, "stt.transcript"),
        (10.31, "llm.start"),
        (10.45, "llm.first_token"),
        (10.55, "tts.start"),
        (10.65, "tts.first_audio"),
        (11.50, "tts.start"),  # the reply's second clause
    ]
    monkeypatch.setattr(trace, "MARKS", marks)
    parts = trace.critical_path(10.0, 10.70)
    assert parts is not None
    assert {k: round(v, 3) for k, v in parts.items()} == {
        "stt": 0.3,
        "llm_first_token": 0.15,
        "llm_first_chunk": 0.1,
        "tts_first_audio": 0.1,
        "turn_and_playout": 0.05,
    }
    assert abs(sum(parts.values()) - 0.70) < 1e-9  # the parts add up to the latency
    assert trace.critical_path(10.0, 10.60) is None  # no audio was ready by then


def test_word_error_rate() -> None:
    assert word_error_rate("What is the capital of France?", "what is the capital of france") == 0
    assert word_error_rate("What color is the sky?", "What colors the sky") == 0.4
    assert word_error_rate("a b", "a b c d") == 1.0
    # numbers count as the words said: Whisper writes "6" for "six"
    assert word_error_rate("What is six times seven?", "What is 6 times 7?") == 0
    assert word_error_rate("three hundred and sixty five days", "365 days") == 0
    assert word_error_rate("twenty four hours", "24 hours") == 0
    assert word_error_rate("eight plus five", "8 plus 6") == 1 / 3
    assert word_error_rate("", "anything") is None


def test_talking_over_the_agent_stops_it_and_the_measure_sees_where(
    models: Any, speak: Any
) -> None:
    """The default session: the phrase pauses the announcement, and its words end it.
    The reaction time itself is the benchmark's figure, not asserted here."""
    from appliance import config as config_mod
    from bench.barge_in import barge_in_once

    config = config_mod.parse({}, "<defaults>")
    phrase = "Wait, stop please."
    pcm = speak(phrase, 0.0)
    run = asyncio.run(barge_in_once(models, None, config, "appliance", phrase, pcm))
    assert run["reaction_ms"] is not None and run["reaction_ms"] > 0, run  # it stopped after
    assert run["interrupted"] is True, run
    assert run["paused_or_cut"] == 1, run  # paused once, then cut: never resumed in between
