"""smart-turn v3.2 end-of-turn detector: features, real-model predictions, livekit stream."""

from __future__ import annotations

import asyncio
import concurrent.futures
import math
import os
import re
import shutil
import subprocess
import threading
import wave
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc
from livekit.agents.language import LanguageCode

from appliance.plugins.smart_turn.detector import SmartTurnDetector
from appliance.plugins.smart_turn.engine import (
    MODEL_NAME,
    PROVIDER,
    SmartTurnModel,
    SmartTurnModelError,
)

MODELS_DIR = Path(
    os.environ.get("APPLIANCE_MODELS_DIR") or "~/.local/share/appliance/models"
).expanduser()
MODEL_PATH = MODELS_DIR / "smart-turn-v3.2" / "smart-turn-v3.2-cpu.onnx"
COMPLETE = "I would like to book a table for two people tonight."
TRUNCATED = "I would like to book a table for"

pytestmark = pytest.mark.skipif(
    not MODEL_PATH.is_file(), reason=f"smart-turn model not installed at {MODEL_PATH}"
)


# -- reference features, written from the model card's description --------------------------


def _hz_to_mel(f: np.ndarray | float) -> np.ndarray:
    """Slaney mel scale: linear below 1 kHz, logarithmic above."""
    f = np.asarray(f, dtype=np.float64)
    log_part = 15.0 + np.log(np.maximum(f, 1e-10) / 1000.0) / (np.log(6.4) / 27.0)
    return np.where(f >= 1000.0, log_part, f * 3.0 / 200.0)


def _mel_to_hz(m: np.ndarray | float) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    return np.where(m >= 15.0, 1000.0 * np.exp((np.log(6.4) / 27.0) * (m - 15.0)), m * 200.0 / 3.0)


def _slaney_mel_filters(n_mels: int = 80, n_fft: int = 400, sr: int = 16000) -> np.ndarray:
    hz = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(sr / 2), n_mels + 2))
    bins = np.arange(n_fft // 2 + 1) * sr / n_fft
    filters = np.zeros((n_mels, len(bins)))
    for i in range(n_mels):
        rising = (bins - hz[i]) / (hz[i + 1] - hz[i])
        falling = (hz[i + 2] - bins) / (hz[i + 2] - hz[i + 1])
        filters[i] = np.maximum(0.0, np.minimum(rising, falling)) * 2.0 / (hz[i + 2] - hz[i])
    return filters


def reference_features(pcm16k: np.ndarray) -> np.ndarray:
    """float64 reference: 8 s window, normalise, Whisper log-mel, 80 x 800."""
    x = np.asarray(pcm16k)
    x = x.astype(np.float64) / 32768.0 if x.dtype == np.int16 else x.astype(np.float64)
    x = x[-128000:]
    x = np.concatenate([np.zeros(128000 - len(x)), x])
    x = (x - x.mean()) / np.sqrt(x.var() + 1e-7)
    padded = np.pad(x, 200, mode="reflect")
    frames = np.lib.stride_tricks.sliding_window_view(padded, 400)[::160]  # 801 frames
    window = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(400) / 400)  # periodic Hann
    power = np.abs(np.fft.rfft(frames * window, axis=-1)) ** 2
    mel = _slaney_mel_filters() @ power.T
    log_mel = np.log10(np.maximum(mel, 1e-10))[:, :-1]
    log_mel = np.maximum(log_mel, log_mel.max() - 8.0)
    return (log_mel + 4.0) / 4.0


