"""The command line on bad input: clear errors and exit codes, nothing half done."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import soundfile

from appliance.audio.files import read_audio

APPLIANCE = [sys.executable, "-m", "appliance"]


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*APPLIANCE, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )


def test_any_rate_and_stereo_input_is_accepted(tmp_path: Path) -> None:
    rate, seconds = 44100, 1.5
    t = np.arange(int(rate * seconds)) / rate
    tone = 0.3 * np.sin(2 * np.pi * 440 * t)
    path = tmp_path / "stereo.wav"
    soundfile.write(str(path), np.stack([tone, tone], axis=1), rate)
    pcm = read_audio(path)
    assert pcm.dtype == np.int16 and abs(len(pcm) - 16000 * seconds) < 160
    assert 0.2 * 32768 < np.abs(pcm).max() < 0.4 * 32768


def test_unreadable_input_gets_a_clear_error(tmp_path: Path) -> None:
    garbage = tmp_path / "question.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    out = run("converse", "--in", str(garbage), "--out", str(tmp_path / "r.wav"))
    assert out.returncode == 65, out.stderr
    assert f"{garbage}: cannot read audio" in out.stderr
    assert not (tmp_path / "r.wav").exists()


def test_missing_models_stop_start_up_naming_the_fix(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    out = run(
        "converse", "--out", str(tmp_path / "r.wav"), env={"APPLIANCE_MODELS_DIR": str(empty)}
    )
    assert out.returncode == 78, out.stderr
    assert str(empty / "whisper-tiny.en" / "model.bin") in out.stderr
    assert "appliance models fetch whisper/tiny.en" in out.stderr


def test_models_list_and_verify_json() -> None:
    listed = run("models", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    rows = {r["id"]: r for r in json.loads(listed.stdout)["models"]}
    assert rows["whisper/tiny.en"]["in_use"] and rows["whisper/tiny.en"]["verified"]
    assert rows["livekit/turn-detector-v1-mini"]["licence"].startswith("LiveKit Model License")
    verified = run("models", "verify")
    assert verified.returncode == 0, verified.stdout


def test_a_corrupt_model_stops_start_up_naming_the_file(tmp_path: Path) -> None:
    """The installed models, linked into a new directory, with one file corrupted."""
    from appliance.store import manifest
    from appliance.store.disk import models_dir

    installed, root = models_dir(), tmp_path / "models"
    for path in installed.rglob("*"):
        if path.is_file() and not path.name.startswith("."):
            link = root / path.relative_to(installed)
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(path)
    voice = manifest.load().models["piper/en_US-joe-medium"]
    bad = root / voice.dir / voice.file(".onnx.json").name
    data = bytearray(bad.read_bytes())
    data[10] ^= 0x20
    bad.unlink()
    bad.write_bytes(bytes(data))
    out = run("converse", "--out", str(tmp_path / "r.wav"), env={"APPLIANCE_MODELS_DIR": str(root)})
    assert out.returncode == 78, out.stderr
    assert f"{bad}: sha256 mismatch" in out.stderr
    assert "appliance models fetch piper/en_US-joe-medium" in out.stderr
    assert not (tmp_path / "r.wav").exists()


def test_the_daemon_switches_the_hub_libraries_offline() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_"))}
    code = "import os, appliance.session.modelset; print(os.environ['HF_HUB_OFFLINE'])"
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True
    )
    assert out.stdout.strip() == "1"


def test_the_daemon_runs_the_profile_the_config_selects(tmp_path: Path) -> None:
    """An operator's extra manifest adds a profile; converse loads exactly its models."""
    extra = tmp_path / "site.toml"
    extra.write_text(
        """
[profiles.kiosk-test]
board = "test"
description = "the installed models, smart-turn as the turn model, one thread"
stt = "whisper/tiny.en"
llm = "llama.cpp/smollm2-135m-instruct"
tts = "piper/en_US-joe-medium"
vad = "silero"
turn_model = "smart-turn/v3.2"
settings = { threads = 1, llm_max_tokens = 24 }
why = { stt = "a", llm = "b", tts = "c", vad = "d", turn = "e" }
"""
    )
    config = tmp_path / "appliance.toml"
    config.write_text(f'[models]\nmanifest = "{extra}"\nprofile = "kiosk-test"\n')
    verified = run("models", "verify", "--config", str(config), "--json")
    assert verified.returncode == 0, verified.stderr
    ids = [m["id"] for m in json.loads(verified.stdout)["models"]]
    assert "smart-turn/v3.2" in ids and "livekit/turn-detector-v1-mini" not in ids

    code = (
        "import sys; from appliance import config; from appliance.session import modelset; "
        "m = modelset.ModelSet(config.load(sys.argv[1])); "
        "print(m.config.models.threads, m.config.models.llm_max_tokens, m.smart_turn is not None)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(config)], capture_output=True, text=True, timeout=300
    )
    assert out.stdout.split() == ["1", "24", "True"], out.stderr
    answered = run("converse", "--config", str(config), "--out", str(tmp_path / "r.wav"))
    assert answered.returncode == 0, answered.stderr
    assert "assistant:" in answered.stdout
