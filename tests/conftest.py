"""Shared fixtures: the installed model files, one loaded model set, test speech.

Test speech is synthesised with the Piper voice (the most natural voice available
offline here); tests that use espeak-ng say so.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from appliance import audiosim, manifest
from appliance import config as config_mod
from appliance import models as store
from appliance.fileaudio import resample

MODELS_DIR = store.models_dir()


def transcribed_as(expected: str, transcript: str) -> bool:
    """Whether a transcript is the expected phrase, give or take one word in three.

    Whisper tiny.en in its fitted window mishears a word now and then ("France" as
    "friends"); `make bench` measures that rate. Garbage or silence still fails.
    """
    from appliance.bench import word_error_rate

    wer = word_error_rate(expected, transcript)
    return wer is not None and wer <= 1 / 3


def model_file(model_id: str, suffix: str) -> Path:
    entry = manifest.load().models[model_id]
    return store.file_path(entry, entry.file(suffix).name, MODELS_DIR)


@pytest.fixture(scope="session")
def models() -> Iterator[object]:
    """One model set for the whole run (both turn models loaded), as on the appliance."""
    from appliance.modelset import ModelSet

    cfg = config_mod.parse({"models": {"turn_model": "smart-turn/v3.2"}}, "<tests>")
    model_set = ModelSet(cfg)
    model_set.warm()
    yield model_set
    model_set.close()


@pytest.fixture(scope="session")
def speak(models: object):  # type: ignore[no-untyped-def]
    """Text -> int16 16 kHz speech from the Piper voice, with 0.3 s of silence before."""
    voice = models.voice  # type: ignore[attr-defined]

    def _speak(text: str, lead: float = 0.3) -> np.ndarray:
        pcm = resample(voice.synthesize(text), voice.sample_rate, 16000)
        return np.concatenate([np.zeros(int(lead * 16000), np.int16), pcm])

    return _speak


def espeak(text: str, tmp_path: Path) -> np.ndarray:
    """Robotic espeak-ng speech as int16 16 kHz (for tests that say they use it)."""
    from appliance.fileaudio import read_audio

    out = tmp_path / "espeak.wav"
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True)
    return read_audio(out)


@pytest.fixture
def room(tmp_path: Path) -> Iterator[audiosim.Room]:
    """A simulated kiosk room (PulseAudio pipes) as the sound card voice_in/voice_out."""
    if not audiosim.available():
        pytest.skip("needs pulseaudio (installed by scripts/setup-dev.sh)")
    with audiosim.simulated_room(tmp_path) as r:
        yield r