# -- audio helpers ----------------------------------------------------------------------------


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited (FFT) resampling of float audio."""
    n_out = round(len(x) * sr_out / sr_in)
    spec = np.fft.rfft(np.asarray(x, dtype=np.float64))
    out = np.zeros(n_out // 2 + 1, dtype=complex)
    k = min(len(spec), len(out))
    out[:k] = spec[:k]
    return np.fft.irfft(out, n_out) * (n_out / len(x))


def to_int16(x: np.ndarray) -> np.ndarray:
    return (np.clip(x, -1.0, 1.0) * 32767.0).astype(np.int16)


def espeak_16k(text: str, out: Path, silence_s: float = 0.3) -> np.ndarray:
    """espeak-ng speech at 16 kHz (int16), its own trailing silence replaced by silence_s."""
    subprocess.run(["espeak-ng", "-w", str(out), text], check=True, capture_output=True)
    with wave.open(str(out), "rb") as w:
        assert w.getnchannels() == 1 and w.getsampwidth() == 2
        sr = w.getframerate()
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype=np.int16)
    audio = resample(pcm / 32768.0, sr, 16000)
    voiced = np.nonzero(np.abs(audio) > 1e-3)[0]
    audio = audio[: voiced[-1] + 1]
    return to_int16(np.concatenate([audio, np.zeros(round(silence_s * 16000))]))


def frames_48k(pcm16k: np.ndarray) -> list[rtc.AudioFrame]:
    """The audio upsampled to 48 kHz, as 10 ms frames."""
    pcm48 = to_int16(resample(pcm16k / 32768.0, 16000, 48000))
    pcm48 = np.pad(pcm48, (0, -len(pcm48) % 480))
    return [
        rtc.AudioFrame(
            data=pcm48[i : i + 480].tobytes(),
            sample_rate=48000,
            num_channels=1,
            samples_per_channel=480,
        )
        for i in range(0, len(pcm48), 480)
    ]


def quick_resample_16k(frames: list[rtc.AudioFrame]) -> np.ndarray:
    """The frames through a resampler like the stream's own (QUICK, not flushed)."""
    resampler = rtc.AudioResampler(
        input_rate=48000, output_rate=16000, num_channels=1, quality=rtc.AudioResamplerQuality.QUICK
    )
    out = [np.frombuffer(f.data, dtype=np.int16) for fr in frames for f in resampler.push(fr)]
    return np.concatenate(out)


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> SmartTurnModel:
    return SmartTurnModel(MODEL_PATH, threads=1)


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    tmp = tmp_path_factory.mktemp("espeak")
    return {
        "complete": espeak_16k(COMPLETE, tmp / "complete.wav"),
        "truncated": espeak_16k(TRUNCATED, tmp / "truncated.wav"),
    }


# -- the model --------------------------------------------------------------------------------


def test_features_match_reference(model: SmartTurnModel, speech: dict[str, np.ndarray]) -> None:
    rng = np.random.default_rng(1)
    cases = {
        "speech int16": speech["complete"],
        "speech float32": (speech["truncated"] / 32768.0).astype(np.float32),
        "noise 3 s": rng.normal(0, 0.1, 48000).astype(np.float32),
        "noise 10 s int16": to_int16(rng.normal(0, 0.2, 160000)),
        "1 sample": np.array([1000], dtype=np.int16),
        "empty": np.zeros(0, dtype=np.int16),
    }
    for name, audio in cases.items():
        feats = model.features(audio)
        assert feats.shape == (80, 800) and feats.dtype == np.float32, name
        diff = float(np.max(np.abs(feats - reference_features(audio))))
        print(f"features {name}: max abs diff {diff:.2e}")
        assert diff < 1e-3, name


def test_load_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "nope.onnx"
    with pytest.raises(SmartTurnModelError, match=re.escape(str(missing))):
        SmartTurnModel(missing)
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"not an onnx model" * 100)
    with pytest.raises(SmartTurnModelError, match=re.escape(str(corrupt))):
        SmartTurnModel(corrupt)


def test_predict_any_length(model: SmartTurnModel, speech: dict[str, np.ndarray]) -> None:
    for n in (0, 1, 1600, 128000, 320000):
        p = model.predict(np.zeros(n, dtype=np.int16))
        assert math.isfinite(p) and 0.0 <= p <= 1.0, n
    long = np.concatenate(
        [np.random.default_rng(2).integers(-3000, 3000, 128000), speech["complete"]]
    )
    long = long.astype(np.int16)
    assert len(long) > 128000
    assert model.predict(long) == pytest.approx(model.predict(long[-128000:]), abs=1e-6)


def test_complete_sentence_scores_higher(
    model: SmartTurnModel, speech: dict[str, np.ndarray]
) -> None:
    p_complete = model.predict(speech["complete"])
    p_truncated = model.predict(speech["truncated"])
    print(
        f"\nespeak-ng: complete {COMPLETE!r} -> {p_complete:.4f}; "
        f"truncated {TRUNCATED!r} -> {p_truncated:.4f}"
    )
    for p in (p_complete, p_truncated):
        assert math.isfinite(p) and 0.0 <= p <= 1.0
    assert p_complete > p_truncated


# -- the livekit stream -----------------------------------------------------------------------


