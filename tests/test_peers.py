"""The benchmark's harness on the real models: the appliance, livekit-agents at its
defaults and Pipecat hear the same corpus turn, each in its own process, and answer it;
push-to-talk turns through the appliance's button and livekit's own example.

The Pipecat peer runs in its own environment, which `scripts/setup-pipecat-peer.sh` makes
(from the package registry, pinned) when it is missing.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def small_corpus(tmp_path: Path, *, read_speech: bool = False) -> Path:
    """The corpus's first question (Italy's capital, a voice other than the appliance's)."""
    corpus = json.loads((ROOT / "bench" / "eval" / "corpus.json").read_text())
    few = [i for i in corpus if i["kind"] == "question"][:1]
    if read_speech:
        few += [i for i in corpus if i["kind"] == "read_speech" and "beckett" in i["voice"]]
    path = tmp_path / "corpus.json"
    path.write_text(json.dumps([{**i, "set": "eval"} for i in few]))
    (tmp_path / "wav").symlink_to(ROOT / "bench" / "eval" / "wav")
    return path


def bench_eval(tmp_path: Path, *args: str) -> tuple[str, dict[str, Any]]:
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench", "eval", "--json", str(out), *args],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=ROOT,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout, json.loads(out.read_text())


@pytest.mark.slow
def test_the_appliance_and_both_peers_answer_the_same_turn(tmp_path: Path) -> None:
    setup = subprocess.run(
        ["bash", "scripts/setup-pipecat-peer.sh"], capture_output=True, text=True, cwd=ROOT
    )
    assert setup.returncode == 0, setup.stderr[-4000:]
    corpus = small_corpus(tmp_path, read_speech=True)
    stdout, results = bench_eval(tmp_path, "--corpus", str(corpus))
    assert "answers right" in stdout and "response p50" in stdout, stdout
    assert "appliance / livekit" in stdout and "appliance / pipecat" in stdout, stdout
    for name in ("appliance", "livekit", "pipecat"):
        summary = results[name]["summary"]
        assert summary["turns"] == 1 and summary["failed_turns"] == 0, (name, summary)
        (turn,) = results[name]["turns"]
        assert {"heard", "reply", "right", "premature", "hold", "response_ms", "cpu_s"} <= set(turn)
        assert "italy" in turn["heard"].lower(), (name, turn)
        assert turn["right"] and "rome" in turn["reply"].lower(), (name, turn)
        assert not turn["premature"] and turn["response_ms"] > 0, (name, turn)
        assert turn["cpu_s"] > 0 and summary["peak_rss_mb"] > 100, (name, summary)
        assert results[name]["settings"], name  # every configuration says how it was built
    appliance = results["appliance"]["summary"]
    assert appliance["read_speech_wer_pct"] is not None and appliance["read_speech_wer_pct"] < 30
    assert results["ratios"]["livekit"]["paired_turns"] == 1
    assert "turn_detection" in results["livekit"]["settings"]
    assert "turn_strategies" in results["pipecat"]["settings"]


@pytest.mark.slow
def test_push_to_talk_is_timed_from_the_release_for_the_appliance_and_livekit(
    tmp_path: Path,
) -> None:
    corpus = small_corpus(tmp_path)
    stdout, results = bench_eval(
        tmp_path, "--corpus", str(corpus), "--configs", "appliance,livekit", "--ptt-release", "0.1"
    )
    assert "appliance / livekit ptt +100 ms" in stdout, stdout
    for name in ("appliance ptt +100 ms", "livekit ptt +100 ms"):
        (turn,) = results[name]["turns"]
        assert turn["release_after_s"] == 0.1 and "released_s" in turn, turn
        assert turn["right"] and turn["user_turns"] == 1, (name, turn)
        assert not turn["premature"] and turn["response_ms"] > 0, (name, turn)
    assert "livekit ptt +100 ms" in results["ratios"]
