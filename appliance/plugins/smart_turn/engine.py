"""pipecat's smart-turn v3.2 audio model (ONNX, BSD-2): P(turn complete) for the last 8 s of
16 kHz speech, read as a Whisper log-mel spectrogram (80 x 800). No livekit import: the
livekit turn detector around it is `appliance.plugins.smart_turn.detector`.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnxruntime as ort
from faster_whisper.feature_extractor import FeatureExtractor

if TYPE_CHECKING:
    from numpy.typing import NDArray

MODEL_NAME = "smart-turn-v3.2"
PROVIDER = "pipecat"
SAMPLE_RATE = 16000
WINDOW_SECONDS = 8
WINDOW_SAMPLES = WINDOW_SECONDS * SAMPLE_RATE
N_MELS = 80
N_FRAMES = WINDOW_SAMPLES // 160  # hop 160 -> 800 frames
UNLIKELY_THRESHOLD = 0.5
"""P(turn complete) below this makes the session wait its max endpointing delay."""

_NORM_EPS = 1e-7


class SmartTurnModelError(RuntimeError):
    """The smart-turn ONNX file is missing, unreadable or not the expected model."""


def prepare_waveform(pcm16k: np.ndarray) -> NDArray[np.float32]:
    """Last 8 s of mono 16 kHz audio, left-padded with zeros, normalised to zero mean and
    unit variance (float32, 128000 samples). int16 input is scaled to [-1, 1) first."""
    audio = np.asarray(pcm16k)
    if audio.ndim == 2 and 1 in audio.shape:
        audio = audio.reshape(-1)
    if audio.ndim != 1:
        raise ValueError(f"expected mono audio (1-D array), got shape {audio.shape}")
    if audio.dtype == np.int16:
        audio = audio[-WINDOW_SAMPLES:].astype(np.float32) / 32768.0
    else:
        audio = audio[-WINDOW_SAMPLES:].astype(np.float32)
    if len(audio) < WINDOW_SAMPLES:
        audio = np.pad(audio, (WINDOW_SAMPLES - len(audio), 0))
    normalised = (audio - audio.mean()) / np.sqrt(audio.var() + np.float32(_NORM_EPS))
    return normalised.astype(np.float32, copy=False)


class SmartTurnModel:
    """The loaded ONNX session: once per process, shared by sessions (thread-safe)."""

    def __init__(self, model_path: str | Path, *, threads: int = 1) -> None:
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise SmartTurnModelError(f"smart-turn model file not found: {path}")
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            self._session = ort.InferenceSession(
                str(path), sess_options=opts, providers=["CPUExecutionProvider"]
            )
        except Exception as e:
            raise SmartTurnModelError(
                f"could not load the smart-turn model {path} (unreadable or corrupt): {e}"
            ) from e
        inputs, outputs = self._session.get_inputs(), self._session.get_outputs()
        if (
            len(inputs) != 1
            or inputs[0].name != "input_features"
            or list(inputs[0].shape[1:]) != [N_MELS, N_FRAMES]
            or not outputs
        ):
            shapes = [(i.name, i.shape) for i in inputs]
            raise SmartTurnModelError(
                f"{path} is not a smart-turn v3 model: inputs {shapes}, "
                f"expected input_features [batch, {N_MELS}, {N_FRAMES}]"
            )
        self._input_name = inputs[0].name
        self._output_name = outputs[0].name
        self._path = path
        self._extractor = FeatureExtractor(
            feature_size=N_MELS, sampling_rate=SAMPLE_RATE, chunk_length=WINDOW_SECONDS
        )

    @property
    def path(self) -> Path:
        return self._path

    def features(self, pcm16k: np.ndarray) -> NDArray[np.float32]:
        """The model input for this audio: a float32 [80, 800] Whisper log-mel spectrogram."""
        waveform = prepare_waveform(pcm16k)
        # 128000 samples, centred STFT -> 801 frames; faster-whisper drops the last one and
        # applies log10, the max-8 clamp and (x + 4) / 4. padding=0: no extra zeros appended.
        mel = self._extractor(waveform, padding=0)
        return np.ascontiguousarray(mel, dtype=np.float32)

    def predict(self, pcm16k: np.ndarray) -> float:
        """Blocking: P(turn complete) for int16 or float32 mono 16 kHz audio of any length."""
        feats = self.features(pcm16k)[np.newaxis]
        (out,) = self._session.run([self._output_name], {self._input_name: feats})
        return float(np.asarray(out).reshape(-1)[0])
