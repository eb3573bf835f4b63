"""WebRTC audio processing (livekit's `rtc.AudioProcessingModule`), one wrapper with presets.

`TELEPHONY` (noise suppression, high-pass, gain: narrow-band phone audio, as LiveKit picks a
telephony filter for SIP participants) cleans callers; `STANDARD` (suppression, high-pass)
cleans other room participants; `kiosk(cfg)` adds echo cancellation for the USB
speaker-microphone pair, fed with what was played (`played`).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from livekit import rtc

if TYPE_CHECKING:
    from appliance.config import AudioConfig

RATES = (8000, 16000, 32000, 48000)  # what the APM takes, 10 ms at a time


@dataclass(frozen=True)
class Preset:
    echo_cancellation: bool = False
    noise_suppression: bool = True
    high_pass_filter: bool = True
    auto_gain_control: bool = False
    echo_delay_ms: int = 0  # from a block being played to its echo being captured


TELEPHONY = Preset(auto_gain_control=True)
STANDARD = Preset()


def kiosk(cfg: AudioConfig) -> Preset:
    """The `[audio]` processing of the kiosk's microphone."""
    return Preset(
        echo_cancellation=cfg.echo_cancellation,
        noise_suppression=cfg.noise_suppression,
        high_pass_filter=cfg.high_pass_filter,
        auto_gain_control=cfg.auto_gain_control,
        echo_delay_ms=cfg.echo_delay_ms,
    )


class AudioProcessor:
    """One APM for one stream of mono 16-bit audio; safe to call from several threads (the
    USB capture and playback threads take turns)."""

    def __init__(self, preset: Preset) -> None:
        self.preset = preset
        self.enabled = (
            preset.echo_cancellation or preset.noise_suppression or preset.auto_gain_control
        )
        self._apm = rtc.AudioProcessingModule(
            echo_cancellation=preset.echo_cancellation,
            noise_suppression=preset.noise_suppression,
            high_pass_filter=preset.high_pass_filter,
            auto_gain_control=preset.auto_gain_control,
        )
        self._lock = threading.Lock()

    def process(self, pcm: np.ndarray, rate: int) -> np.ndarray:
        """The cleaned copy of `pcm` (whole 10 ms pieces; a rate the APM does not take, or
        a trailing part piece, passes unchanged)."""
        if not self.enabled or rate not in RATES:
            return pcm
        out = np.array(pcm, np.int16)
        step = rate // 100
        with self._lock:
            if self.preset.echo_cancellation:
                self._apm.set_stream_delay_ms(self.preset.echo_delay_ms)
            for start in range(0, len(out) - step + 1, step):
                piece = rtc.AudioFrame(out[start : start + step].tobytes(), rate, 1, step)
                self._apm.process_stream(piece)
                out[start : start + step] = np.frombuffer(piece.data, np.int16)
        return out

    def played(self, pcm: np.ndarray, rate: int) -> None:
        """What the speaker played (the echo canceller's reference)."""
        if not self.preset.echo_cancellation or rate not in RATES:
            return
        step = rate // 100
        with self._lock:
            for start in range(0, len(pcm) - step + 1, step):
                piece = rtc.AudioFrame(pcm[start : start + step].tobytes(), rate, 1, step)
                self._apm.process_reverse_stream(piece)
