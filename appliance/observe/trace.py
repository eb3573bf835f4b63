"""Monotonic timestamps of a reply's stages, for the benchmarks' per-stage breakdown.

The model plugins mark when the STT gives the transcript a reply is built on, when the
LLM starts and gives its first token, and when the TTS starts and has its first audio.
Marking is an append to a bounded deque (no I/O, no lock needed), so it is always on.
"""

from __future__ import annotations

import time
from collections import deque

MARKS: deque[tuple[float, str]] = deque(maxlen=4000)
DECISIONS: deque[tuple[float, dict[str, object]]] = deque(maxlen=1000)
"""The end-of-turn decisions (what each signal said), for the evaluation's turn records."""
STAGE_MARKS = ("stt.transcript", "llm.start", "llm.first_token", "tts.start", "tts.first_audio")


def mark(name: str) -> None:
    MARKS.append((time.monotonic(), name))


def decision(**fields: object) -> None:
    DECISIONS.append((time.monotonic(), fields))


def decisions_between(start: float, end: float) -> list[tuple[float, dict[str, object]]]:
    """The end-of-turn decisions made in [start, end] (monotonic), oldest first."""
    return [(t, fields) for t, fields in DECISIONS if start <= t <= end]


def last_before(name: str, t: float, after: float = float("-inf")) -> float | None:
    """The latest `name` mark in (after, t]."""
    times = [m for m, n in MARKS if n == name and after < m <= t]
    return times[-1] if times else None


def critical_path(speech_end: float, first_audio: float) -> dict[str, float] | None:
    """The reply that was heard, as consecutive parts from the end of speech (monotonic)
    to its first audio: STT, LLM first token, LLM first chunk, TTS first audio, and the
    rest (waiting for the end-of-turn decision, playout). None when a mark is missing."""
    tts_audio = last_before("tts.first_audio", first_audio, speech_end)
    tts_start = last_before("tts.start", tts_audio, speech_end) if tts_audio else None
    token = last_before("llm.first_token", tts_start, speech_end) if tts_start else None
    llm_start = last_before("llm.start", token, speech_end) if token else None
    stt = last_before("stt.transcript", llm_start, speech_end) if llm_start else None
    if None in (tts_audio, tts_start, token, llm_start, stt):
        return None
    assert tts_audio and tts_start and token and stt
    return {
        "stt": stt - speech_end,
        "llm_first_token": token - stt,
        "llm_first_chunk": tts_start - token,
        "tts_first_audio": tts_audio - tts_start,
        "turn_and_playout": first_audio - tts_audio,
    }
