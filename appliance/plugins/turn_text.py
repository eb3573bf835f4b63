"""What the user has said in the current turn, and whether it reads as finished.

The audio end-of-turn model hears how a sentence ends, not what it says: on voices it was
not trained on it takes a pause after "I would like to know," for the end of a turn, and
holds some finished questions to the maximum delay. `TurnText` adds the words: the STT
reports each transcript of the turn (Whisper's preflight at the first pause, and each
final), and each new text is judged at once by the session's LLM, as the probability of
the token its chat template closes a user turn with (`LlamaLLM.end_of_turn_probability`).
The job goes to the LLM's worker ahead of the preemptive reply that the same transcript
starts, and the prompt it evaluates is the start of that reply's prompt (the KV cache
keeps it), so the words cost about one softmax. The turn detector asks `probability()`
when it decides, and `decide()` lets the words overrule the audio model only when they are
clear either way.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable

logger = logging.getLogger("appliance.turn")

Judge = Callable[[str], "asyncio.Future[float | None]"]

FILLERS = frozenset({"um", "umm", "uh", "uhm", "er", "erm", "hmm"})
"""Hesitation words: a turn whose words end with one is not finished, whatever the
punctuation the STT put after it ("What colour is um?")."""


def ends_with_filler(text: str) -> bool:
    words = re.findall(r"[a-z']+", text.lower())
    return bool(words) and words[-1] in FILLERS


def without_end_mark(text: str) -> str:
    """The words without the punctuation after the last one. Whisper ends what it heard
    before a pause with a full stop as readily as a finished sentence ("I would like to
    know."); the LLM judges whether a sentence would end there (the way LiveKit's text
    turn model reads transcripts without punctuation)."""
    return re.sub(r"[\s.,;:!?…]+$", "", text)


def decide(
    audio: float,
    text: float | None,
    unfinished_below: float,
    finished_above: float,
    threshold: float = 0.5,
) -> float | None:
    """The probability the session compares with `threshold` (below: the user is not done,
    wait up to the max endpointing delay), or None where the two signals disagree or the
    words are unsure: then `settle` decides a little later. Done: the words are clearly
    finished, or the audio model says so and the words do not say otherwise. Not done: the
    audio model says so and the words are clearly unfinished."""
    if text is not None and text > finished_above:
        return max(audio, text)
    if audio >= threshold and not _unfinished(text, unfinished_below):
        return audio
    if audio < threshold and _unfinished(text, unfinished_below):
        return settle(audio, text, unfinished_below, threshold)  # both say not done
    return None


def settle(
    audio: float, text: float | None, unfinished_below: float, threshold: float = 0.5
) -> float:
    """The decision after the wait for an unclear one: not done only if both signals say
    so (the words heard by then); otherwise done."""
    if audio < threshold and text is not None and _unfinished(text, unfinished_below):
        return min(audio, text)
    return max(audio, text or 0.0, threshold)


def _unfinished(text: float | None, unfinished_below: float) -> bool:
    """The words clearly say the user is not done."""
    return text is not None and text < unfinished_below


def _consume(future: asyncio.Future[float | None]) -> None:
    """A judgement nobody awaited must not log 'exception never retrieved'."""
    if not future.cancelled():
        future.exception()


class TurnText:
    """The current user turn's transcripts and the LLM's judgement of the latest one.

    Lives on the event loop: the STT calls `transcribing()` when it starts a transcript of
    the turn and `heard()` when it has one; the session calls `committed()` when the turn
    goes into the conversation; the turn detector awaits `probability()`.
    """

    def __init__(self, judge: Judge) -> None:
        self._judge = judge
        self._finals: list[str] = []
        self._pending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._text = ""
        self._judgement: asyncio.Future[float | None] | None = None

    @property
    def text(self) -> str:
        """The words of the turn so far."""
        return self._text

    def transcribing(self) -> None:
        self._pending += 1
        self._idle.clear()

    def heard(self, text: str | None, *, final: bool) -> None:
        """A transcript of the turn's latest segment (None: the job was dropped)."""
        self._pending = max(0, self._pending - 1)
        if self._pending == 0:
            self._idle.set()
        if text is None:
            return
        text = text.strip()
        full = " ".join([*self._finals, text]).strip()
        if final and text:
            self._finals.append(text)
        if full and full != self._text:
            self._text = full
            if ends_with_filler(full):
                self._judgement = asyncio.get_running_loop().create_future()
                self._judgement.set_result(0.0)
                return
            try:
                self._judgement = self._judge(without_end_mark(full))
            except Exception:
                logger.exception("the text end-of-turn judgement could not start")
                self._judgement = None
            else:
                self._judgement.add_done_callback(_consume)

    def committed(self) -> None:
        """The turn went into the conversation (or was dropped): start afresh."""
        self._finals.clear()
        self._text = ""
        self._judgement = None

    async def probability(self, timeout: float) -> float | None:
        """P(the turn is finished) by its words, waiting at most `timeout` s for the
        transcript in progress and its judgement; None when there is none in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
            judgement = self._judgement
            if judgement is None:
                return None
            return await asyncio.wait_for(
                asyncio.shield(judgement), max(0.0, deadline - loop.time())
            )
        except asyncio.TimeoutError:
            logger.debug("no text end-of-turn judgement within %.2f s", timeout)
            return None
        except Exception:
            logger.exception("the text end-of-turn judgement failed")
            return None
