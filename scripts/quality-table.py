"""Print a Markdown table of `python -m bench eval` results, one row per configuration.

    .venv/bin/python scripts/quality-table.py bench/eval-results.json bench/quality/eval-*.json

Each JSON file is what `python -m bench eval --json` wrote; every configuration in it (appliance,
livekit, pipecat; "stock" in files from before 2026-12-04 18:00) gives a row, named after the
file's `--config` (or "default") and the configuration.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

COLUMNS = (
    ("answers right", lambda s: f"{s['answers_right']}/{s['graded']} ({s['answers_right_pct']} %)"),
    (
        "premature (on pauses)",
        lambda s: f"{s['premature']} ({s['premature_on_pauses']}/{s['pause_items']})",
    ),
    ("holds > 2 s", lambda s: f"{s['holds']}/{s['turns']} ({s['holds_pct']} %)"),
    ("response p50 / p95", lambda s: f"{s['response_p50_ms']:.0f} / {s['response_p95_ms']:.0f} ms"),
    (
        "WER all / read speech",
        lambda s: f"{s['transcript_wer_pct']} / {s['read_speech_wer_pct']} %",
    ),
    ("CPU per turn", lambda s: f"{s['cpu_s_per_turn']:.2f} s"),
)


def rows(path: Path) -> list[tuple[str, dict[str, Any]]]:
    data = json.loads(path.read_text())
    config = data.get("config") or "<defaults>"
    name = "default" if config == "<defaults>" else Path(config).stem
    return [
        (f"{name} ({key}, {data['set']} set, {data['date'][:16]})", data[key]["summary"])
        for key in ("appliance", "livekit", "pipecat", "stock")
        if key in data
    ]


def main(paths: list[str]) -> None:
    print("| configuration | " + " | ".join(c for c, _ in COLUMNS) + " |")
    print("|---" * (len(COLUMNS) + 1) + "|")
    for path in paths:
        for name, summary in rows(Path(path)):
            print(f"| {name} | " + " | ".join(f(summary) for _, f in COLUMNS) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
