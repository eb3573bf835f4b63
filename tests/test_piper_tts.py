"""Tests for the Piper TTS plugin, with the real joe voice, espeak-ng and faster-whisper."""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from appliance.plugins.piper import engine as piper_engine
from appliance.plugins.piper.engine import (
    FIRST_PIECE_FRAMES,
    RENDERED_KEEP,
    VOCODER_CONTEXT,
    PiperVoice,
    PiperVoiceError,
    split_voice,
)
from appliance.plugins.piper.tts import PiperTTS
from appliance.plugins.priority import Priority
from appliance.store import manifest

from .conftest import model_file

pytestmark = pytest.mark.slow

MODEL = model_file("piper/en_US-joe-medium", ".onnx")
CONFIG = model_file("piper/en_US-joe-medium", ".onnx.json")


@pytest.fixture(scope="module")
def voice() -> Iterator[PiperVoice]:
    yield PiperVoice(MODEL, CONFIG)


def _rms(audio: np.ndarray) -> float:
    return float(np.sqrt(np.mean(audio.astype(np.float64) ** 2)))


def test_synthesize_sentence(voice: PiperVoice) -> None:
    audio = voice.synthesize("The weather in Paris is sunny today.")
    assert voice.sample_rate == 22050
    assert audio.dtype == np.int16 and audio.ndim == 1
    assert 1.0 < len(audio) / voice.sample_rate < 5.0
    assert _rms(audio) > 300


def test_round_trip_with_whisper(voice: PiperVoice) -> None:
    from faster_whisper import WhisperModel

    audio = voice.synthesize("The weather in Paris is sunny today.")
    src = audio.astype(np.float32) / 32768.0
    n = int(len(src) * 16000 / voice.sample_rate)
    times = np.arange(n) / 16000
    audio16k = np.interp(times, np.arange(len(src)) / voice.sample_rate, src).astype(np.float32)

    model_dir = str(model_file("whisper/tiny.en", "model.bin").parent)
    model = WhisperModel(model_dir, device="cpu", compute_type="int8")
    segments, _ = model.transcribe(audio16k, language="en", beam_size=1)
    text = " ".join(s.text for s in segments).lower()
    assert "weather" in text and "paris" in text, text


@pytest.mark.parametrize("text", ["", "   ", "...", "?!", " , . "])
def test_nothing_to_say_gives_empty_audio(voice: PiperVoice, text: str) -> None:
    audio = voice.synthesize(text)
    assert audio.dtype == np.int16 and audio.size == 0
    assert voice.phonemize(text) == []


def test_sentences_are_synthesized_separately(voice: PiperVoice) -> None:
    text = "Hello there, my friend. How are you today?"
    phonemes = voice.phonemize(text)
    assert len(phonemes) == 2
    assert phonemes[0].endswith(".") and ", " in phonemes[0]
    assert phonemes[1].endswith("?")
    chunks = list(voice.synthesize_sentences(text))
    assert len(chunks) == 2
    assert all(c.dtype == np.int16 and _rms(c) > 300 for c in chunks)


def test_numbers_and_abbreviations_stay_in_their_sentence(voice: PiperVoice) -> None:
    assert len(voice.phonemize("Dr. Smith paid 3.50 at 10:30, e.g. today.")) == 1


def test_long_clause_is_not_truncated(voice: PiperVoice) -> None:
    text = " ".join(["elephant"] * 120) + "."
    (phonemes,) = voice.phonemize(text)
    assert phonemes.count("ˈɛlɪfənt") == 120


def _waiting_espeak(voice: PiperVoice) -> subprocess.Popen[bytes]:
    """The espeak-ng process started for the voice's next call (a helper thread starts it)."""
    for _ in range(200):
        proc = voice._espeak._ready
        if proc is not None:
            return proc
        time.sleep(0.01)
    raise AssertionError("no espeak-ng process was started ahead")


def test_espeak_runs_in_a_process_started_before_the_call() -> None:
    voice = PiperVoice(MODEL, CONFIG)
    waiting = _waiting_espeak(voice)
    assert waiting.poll() is None  # started at load, waiting for text
    (phonemes,) = voice.phonemize("The capital of France.")
    assert "fɹˈæns" in phonemes
    assert waiting.poll() == 0  # that process did the call
    following = _waiting_espeak(voice)
    assert following is not waiting and following.poll() is None
    following.kill()  # one that dies while waiting is replaced by a fresh start
    following.wait()
    assert "lˈoʊ" in voice.phonemize("Hello.")[0]
    last = _waiting_espeak(voice)
    voice.close()  # stops the waiting process; calls still work, without one
    assert last.poll() is not None
    assert "lˈoʊ" in voice.phonemize("Hello.")[0]
    time.sleep(0.05)
    assert voice._espeak._ready is None


