"""The benchmarks' statistics and the A/B script that compares two commits."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench.stats import interval, paired_ratio_interval, percentile, ratio_interval

ROOT = Path(__file__).resolve().parent.parent


def test_intervals_hold_the_percentile_and_narrow_with_more_samples() -> None:
    rng = np.random.default_rng(1)
    few, many = rng.normal(1000, 100, 20).tolist(), rng.normal(1000, 100, 400).tolist()
    lo, hi = interval(few, 50) or [0, 0]
    assert lo <= (percentile(few, 50) or 0) <= hi
    wide = hi - lo
    lo, hi = interval(many, 50) or [0, 0]
    assert lo < 1000 < hi and hi - lo < wide
    assert interval([5.0], 50) is None and percentile([], 50) is None


def test_paired_ratios_see_a_constant_speed_up_that_unpaired_ones_blur() -> None:
    rng = np.random.default_rng(2)
    base = rng.uniform(500, 3000, 60)  # turns of very different lengths
    faster = (base * 0.5).tolist()
    paired = paired_ratio_interval(faster, base.tolist(), 50)
    unpaired = ratio_interval(faster, base.tolist(), 50)
    assert paired is not None and unpaired is not None
    assert paired[0] == pytest.approx(0.5) and paired[1] == pytest.approx(0.5)
    assert unpaired[0] < 0.5 < unpaired[1]
    assert paired_ratio_interval([1.0, 2.0], [1.0], 50) is None


@pytest.mark.slow
def test_ab_runs_two_commits_in_worktrees_and_compares_the_same_turns(tmp_path: Path) -> None:
    out = tmp_path / "ab.json"
    args = ["HEAD", "HEAD", "--rounds", "1", "--set", "tune", "--limit", "1", "--json", str(out)]
    done = subprocess.run(
        [sys.executable, "scripts/ab.py", *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["commits"]["A"] == result["commits"]["B"]
    assert result["A"]["turns"] == result["B"]["turns"] >= 1
    assert result["b_over_a"]["paired_turns"] == result["A"]["turns"]
    assert "B / A over" in done.stdout
    worktrees = subprocess.run(
        ["git", "worktree", "list"], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert "appliance-ab-" not in worktrees  # removed at the end
