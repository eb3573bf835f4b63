"""Piper's text handling: sentences and clauses cut at punctuation.

`split_sentences` gives the (clause, punctuation mark) pairs a voice phonemizes, since
espeak-ng drops punctuation while Piper voices were trained with it; `wrap_lines` keeps
espeak-ng's input lines short. `split_clauses` and `split_first_words` cut a streamed reply
into the chunks synthesized one after another.
"""

from __future__ import annotations

import re

_MAX_LINE_CHARS = 300  # espeak-ng loses words on very long input lines: wrap clauses shorter
# Clause punctuation: an ellipsis, a run of sentence marks, , ; :, or a spaced dash; it only
# counts when followed by closing quotes/brackets and then whitespace or the end of the text
# (so "3.5", "10:30", "1,000" and "e.g.x" stay inside their clause).
_BREAK_RE = re.compile(r"(\.{2,}|…|[.!?]+|[,;:]|(?<=\s)[-–—]+)[)\]\"'”’»]*(?=\s|$)")
_ABBREVIATIONS = frozenset({"mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "vs", "mt"})


def split_sentences(text: str) -> list[list[tuple[str, str]]]:
    """Split text into sentences of (clause text, punctuation mark) pairs.

    Marks are one of ``. ! ? , ; :``; every sentence ends with ``.``, ``!`` or ``?``.
    Clauses without any letter or digit are dropped (their mark may end the sentence).
    """
    sentences: list[list[tuple[str, str]]] = []
    clauses: list[tuple[str, str]] = []
    pos = 0

    def add(chunk: str, mark: str) -> None:
        chunk = " ".join(chunk.split())
        if any(c.isalnum() for c in chunk):
            clauses.append((chunk, mark))
        elif clauses and mark in ".!?":
            clauses[-1] = (clauses[-1][0], mark)
        if mark in ".!?" and clauses:
            sentences.append(clauses.copy())
            clauses.clear()

    for m in _BREAK_RE.finditer(text):
        chunk, sign = text[pos : m.start()], m.group(1)
        if sign[0] in ".!?" and not sign.startswith(".."):
            if sign == ".":
                words = chunk.split()
                last = words[-1].lower().lstrip("(\"'") if words else ""
                following = text[m.end() :].lstrip()[:1]
                # "Dr. Smith", "J. Doe", "e.g. this": not the end of a sentence
                if last in _ABBREVIATIONS or (len(last) == 1 and last.isalpha()):
                    continue
                if following.islower():
                    continue
            mark = "?" if "?" in sign else "!" if "!" in sign else "."
        elif sign in ",;:":
            mark = sign
        else:  # ellipsis or dash: a pause inside the sentence
            mark = ","
        add(chunk, mark)
        pos = m.end()
    add(text[pos:], ".")
    if clauses:  # the text ended after a comma-like mark: end the sentence there
        clauses[-1] = (clauses[-1][0], ".")
        sentences.append(clauses.copy())
    return sentences


def wrap_lines(clause: str) -> list[str]:
    """Cut a clause into lines of at most ``_MAX_LINE_CHARS`` at word boundaries."""
    lines: list[str] = []
    current = ""
    for word in clause.split():
        if current and len(current) + 1 + len(word) > _MAX_LINE_CHARS:
            lines.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    if current:
        lines.append(current)
    return lines


def split_clauses(text: str) -> list[tuple[str, int, int]]:
    """The clauses of `text` with their (start, end) offsets: cut after clause
    punctuation (, ; : and sentence marks), not after an abbreviation such as "Dr."."""
    clauses: list[tuple[str, int, int]] = []
    start = 0
    for match in _BREAK_RE.finditer(text):
        before = text[start : match.start()].split()
        if match.group(1) == "." and before and before[-1].lower() in _ABBREVIATIONS:
            continue
        if text[start : match.end()].strip():
            clauses.append((text[start : match.end()].strip(), start, match.end()))
        start = match.end()
    if text[start:].strip():
        clauses.append((text[start:].strip(), start, len(text)))
    return clauses


_WORD_RE = re.compile(r"\S+")


def split_first_words(text: str, words: int) -> list[tuple[str, int, int]]:
    """`split_clauses`, except that a first clause longer than `words` words is cut after
    them (marked with a comma, so the voice pauses there as it would at one)."""
    clauses = split_clauses(text)
    if not clauses or words <= 0:
        return clauses
    _, start, end = clauses[0]
    found = list(_WORD_RE.finditer(text, start, end))
    if len(found) <= words:
        return clauses
    cut = found[words - 1].end()
    head = text[start:cut].strip().rstrip(",;:") + ","
    return [(head, start, cut), (text[cut:end].strip(), cut, end), *clauses[1:]]