def test_stream_matches_model(model: SmartTurnModel, speech: dict[str, np.ndarray]) -> None:
    frames = frames_48k(speech["complete"])
    as_resampled = quick_resample_16k(frames)
    direct = model.predict(speech["complete"])
    silence_p = model.predict(np.zeros(0, dtype=np.int16))

    async def main() -> None:
        detector = SmartTurnDetector(model)
        assert detector.model == MODEL_NAME and detector.provider == PROVIDER
        assert detector.describe_options()["unlikely_threshold"] == 0.5
        metrics: list[object] = []
        detector.on("metrics_collected", metrics.append)
        for lang in (LanguageCode("en"), LanguageCode("en-US"), None):
            assert await detector.supports_language(lang)
            assert await detector.unlikely_threshold(lang) == 0.5
            assert await detector.backchannel_threshold(lang) is None

        stream = detector.stream()
        assert stream.model == MODEL_NAME and stream.provider == PROVIDER
        assert await stream.supports_language(LanguageCode("en"))
        assert await stream.unlikely_threshold(LanguageCode("en")) == 0.5

        for frame in frames:
            stream.push_audio(frame)
        superseded = stream.predict()
        fut = stream.predict()
        assert superseded.done() and superseded.result().end_of_turn_probability == 0.0
        event = await asyncio.wait_for(fut, 10)
        assert event.type == "eot_prediction"
        assert event.inference_duration is not None and event.inference_duration > 0
        # the 16 kHz audio the stream made of the 48 kHz frames (and ran the model on)
        buffered = stream.buffered_audio()
        expected = model.predict(buffered)
        print(
            f"\nstream (48 kHz frames): {event.end_of_turn_probability:.4f}; model on the same "
            f"16 kHz audio: {expected:.4f}; on the original 16 kHz audio: {direct:.4f}; "
            f"inference {event.inference_duration * 1000:.1f} ms"
        )
        assert event.end_of_turn_probability == pytest.approx(expected, abs=1e-3)
        # resampled 48 -> 16 kHz: a QUICK resampler of our own gives the same samples, up to
        # the +-1-2 LSB random dither livekit's resampler adds (so not bit for bit)
        assert len(buffered) == len(as_resampled)
        assert abs(len(buffered) - len(speech["complete"])) < 160
        assert np.max(np.abs(buffered.astype(np.int32) - as_resampled)) <= 4
        assert len(metrics) == 1

        stream.flush()
        after_flush = await asyncio.wait_for(stream.predict(), 10)
        assert len(stream.buffered_audio()) == 0
        assert math.isfinite(after_flush.end_of_turn_probability)
        assert after_flush.end_of_turn_probability == pytest.approx(silence_p, abs=1e-3)

        await stream.aclose()
        closed = stream.predict()  # a closed stream answers at once with the default
        assert closed.done() and closed.result().end_of_turn_probability == 1.0

    asyncio.run(main())