def test_bad_files_raise_naming_the_file(tmp_path: Path) -> None:
    bad_config = tmp_path / "bad.onnx.json"
    bad_config.write_text("{not json")
    with pytest.raises(PiperVoiceError, match=re.escape("bad.onnx.json")):
        PiperVoice(MODEL, bad_config)
    bad_model = tmp_path / "bad.onnx"
    bad_model.write_bytes(b"not an onnx model")
    with pytest.raises(PiperVoiceError, match=re.escape("bad.onnx")):
        PiperVoice(bad_model, CONFIG)
    with pytest.raises(PiperVoiceError, match=re.escape("missing.onnx")):
        PiperVoice(tmp_path / "missing.onnx", CONFIG)


def test_livekit_tts(voice: PiperVoice) -> None:
    async def run() -> None:
        tts = PiperTTS(voice)
        assert tts.model == "en_US-joe-medium" and tts.provider == "piper"
        assert tts.sample_rate == 22050 and tts.num_channels == 1
        assert not tts.capabilities.streaming
        frame = await tts.synthesize("Hello there.").collect()
        assert frame.sample_rate == 22050 and frame.num_channels == 1
        assert frame.duration > 0.3
        # nothing speakable: no error, only a short silence
        frame = await tts.synthesize("...").collect()
        assert frame.duration < 0.1
        await tts.aclose()

    asyncio.run(run())


def test_livekit_tts_cancel(voice: PiperVoice) -> None:
    async def run() -> None:
        tts = PiperTTS(voice)
        stream = tts.synthesize("One sentence here. " * 20)
        first = await stream.__anext__()
        assert first.frame.sample_rate == 22050
        await stream.aclose()  # the user interrupted: must return promptly
        await tts.aclose()

    asyncio.run(asyncio.wait_for(run(), timeout=10))


def test_import_does_not_pull_gpl_piper() -> None:
    code = textwrap.dedent(
        """
        import sys
        import appliance.plugins.piper.tts
        bad = [m for m in sys.modules if m.startswith("piper")]
        print(bad)
        assert not bad, bad
        """
    )
    root = Path(__file__).resolve().parents[1]
    subprocess.run([sys.executable, "-c", code], check=True, cwd=root)


def test_replies_are_cut_into_clauses_and_a_short_first_chunk() -> None:
    from appliance.plugins.piper.text import split_clauses, split_first_words
    from appliance.plugins.piper.tts import ClauseTokenizer

    text = "Dr. Smith is in, and 3.5 is a number; yes. Done"
    assert [c for c, _, _ in split_clauses(text)] == [
        "Dr. Smith is in,",
        "and 3.5 is a number;",
        "yes.",
        "Done",
    ]
    cut = split_first_words("The boiling point of water is 100 degrees.", 3)
    assert [c for c, _, _ in cut] == ["The boiling point,", "of water is 100 degrees."]
    assert [c for c, _, _ in split_first_words("A week is.", 3)] == ["A week is."]

    async def stream(text: str) -> list[str]:
        sentences = ClauseTokenizer().stream()
        for i in range(0, len(text), 2):  # as an LLM streams it
            sentences.push_text(text[i : i + 2])
        sentences.end_input()
        return [t.token async for t in sentences]

    tokens = asyncio.run(stream("The capital of France is Paris. So, it is big, old and lovely."))
    # only the reply's first clause is cut after three words; a clause under 8 characters
    # ("So,") rides with the next one
    assert tokens == [
        "The capital of,",
        "France is Paris.",
        "So, it is big,",
        "old and lovely.",
    ]


def test_streamed_replies_are_spoken_clause_by_clause(voice: PiperVoice) -> None:
    async def main() -> tuple[int, list[int]]:
        engine = PiperTTS(voice, clauses=True)
        assert engine.capabilities.streaming
        sizes: list[int] = []
        async with engine.stream() as stream:
            for word in [
                "Paris",
                "is",
                "the",
                "capital",
                "of",
                "France,",
                "and",
                "it",
                "is",
                "lovely.",
            ]:
                stream.push_text(word + " ")
            stream.end_input()
            async for ev in stream:
                sizes.append(ev.frame.samples_per_channel)
        await engine.aclose()
        return len(sizes), sizes

    count, sizes = asyncio.run(main())
    assert count > 1 and sum(sizes) > voice.sample_rate  # over a second of speech


class _RecordingPriority(Priority):
    """Counts the urgent jobs."""

    def __init__(self) -> None:
        super().__init__()
        self.urgent_jobs = 0

    @contextmanager
    def urgent(self) -> Iterator[None]:
        self.urgent_jobs += 1
        with super().urgent():
            yield


