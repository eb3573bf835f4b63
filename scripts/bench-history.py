#!/usr/bin/env python3
"""The benchmarks' result tables: the current result files (bench/*.json) and the history.

Each result file is the last run of one benchmark command (its JSON says the date, the
command and the machine). The history, `bench/history.md`, is a table with a row per run
(date, the commit it ran at, the command, its headline figures); every `make bench*`
target adds its run's row.

    .venv/bin/python scripts/bench-history.py                 # the current results table
    .venv/bin/python scripts/bench-history.py add FILE...     # a history row per result file
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
HISTORY = BENCH / "history.md"
HEADER = (
    "# Benchmark history\n\n"
    "One row per run of a benchmark command, added by the `make bench*` targets "
    "(`scripts/bench-history.py add FILE`). The commit is the code the run measured "
    '("+" when the working tree had changes); rows before 2026-12-04 give the commit that '
    "stored the result file, whose per-run JSON files were folded into this table.\n\n"
    "| run (UTC) | commit | file | command | headline |\n|---|---|---|---|---|\n"
)


def _ci(ci: list[float] | None) -> str:
    return f" [{ci[0]:.0f}, {ci[1]:.0f}]" if ci else ""


def headline(data: dict[str, Any]) -> str:
    """The figures a run is remembered by."""
    if isinstance(data.get("ratios"), dict) and data["ratios"]:
        parts = []
        for name, result in data.items():
            if isinstance(result, dict) and "summary" in result:
                s = result["summary"]
                parts.append(
                    f"{name} p50 {s['response_p50_ms']:.0f}{_ci(s.get('response_p50_ci_ms'))} / "
                    f"p95 {s['response_p95_ms']:.0f} ms, right {s['answers_right_pct']} %"
                )
        ratios = ", ".join(
            f"/{peer} p50 {r['p50']:.2f}" for peer, r in data["ratios"].items() if "p50" in r
        )
        return "; ".join(parts) + (f"; appliance {ratios}" if ratios else "")
    if isinstance(data.get("appliance"), dict) and "p50_ms" in data["appliance"]:
        a, s = data["appliance"], data.get("stock") or {}
        stock = f"; stock {s['p50_ms']:.0f} / {s['p95_ms']:.0f} ms" if "p50_ms" in s else ""
        return f"voice to voice p50 / p95 {a['p50_ms']:.0f} / {a['p95_ms']:.0f} ms{stock}"
    if isinstance(data.get("variants"), dict):
        return "release to first audio p50 / p95 " + ", ".join(
            f"{name} {v['release_to_first_audio_ms']['p50']:.0f} / "
            f"{v['release_to_first_audio_ms']['p95']:.0f} ms"
            for name, v in data["variants"].items()
        )
    if "release_to_first_audio_ms" in data:
        r = data["release_to_first_audio_ms"]
        return f"release to first audio p50 / p95 {r['p50']:.0f} / {r['p95']:.0f} ms"
    if "levels" in data and "max_calls_with_p95_under_1500_ms" in data:
        levels = ", ".join(
            f"{lv['calls']}: {lv['voice_to_voice_ms']['p50']:.0f} / "
            f"{lv['voice_to_voice_ms']['p95']:.0f}"
            for lv in data["levels"]
            if lv["voice_to_voice_ms"]["p50"] is not None
        )
        return (
            f"voice to voice p50 / p95 ms by calls ({levels}); p95 under 1.5 s up to "
            f"{data['max_calls_with_p95_under_1500_ms']} calls"
        )
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
    if isinstance(data.get("appliance"), dict) and "reaction_ms" in data["appliance"]:
        parts = [
            f"{name} p50 / p95 {r['reaction_ms']['p50']:.0f} / {r['reaction_ms']['p95']:.0f} ms"
            for name, r in data.items()
            if isinstance(r, dict) and "reaction_ms" in r and r["reaction_ms"]["p50"] is not None
        ]
        return "barge-in reaction " + ", ".join(parts)
    return "-"


def _command(data: dict[str, Any]) -> str:
    words = str(data.get("command", "")).split()
    return " ".join(words[1:] if words and words[0].endswith("__main__.py") else words)


def row(path: Path, commit: str) -> str:
    data = json.loads(path.read_text())
    return (
        f"| {str(data.get('date', ''))[:16]} | {commit} | `{path.name}` | "
        f"`{_command(data)}` | {headline(data)} |"
    )


def current_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "-"
    dirty = git("status", "--porcelain", "--untracked-files=no", "--", "appliance", "bench")
    return commit + ("+" if dirty else "")


def table(folder: Path = BENCH) -> str:
    rows = ["| run (UTC) | file | command | headline |", "|---|---|---|---|"]
    for path in sorted(folder.glob("*.json")):
        data = json.loads(path.read_text())
        rows.append(
            f"| {str(data.get('date', ''))[:16]} | `{path.name}` | `{_command(data)}` | "
            f"{headline(data)} |"
        )
    return "\n".join(rows)


def add(paths: list[Path], commit: str | None = None) -> None:
    """Append a history row for each result file."""
    text = HISTORY.read_text() if HISTORY.exists() else HEADER
    commit = commit or current_commit()
    for path in paths:
        text = text.rstrip("\n") + "\n" + row(path, commit) + "\n"
    HISTORY.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "add":
        add([Path(p) for p in sys.argv[2:]])
    else:
        print(table())
