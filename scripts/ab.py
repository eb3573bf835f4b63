#!/usr/bin/env python3
"""A/B: the appliance at two commits on the same corpus turns, alternating, side by side.

    .venv/bin/python scripts/ab.py A B [--rounds 2] [--set tune] [--limit 20]
        [--config FILE] [--json bench/ab.json]

Each commit is checked out into its own git worktree (under a temporary folder, removed at
the end), and `python -m bench eval --configs appliance` runs there with this checkout's
.venv (the worktree's own `appliance` and `bench` packages come first on the path). The
rounds alternate the order (A then B, B then A, ...), so a machine that speeds up or slows
down during the run does not favour either. Each round is a full pass over the items.

Printed and written: per commit, answers right, premature replies, holds, response p50 and
p95 with bootstrap 95 % intervals, CPU seconds per turn; and B / A ratios of p50 and p95
over the turns both answered, with paired bootstrap intervals. Tune on the "tune" set,
confirm on "eval".
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.evaluation import summarise  # noqa: E402
from bench.stats import paired_ratio_interval  # noqa: E402


def git(*args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=ROOT, check=True, capture_output=True, text=True
    ).stdout.strip()


def run_round(tree: Path, out: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    """One bench pass in a worktree; its appliance turn records."""
    cmd = [str(ROOT / ".venv/bin/python"), "-m", "bench", "eval", "--configs", "appliance"]
    cmd += ["--set", args.set, "--json", str(out)]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    if args.config:
        cmd += ["--config", str(Path(args.config).resolve())]
    subprocess.run(cmd, cwd=tree, check=True)
    return list(json.loads(out.read_text())["appliance"]["turns"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("a", help="commit A (the baseline)")
    parser.add_argument("b", help="commit B (the change)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--set", choices=("tune", "eval", "all"), default="tune")
    parser.add_argument("--limit", type=int, default=0, help="only the first N items")
    parser.add_argument("--config", default=None, help="config file for both commits")
    parser.add_argument("--json", default="", help="write the figures and every turn here")
    args = parser.parse_args()
    commits = {"A": git("rev-parse", "--short", args.a), "B": git("rev-parse", "--short", args.b)}
    turns: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    with tempfile.TemporaryDirectory(prefix="appliance-ab-") as tmp:
        trees = {side: Path(tmp) / side for side in commits}
        for side, commit in commits.items():
            git("worktree", "add", "--detach", str(trees[side]), commit)
        try:
            for n in range(args.rounds):
                for side in ("A", "B") if n % 2 == 0 else ("B", "A"):
                    print(f"round {n + 1}: {side} ({commits[side]})", file=sys.stderr, flush=True)
                    out = Path(tmp) / f"{side}-{n}.json"
                    for turn in run_round(trees[side], out, args):
                        turns[side].append({**turn, "round": n})
        finally:
            for tree in trees.values():
                git("worktree", "remove", "--force", str(tree))
    result: dict[str, Any] = {
        "command": " ".join(sys.argv),
        "commits": commits,
        **{side: summarise(turns[side], []) for side in commits},
    }
    b_times = {(t["round"], t["id"], t["turn"]): t["response_ms"] for t in turns["B"]}
    pairs = [
        (t["response_ms"], b_times[key])
        for t in turns["A"]
        if t["response_ms"] is not None
        and (key := (t["round"], t["id"], t["turn"])) in b_times
        and b_times[key] is not None
    ]
    a_ms, b_ms = [p[0] for p in pairs], [p[1] for p in pairs]
    result["b_over_a"] = {
        "paired_turns": len(pairs),
        "p50": round(float(np.percentile(b_ms, 50) / np.percentile(a_ms, 50)), 3)
        if pairs
        else None,
        "p95": round(float(np.percentile(b_ms, 95) / np.percentile(a_ms, 95)), 3)
        if pairs
        else None,
        "p50_ci": paired_ratio_interval(b_ms, a_ms, 50),
        "p95_ci": paired_ratio_interval(b_ms, a_ms, 95),
    }
    for side in commits:
        f = result[side]
        print(
            f"{side} {commits[side]}: answers right {f['answers_right']}/{f['graded']}, premature "
            f"{f['premature']}, holds {f['holds']}, response p50 {f['response_p50_ms']} "
            f"{f['response_p50_ci_ms']} / p95 {f['response_p95_ms']} {f['response_p95_ci_ms']} "
            f"ms, CPU {f['cpu_s_per_turn']} s per turn"
        )
    r = result["b_over_a"]
    print(
        f"B / A over {r['paired_turns']} turns: p50 {r.get('p50')} {r['p50_ci']}, "
        f"p95 {r.get('p95')} {r['p95_ci']} (95 % CI)"
    )
    if args.json:
        result["turns"] = turns
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
