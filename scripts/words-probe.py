#!/usr/bin/env python3
"""The words' end-of-turn probability for the corpus sentences, finished and unfinished.

Text only, no speech: every sentence of `scripts/make-eval-corpus.py` (finished) and the
first half of each pause and hesitation item (unfinished: what was said before the pause),
each as written and without its last punctuation (as Whisper often leaves it), judged by
the default LLM with the default instructions, the way the session asks
(`LlamaLLM.end_of_turn_probability`). Prints each probability and
how many of each fall below `[session] text_unfinished_below`, and writes the JSON:

    .venv/bin/python scripts/words-probe.py bench/quality/words-probe.json
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from livekit.agents import llm  # noqa: E402

from appliance.config import load  # noqa: E402
from appliance.plugins.turn_text import without_end_mark  # noqa: E402
from appliance.session.modelset import ModelSet  # noqa: E402


def corpus_sentences() -> tuple[list[str], list[str]]:
    spec = importlib.util.spec_from_file_location("corpus", ROOT / "scripts/make-eval-corpus.py")
    assert spec is not None and spec.loader is not None
    corpus = importlib.util.module_from_spec(spec)
    sys.modules["corpus"] = corpus
    spec.loader.exec_module(corpus)
    finished = [t for t, *_ in corpus.QUESTIONS + corpus.ARITHMETIC]
    finished += corpus.SHORT_ANSWERS + corpus.STATEMENTS
    finished += [t for dialogue in corpus.DIALOGUES for t, _ in dialogue]
    unfinished = []
    for text, *_ in corpus.PAUSES + corpus.HESITATIONS:
        before, _, after = text.partition("|")
        finished.append(re.sub(r"\s+", " ", f"{before} {after}").strip())
        if after:
            unfinished.append(before.strip())
    return finished, unfinished


async def probe(out: Path) -> None:
    config = load(None)
    models = ModelSet(config)
    models.warm()
    engine = models.llm()
    ctx = llm.ChatContext()
    ctx.add_message(role="system", content=config.agent.instructions)
    finished, unfinished = corpus_sentences()
    rows: list[dict[str, Any]] = []
    try:
        for label, texts in (("finished", finished), ("unfinished", unfinished)):
            for text in texts:
                row: dict[str, Any] = {"label": label, "text": text}
                for key, said in (("as_written", text), ("judged", without_end_mark(text))):
                    row[key] = await engine.end_of_turn_probability(ctx, (), said)
                rows.append(row)
                print(f"{label:10} {row['as_written']:.1e} {row['judged']:.1e}  {text}")
    finally:
        models.close()
    below = config.session.text_unfinished_below
    for key in ("as_written", "judged"):
        for label in ("finished", "unfinished"):
            values = [r[key] for r in rows if r["label"] == label]
            under = sum(v < below for v in values)
            print(f"{key:10} {label:10}: {under} of {len(values)} below {below}")
    out.write_text(json.dumps({"llm": config.models.llm, "texts": rows}, indent=1) + "\n")


if __name__ == "__main__":
    asyncio.run(probe(Path(sys.argv[1] if len(sys.argv) > 1 else "words-probe.json")))
