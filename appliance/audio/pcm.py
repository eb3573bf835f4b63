"""PCM helpers and the session's audio format: the one place they are defined."""

from __future__ import annotations

import numpy as np
from livekit import rtc

SESSION_RATE = 16000  # what every bridge hands the AgentSession (int16 mono)
FRAME_MS = 20  # as the USB microphone and RTP deliver them


def resample(pcm: np.ndarray, src: int, dst: int) -> np.ndarray:
    """High-quality int16 mono resampling with livekit's resampler."""
    if src == dst or len(pcm) == 0:
        return pcm
    resampler = rtc.AudioResampler(src, dst, quality=rtc.AudioResamplerQuality.HIGH)
    frame = rtc.AudioFrame(pcm.tobytes(), src, 1, len(pcm))
    frames = resampler.push(frame) + resampler.flush()
    return np.concatenate([np.frombuffer(f.data, dtype=np.int16) for f in frames])


def mono16(frame: rtc.AudioFrame) -> np.ndarray:
    """A frame's samples as int16 mono (channels averaged)."""
    pcm = np.frombuffer(frame.data, dtype=np.int16).reshape(-1, frame.num_channels)
    if frame.num_channels == 1:
        return pcm[:, 0].copy()
    return np.asarray(pcm.mean(axis=1), dtype=np.int16)