class _ThreadRecordingModel(SmartTurnModel):
    """The real model, noting which thread each prediction ran on."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self.threads: list[threading.Thread] = []

    def predict(self, pcm16k: np.ndarray) -> float:
        self.threads.append(threading.current_thread())
        return super().predict(pcm16k)


@pytest.mark.parametrize("use_executor", [True, False], ids=["executor", "to_thread"])
def test_inference_runs_off_the_event_loop(
    speech: dict[str, np.ndarray], use_executor: bool
) -> None:
    model = _ThreadRecordingModel(MODEL_PATH)
    audio = np.concatenate([speech["complete"]] * 3)  # a full 8 s window

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="turn-test") as pool:
            detector = SmartTurnDetector(model, executor=pool if use_executor else None)
            stream = detector.stream()
            pcm = audio.tobytes()
            for i in range(0, len(audio) - 160, 160):
                stream.push_audio(rtc.AudioFrame(pcm[2 * i : 2 * i + 320], 16000, 1, 160))
            fut = stream.predict()
            await asyncio.sleep(0.001)  # completes on the loop while the model still runs
            assert not fut.done()
            event = await asyncio.wait_for(fut, 10)
            assert 0.0 <= event.end_of_turn_probability <= 1.0
            await stream.aclose()

    asyncio.run(main())
    assert len(model.threads) == 1
    assert model.threads[0] is not threading.main_thread()
    if use_executor:
        assert model.threads[0].name.startswith("turn-test")


# -- the head start at the first pause --------------------------------------------------------


class _RecordingModel(SmartTurnModel):
    """The real model, noting how much audio each prediction saw and what it said. While
    `doubting`, every verdict is "not done" (to reach the re-check)."""

    def __init__(self, path: Path, *, doubting: bool = False) -> None:
        super().__init__(path)
        self.calls: list[tuple[int, float]] = []
        self.doubting = doubting

    def predict(self, pcm16k: np.ndarray) -> float:
        p = 0.1 if self.doubting else super().predict(pcm16k)
        self.calls.append((len(pcm16k), p))
        return p


def _frames_16k(pcm: np.ndarray) -> list[rtc.AudioFrame]:
    data = pcm[: len(pcm) // 160 * 160].astype(np.int16).tobytes()
    return [rtc.AudioFrame(data[i : i + 320], 16000, 1, 160) for i in range(0, len(data), 320)]


async def _early_then_ask(model: _RecordingModel, parts: list[np.ndarray]) -> tuple[float, int]:
    """Feed the parts (speech and pauses) in real time to a shared Silero VAD stream and a
    detector stream, as a session does, and ask for a prediction once the last pause has
    lasted 250 ms. Returns the probability and the number of model calls before the ask."""
    from livekit.agents import inference

    from appliance.plugins.shared_vad import SharedVAD

    shared = SharedVAD(inference.VAD(model="silero"))
    session_vad = shared.stream()
    drain = asyncio.create_task(_drain(session_vad))
    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="turn-test") as pool:
        stream = SmartTurnDetector(model, executor=pool, vad=shared).stream()
        for frame in _frames_16k(np.concatenate(parts)):
            stream.push_audio(frame)
            session_vad.push_frame(frame)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # the VAD's last windows
        calls_before = len(model.calls)
        model.doubting = False
        event = await asyncio.wait_for(stream.predict(), 10)
        await stream.aclose()
    await session_vad.aclose()
    drain.cancel()
    return event.end_of_turn_probability, calls_before


async def _drain(stream: object) -> None:
    async for _ in stream:  # type: ignore[attr-defined]
        pass


def _last_loud(pcm: np.ndarray) -> int:
    return int(np.flatnonzero(np.abs(pcm.astype(np.int32)) > 300)[-1])


def test_the_prediction_starts_at_the_pause_and_answers_the_session(
    speech: dict[str, np.ndarray],
) -> None:
    model = _RecordingModel(MODEL_PATH)
    pause = np.zeros(int(0.4 * 16000), np.int16)
    prob, before = asyncio.run(_early_then_ask(model, [speech["complete"], pause]))
    print(f"\ncalls (samples seen, p): {model.calls}")
    # the model ran in the pause after the last word, before the session asked; a pause
    # between words (espeak-ng leaves one) may have started one before, dropped since
    assert before >= 1 and len(model.calls) == before
    assert model.calls[-1][0] > _last_loud(speech["complete"])
    assert prob == pytest.approx(model.calls[-1][1])


def test_the_early_prediction_starts_at_the_first_dip_of_the_vad(
    speech: dict[str, np.ndarray],
) -> None:
    """A window below EARLY_BELOW starts it before Silero calls the window quiet (< 0.5)."""
    from livekit.agents import inference, vad

    from appliance.plugins.shared_vad import SharedVAD

    model = _RecordingModel(MODEL_PATH)

    async def main() -> None:
        with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="turn-test") as pool:
            detector = SmartTurnDetector(
                model, executor=pool, vad=SharedVAD(inference.VAD(model="silero"))
            )
            stream = detector.stream()
            for frame in _frames_16k(speech["complete"]):
                stream.push_audio(frame)
            transport = stream._smart_transport  # type: ignore[attr-defined]

            def window(probability: float) -> None:
                transport._on_vad_event(
                    vad.VADEvent(
                        type=vad.VADEventType.INFERENCE_DONE,
                        samples_index=0,
                        timestamp=0.0,
                        speech_duration=0.0,
                        silence_duration=0.0,
                        probability=probability,
                    )
                )

            window(1.0)
            assert transport._early is None
            window(0.7)  # still speech to Silero's 0.5 threshold, but the voice is fading
            early = transport._early
            assert early is not None
            window(0.2)  # the pause goes on: no second prediction
            assert transport._early is early
            p = await early
            assert model.calls == [(len(speech["complete"]) // 160 * 160, pytest.approx(p))]
            window(0.95)  # the user speaks again
            assert transport._early is None
            await stream.aclose()

    asyncio.run(main())


def test_speech_after_an_early_prediction_drops_it(speech: dict[str, np.ndarray]) -> None:
    model = _RecordingModel(MODEL_PATH)
    short = np.zeros(int(0.15 * 16000), np.int16)  # a pause the VAD does not end speech on
    pause = np.zeros(int(0.4 * 16000), np.int16)
    parts = [speech["truncated"], short, speech["complete"], pause]
    prob, before = asyncio.run(_early_then_ask(model, parts))
    print(f"\ncalls (samples seen, p): {model.calls}")
    assert before >= 2 and len(model.calls) == before  # one in each pause at least
    words_end = len(speech["truncated"]) + len(short) + _last_loud(speech["complete"])
    assert model.calls[0][0] < words_end < model.calls[-1][0]
    assert prob == pytest.approx(model.calls[-1][1])  # the one made on all the words


def test_an_early_not_done_is_checked_again_on_the_whole_pause(
    speech: dict[str, np.ndarray],
) -> None:
    model = _RecordingModel(MODEL_PATH, doubting=True)
    pause = np.zeros(int(0.4 * 16000), np.int16)
    prob, before = asyncio.run(_early_then_ask(model, [speech["complete"], pause]))
    assert len(model.calls) == before + 1  # asked again when the session asked
    assert model.calls[-1][0] > model.calls[-2][0]  # on more of the pause
    assert prob == pytest.approx(model.calls[-1][1]) and prob != 0.1
