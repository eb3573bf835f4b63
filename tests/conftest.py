"""Shared fixtures: the installed model files, one loaded model set, test speech.

Test speech is synthesised with the Piper voice (the most natural voice available
offline here) with its random variation off, so a phrase is the same audio in every
run; tests that use espeak-ng say so.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance import config as config_mod
from appliance.audio.pcm import resample
from appliance.store import manifest
from appliance.store.disk import file_path, models_dir
from bench import room_sim as audiosim
from bench.livekit_server import free_port

MODELS_DIR = models_dir()


_CONTRACTIONS = {"'re": " are", "'s": " is", "'m": " am", "'ll": " will", "'ve": " have"}
_CONTRACTION_RE = re.compile(r"(?<=[a-z])('re|'s|'m|'ll|'ve)\b")


def transcribed_as(expected: str, transcript: str) -> bool:
    """Whether a transcript is the expected phrase, give or take one word in three.

    Whisper tiny.en in its fitted window mishears a word now and then ("France" as
    "friends"); `make bench` measures that rate. Contractions count as the words they
    stand for (Whisper writes "you are" as "you're" nine times in ten). Garbage or
    silence still fails.
    """
    from bench.latency import word_error_rate

    def expand(text: str) -> str:
        return _CONTRACTION_RE.sub(lambda m: _CONTRACTIONS[m.group(1)], text.lower())

    wer = word_error_rate(expand(expected), expand(transcript))
    return wer is not None and wer <= 1 / 3


def conversation(session: Any) -> list[tuple[str, str]]:
    """A session's user and assistant messages so far, as (role, text)."""
    return [
        (i.role, i.text_content or "")
        for i in session.history.items
        if getattr(i, "role", None) in ("user", "assistant")
    ]


async def wait_until(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    """Poll `condition` on the running loop until it holds (True) or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def model_file(model_id: str, suffix: str) -> Path:
    entry = manifest.load().models[model_id]
    return file_path(entry, entry.file(suffix).name, MODELS_DIR)


def free_tcp_port() -> int:
    """A TCP port free on loopback now (the test binds it soon after)."""
    return free_port(socket.SOCK_STREAM)


def free_udp_port() -> int:
    """A UDP port free on loopback now."""
    return free_port(socket.SOCK_DGRAM)


@pytest.fixture(scope="session")
def models() -> Iterator[object]:
    """One model set for the whole run (both turn models loaded), as on the appliance."""
    from appliance.session.modelset import ModelSet

    cfg = config_mod.parse({"models": {"turn_model": "smart-turn/v3.2"}}, "<tests>")
    model_set = ModelSet(cfg)
    model_set.warm()
    yield model_set
    model_set.close()


@pytest.fixture(scope="session")
def speak(models: object, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """Text -> int16 16 kHz speech from the Piper voice, with 0.3 s of silence before.

    The voice's noise scales are 0 here: Piper otherwise varies every rendering at
    random, and a test's input would then differ from run to run (Whisper heard one
    rendering in twenty of "capital of France" as "capital of friends"). The appliance's
    own speech keeps the voice's variation.
    """
    from appliance.plugins.piper.engine import PiperVoice

    model_id = models.config.models.tts  # type: ignore[attr-defined]
    config = json.loads(model_file(model_id, ".onnx.json").read_text(encoding="utf-8"))
    config.setdefault("inference", {}).update(noise_scale=0.0, noise_w=0.0)
    steady = tmp_path_factory.mktemp("voice") / "steady.onnx.json"
    steady.write_text(json.dumps(config), encoding="utf-8")
    voice = PiperVoice(model_file(model_id, ".onnx"), steady, threads=1)

    def _speak(text: str, lead: float = 0.3) -> np.ndarray:
        pcm = resample(voice.synthesize(text), voice.sample_rate, 16000)
        return np.concatenate([np.zeros(int(lead * 16000), np.int16), pcm])

    return _speak


def espeak(text: str, tmp_path: Path) -> np.ndarray:
    """Robotic espeak-ng speech as int16 16 kHz (for tests that say they use it)."""
    from appliance.audio.files import read_audio

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


@pytest.fixture(scope="session")
def livekit_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """A real livekit-server on loopback, shared by the tests that need one."""
    from bench.livekit_server import LiveKitServer

    with LiveKitServer(tmp_path_factory.mktemp("livekit")) as server:
        yield server