def test_a_replys_first_chunk_renders_as_urgent_with_more_threads() -> None:
    voice = PiperVoice(MODEL, CONFIG, threads=1, urgent_threads=2)
    phonemes = voice.phonemize("The boiling point")[0]
    plain, urgent = (
        voice.synthesize_phonemes(phonemes),
        voice.synthesize_phonemes(phonemes, urgent=True),
    )
    # the same voice on two threads (the noise in Piper's durations makes it vary a little)
    assert 0.7 < len(urgent) / len(plain) < 1.4 and _rms(urgent) > 500
    assert PiperVoice(MODEL, CONFIG, threads=2, urgent_threads=2)._urgent_models == []

    priority = _RecordingPriority()

    async def main() -> int:
        engine = PiperTTS(voice, clauses=True, priority=priority)
        frames = 0
        for _ in range(2):  # two replies: each has one urgent first chunk
            async with engine.stream() as stream:
                stream.push_text("The boiling point of water is one hundred degrees, at sea level.")
                stream.end_input()
                async for _ev in stream:
                    frames += 1
        await engine.aclose()
        return frames

    assert asyncio.run(main()) > 2
    assert priority.urgent_jobs == 2


SHA256 = manifest.load().models["piper/en_US-joe-medium"].file(".onnx").sha256
LONG = "To convert an hour to minutes, you multiply the number of hours by sixty."


def _still_voice(tmp_path: Path, parts: tuple[Path, Path] | None = None) -> PiperVoice:
    """The voice without its random noise (noise_scale = noise_w = 0): the same phonemes
    always give the same frames, so a split decode can be compared with a whole one."""
    config = json.loads(CONFIG.read_text())
    config["inference"].update(noise_scale=0.0, noise_w=0.0)
    path = tmp_path / "still.onnx.json"
    path.write_text(json.dumps(config))
    return PiperVoice(MODEL, path, parts=parts)


class _RecordingVocoder:
    """A vocoder session that records how many frames each run decodes."""

    def __init__(self, session: Any) -> None:
        self.session, self.frames = session, []

    def get_inputs(self) -> Any:
        return self.session.get_inputs()

    def run(self, outputs: Any, feed: dict[str, np.ndarray], options: Any = None) -> Any:
        self.frames.append(next(iter(feed.values())).shape[-1])
        return self.session.run(outputs, feed, options)


def test_a_replys_first_audio_comes_before_its_sentence_is_decoded(tmp_path: Path) -> None:
    parts = split_voice(MODEL, SHA256, tmp_path / "cache")
    assert parts is not None and all(p.stat().st_size for p in parts)
    split, whole = _still_voice(tmp_path, parts), _still_voice(tmp_path)
    phonemes = split.phonemize(LONG)[0]
    vocoder = split._models[1] = _RecordingVocoder(split._models[1])
    pieces = split.pieces(phonemes, urgent=True)
    first = next(pieces)
    # the first audio is out after the vocoder ran over the first frames only
    assert vocoder.frames == [FIRST_PIECE_FRAMES + VOCODER_CONTEXT]
    assert 0 < len(first) <= FIRST_PIECE_FRAMES * 256
    rest = list(pieces)
    assert rest and sum(vocoder.frames) > len(vocoder.frames) * FIRST_PIECE_FRAMES
    joined = np.concatenate([first, *rest]).astype(np.int32)
    # the pieces join exactly (float rounding aside): as one decode, and as the whole model
    (alone,) = split.pieces(phonemes)  # not urgent: one piece
    reference = whole.synthesize_phonemes(phonemes)
    assert len(joined) == len(alone) == len(reference) > 3 * 22050
    assert np.abs(joined - alone).max() <= 1 and np.abs(joined - reference).max() <= 1


def test_a_voice_that_cannot_be_split_runs_whole(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = tmp_path / "cache"
    parts = split_voice(MODEL, SHA256, cache)
    assert parts is not None
    stamps = [p.stat().st_mtime_ns for p in parts]
    assert split_voice(MODEL, SHA256, cache) == parts  # made once, then reused
    assert [p.stat().st_mtime_ns for p in parts] == stamps
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    assert split_voice(MODEL, SHA256, blocked) is None  # the cache cannot be written
    # another graph (no Piper vocoder in it): no parts, the voice runs whole
    assert split_voice(model_file("smart-turn/v3.2", ".onnx"), "0" * 64, cache) is None
    assert "runs whole" in caplog.text
    # parts that do not load: the whole model is loaded instead
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not an onnx model")
    voice = PiperVoice(MODEL, CONFIG, parts=(bad, bad))
    assert len(voice._models) == 1 and "running the voice whole" in caplog.text
    assert len(list(voice.pieces(voice.phonemize(LONG)[0], urgent=True))) == 1
    assert _rms(voice.synthesize("Hello there.")) > 500
    # a vocoder that reaches further than the context given: checked at load, run whole
    monkeypatch.setattr(piper_engine, "VOCODER_CONTEXT", 6)
    caplog.clear()
    voice = PiperVoice(MODEL, CONFIG, parts=parts)
    assert len(voice._models) == 1 and "reaches past 6 frames" in caplog.text


def test_a_rendered_text_is_kept_until_newer_ones_push_it_out(voice: PiperVoice) -> None:
    kept = voice.rendered("Hello there.")
    assert _rms(kept) > 500 and voice.rendered("Hello there.") is kept
    for n in range(RENDERED_KEEP):
        voice.rendered(f"Number {n}.")
    assert voice.rendered("Hello there.") is not kept  # the oldest went
