#!/usr/bin/env python3
"""The tables of bench/README.md: the current result files (bench/*.json) and the earlier
runs kept in bench/history/.

Each file is one run of a benchmark command (its JSON says the date, the command and the
machine); a table gives each one's headline figure:

    .venv/bin/python scripts/bench-history.py            # prints both Markdown tables
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent.parent / "bench"
HISTORY = BENCH / "history"


def headline(data: dict[str, Any]) -> str:
    """The figure a run is remembered by."""
    if isinstance(data.get("appliance"), dict) and "p50_ms" in data["appliance"]:
        a, s = data["appliance"], data.get("stock") or {}
        stock = f"; stock {s['p50_ms']:.0f} / {s['p95_ms']:.0f} ms" if "p50_ms" in s else ""
        return f"voice to voice p50 / p95 {a['p50_ms']:.0f} / {a['p95_ms']:.0f} ms{stock}"
    if "release_to_first_audio_ms" in data:
        r = data["release_to_first_audio_ms"]
        return f"release to first audio p50 / p95 {r['p50']:.0f} / {r['p95']:.0f} ms"
    if "max_calls_with_p95_under_1500_ms" in data:
        return f"concurrent calls with p95 under 1.5 s: {data['max_calls_with_p95_under_1500_ms']}"
    if isinstance(data.get("appliance"), dict) and "summary" in data["appliance"]:
        a = data["appliance"]["summary"]
        return (
            f"answers right {a['answers_right_pct']} %, premature {a['premature']}, holds "
            f"{a['holds_pct']} %, response p50 / p95 {a['response_p50_ms']:.0f} / "
            f"{a['response_p95_ms']:.0f} ms"
        )
    if "erle" in data:
        best = max(e["erle_db"] for e in data["erle"] if e["processing"] == "production")
        return f"echo return loss enhancement (production processing) {best:.1f} dB"
    if "interruption_ms" in data or "barge_in" in str(data.get("command", "")):
        return "see the barge-in section"
    return "-"


def table(folder: Path = HISTORY) -> str:
    rows = ["| run (UTC) | file | command | headline |", "|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        command = " ".join(str(data.get("command", "")).split()[1:3])
        rows.append(
            f"| {str(data.get('date', ''))[:16]} | `{path.name}` | `{command}` | {headline(data)} |"
        )
    return "\n".join(rows)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        print(table(Path(sys.argv[1])))
    else:
        print("Current results (bench/):\n\n" + table(BENCH))
        print("\nEarlier runs (bench/history/):\n\n" + table(HISTORY))
