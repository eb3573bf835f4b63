"""`python -m bench audio`: figures for the USB audio bridge (echo, CPU, added latency).

1. Echo return loss enhancement (ERLE) of the bridge's echo canceller on a simulated
   speakerphone echo path: the Piper voice played by the "speaker", heard back by the
   "microphone" through a delay, an attenuation and a decaying reverberant tail, plus a
   little noise. ERLE = microphone power / power after the canceller, in dB, over the part
   where the speaker talks, after a convergence period.
2. CPU per second of audio of the capture path, as the microphone thread runs it: 10 ms
   device blocks at 48 kHz, resampled to 16 kHz, through the audio processing, into frames.
3. Latency the bridge adds: the resampler's delay, the audio processing's delay, the
   thread-to-event-loop hand-off, and (through the real PortAudio stack over ALSA file
   PCMs, so no sound card is needed) the time from a reply's first frame to the device.

Everything runs the production classes of `appliance.usbaudio`; nothing is assertion.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import shlex
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

from appliance.audio.pcm import resample
from appliance.config import AudioConfig, Config
from appliance.store.disk import file_path, models_dir
from appliance.store.integrity import require
from appliance.store.manifest import load as load_manifest
from bench.latency import machine_info, percentile

if TYPE_CHECKING:
    from appliance.plugins.piper.engine import PiperVoice
    from appliance.usb.audio import UsbAudio

RATE = 16000
BLOCK = RATE // 100
DEVICE_RATE = 48000
ECHO_DELAY_S = 0.03  # loudspeaker to microphone, plus the sound card's own buffering
ECHO_GAIN = 0.5  # -6 dB: a speakerphone's speaker close to its microphone
TAIL_S = 0.15  # reverberant tail after the direct path
NONLINEAR_DRIVE = 2.0  # tanh drive of the saturating loudspeaker
CONVERGE_S = 2.0
IDLE_S = 5.0
REPEATS = 10
LOUD = 300  # int16 amplitude that counts as sound
SENTENCES = (
    "Welcome to the museum. The exhibition on the first floor is open until six.",
    "Guided tours start every hour from the main hall, and the cafe serves lunch until three.",
    "If you need help, ask any of the staff in the blue jackets.",
)
USER_SENTENCES = (
    "Excuse me, where can I find the toilets?",
    "And is there a place to leave my coat?",
    "Thank you very much.",
)
PROCESSING = {
    "off": {},
    "aec": {"echo_cancellation": True},
    "aec+ns+hpf": {"echo_cancellation": True, "noise_suppression": True, "high_pass_filter": True},
    "production": {
        "echo_cancellation": True,
        "noise_suppression": True,
        "high_pass_filter": True,
        "auto_gain_control": True,
    },
}


def audio_config(processing: str, **over: Any) -> AudioConfig:
    """An [audio] section with only the named processing stages on."""
    off = {k: False for k in PROCESSING["production"]}
    return AudioConfig(enabled=True, **{**off, **PROCESSING[processing], **over})


def load_voice(config: Config) -> PiperVoice:
    """The configured Piper voice, verified."""
    from appliance.plugins.piper.engine import PiperVoice

    entry = load_manifest(config.models.manifest).models[config.models.tts]
    root = models_dir(config.models.dir)
    require([entry], root)
    onnx = file_path(entry, entry.file(".onnx").name, root)
    return PiperVoice(onnx, file_path(entry, entry.file(".onnx.json").name, root))


def speech(voice: PiperVoice, texts: tuple[str, ...], pause_s: float = 0.5) -> np.ndarray:
    """The texts read with pauses between them, int16 at 16 kHz."""
    pause = np.zeros(int(pause_s * RATE), np.int16)
    parts = [pause]
    for text in texts:
        parts += [resample(voice.synthesize(text), voice.sample_rate, RATE), pause]
    return np.concatenate(parts)


def echo_path(far: np.ndarray, *, nonlinear: bool = False, seed: int = 7) -> np.ndarray:
    """What the microphone hears of the speaker: delayed, attenuated, reverberant, noisy.

    `nonlinear`: the small loudspeaker saturates on loud passages (a tanh curve), which a
    linear echo canceller cannot model.
    """
    rng = np.random.default_rng(seed)
    played = far.astype(np.float64)
    if nonlinear:
        played = 32768 / NONLINEAR_DRIVE * np.tanh(NONLINEAR_DRIVE * played / 32768)
    delay = int(ECHO_DELAY_S * RATE)
    tail = int(TAIL_S * RATE)
    ir = np.zeros(delay + tail)
    ir[delay] = ECHO_GAIN
    decay = np.exp(-np.arange(tail) / (tail / 6.9))  # -60 dB over the tail
    ir[delay + 1 :] = ECHO_GAIN * 0.3 * rng.standard_normal(tail - 1) * decay[1:]
    echo = np.convolve(played, ir)[: len(far)]
    noise = rng.standard_normal(len(far)) * 10.0  # about -70 dBFS
    return np.clip(echo + noise, -32768, 32767).astype(np.int16)


def _cancel(processing: str, far: np.ndarray, mic: np.ndarray, delay_ms: int) -> np.ndarray:
    from appliance.audio.processing import AudioProcessor, kiosk

    echo = AudioProcessor(kiosk(audio_config(processing, echo_delay_ms=delay_ms)))
    out = np.zeros_like(mic)
    for i in range(0, len(mic) - BLOCK + 1, BLOCK):
        echo.played(far[i : i + BLOCK], RATE)
        out[i : i + BLOCK] = echo.process(mic[i : i + BLOCK], RATE)
    return out


def _active(pcm: np.ndarray) -> np.ndarray:
    """Where `pcm` is sound, smoothed over 50 ms so an echo's tail is included."""
    loud = np.abs(pcm.astype(np.int32)) > LOUD
    return np.convolve(loud, np.ones(RATE // 20), mode="same") > 0


def erle(
    processing: str, far: np.ndarray, mic: np.ndarray, delay_ms: int, path: str
) -> dict[str, Any]:
    """ERLE where the far end talks (after converging): mic power / power after the bridge."""
    out = _cancel(processing, far, mic, delay_ms)
    window = _active(far)
    window[: int(CONVERGE_S * RATE)] = False
    return {
        "echo_path": path,
        "processing": processing,
        "echo_delay_ms": delay_ms,
        "erle_db": round(_dbfs(mic[window]) - _dbfs(out[window]), 1),
        "seconds": round(float(window.sum()) / RATE, 2),
    }


def double_talk(
    processing: str, far: np.ndarray, echo: np.ndarray, near: np.ndarray
) -> dict[str, Any]:
    """How much of the user's speech survives while the agent talks (and the echo's ERLE).

    `near_retained_db` is the gain of the output projected on the clean user speech (at
    the processing's own delay), over the samples where both talk: 0 dB is untouched, very
    negative means the user is muted while the agent speaks.
    """
    mic = np.clip(echo.astype(np.int32) + near, -32768, 32767).astype(np.int16)
    out = _cancel(processing, far, mic, round(ECHO_DELAY_S * 1000)).astype(np.float64)
    lag = _lag(near, out.astype(np.int16), RATE // 50)
    out = out[lag:]
    both = (_active(far) & (np.abs(near.astype(np.int32)) > LOUD))[: len(out)]
    both[: int(CONVERGE_S * RATE)] = False
    clean = near.astype(np.float64)[: len(out)][both]
    gain = float(np.dot(out[both], clean) / np.dot(clean, clean))
    return {
        "processing": processing,
        "near_retained_db": round(20 * np.log10(max(gain, 1e-6)), 1),
        "seconds": round(float(both.sum()) / RATE, 2),
    }


def capture_cpu(processing: str, mic: np.ndarray, repeats: int = 5) -> dict[str, Any]:
    """CPU milliseconds per second of audio of the capture path at DEVICE_RATE."""
    from livekit import rtc

    from appliance.audio.live import Rechunker
    from appliance.audio.processing import AudioProcessor, kiosk

    device = resample(mic, RATE, DEVICE_RATE)
    step = DEVICE_RATE // 100
    seconds = len(device) / DEVICE_RATE
    per_second = []
    for _ in range(repeats):
        echo = AudioProcessor(kiosk(audio_config(processing)))
        chunker = Rechunker(DEVICE_RATE, RATE, BLOCK)
        t0 = time.thread_time()
        for i in range(0, len(device) - step + 1, step):
            for piece in chunker.push(device[i : i + step], DEVICE_RATE):
                cleaned = echo.process(piece, RATE)
                rtc.AudioFrame(cleaned.tobytes(), RATE, 1, BLOCK)
        per_second.append((time.thread_time() - t0) / seconds * 1000)
    return {
        "processing": processing,
        "device_rate": DEVICE_RATE,
        "cpu_ms_per_audio_s_median": round(statistics.median(per_second), 2),
        "cpu_ms_per_audio_s_max": round(max(per_second), 2),
        "runs": repeats,
    }


def _lag(reference: np.ndarray, delayed: np.ndarray, max_lag: int) -> int:
    """The lag (samples) that best aligns `delayed` with `reference`."""
    a = reference.astype(np.float64)
    b = delayed.astype(np.float64)
    n = min(len(a), len(b)) - max_lag
    scores = [float(np.dot(a[:n], b[lag : lag + n])) for lag in range(max_lag)]
    return int(np.argmax(scores))


def processing_delays(mic: np.ndarray) -> dict[str, float]:
    """Algorithmic delay (ms) of the 48 -> 16 kHz resampler and of the audio processing."""
    from appliance.audio.live import Rechunker
    from appliance.audio.processing import AudioProcessor, kiosk

    speech = mic[: RATE * 3]
    device = resample(speech, RATE, DEVICE_RATE)
    chunker = Rechunker(DEVICE_RATE, RATE, BLOCK)
    step = DEVICE_RATE // 100
    pieces = [
        p
        for i in range(0, len(device), step)
        for p in chunker.push(device[i : i + step], DEVICE_RATE)
    ]
    resampled = np.concatenate(pieces)
    echo = AudioProcessor(kiosk(audio_config("production")))
    processed = np.concatenate(
        [
            echo.process(speech[i : i + BLOCK], RATE)
            for i in range(0, len(speech) - BLOCK + 1, BLOCK)
        ]
    )
    return {
        "resampler_ms": _lag(speech, resampled, RATE // 20) * 1000 / RATE,
        "processing_ms": _lag(speech, processed, RATE // 20) * 1000 / RATE,
    }


async def _reader(usb: UsbAudio, frames: list[tuple[float, np.ndarray]]) -> None:
    """The session's side of the microphone: every frame with the time it was taken."""
    async for frame in usb.microphone:
        frames.append((time.monotonic(), np.frombuffer(bytes(frame.data), np.int16)))


def _thread_cpu(native_ids: set[int | None]) -> float:
    """CPU seconds used so far by the threads with these OS ids."""
    return sum(
        t.user_time + t.system_time for t in psutil.Process().threads() if t.id in native_ids
    )


async def _play(usb: UsbAudio, pcm: np.ndarray) -> float:
    """Send a reply to the speaker as TTS would (20 ms frames); when the first was sent."""
    from livekit import rtc

    speaker = usb.speaker
    finished = asyncio.Event()

    def done(_: Any) -> None:
        finished.set()

    speaker.on("playback_finished", done)
    sent = time.monotonic()
    for i in range(0, len(pcm), 320):
        chunk = pcm[i : i + 320]
        await speaker.capture_frame(rtc.AudioFrame(chunk.tobytes(), RATE, 1, len(chunk)))
    speaker.flush()
    await asyncio.wait_for(finished.wait(), len(pcm) / RATE + 5)
    speaker.off("playback_finished", done)
    return sent


async def _room_figures(room: Any, far: np.ndarray, word: np.ndarray) -> dict[str, Any]:
    from appliance.usb.audio import UsbAudio

    figures: dict[str, Any] = {}
    for processing in ("off", "production"):
        usb = UsbAudio(audio_config(processing))
        usb.start()
        usb.microphone.on_attached()
        frames: list[tuple[float, np.ndarray]] = []
        reader = asyncio.create_task(_reader(usb, frames))
        try:
            if not await usb.wait_connected(10):
                raise RuntimeError("the simulated room's devices did not open")
            await asyncio.sleep(1.0)
            row: dict[str, Any] = {"device_rate": usb.microphone.device.rate}
            # idle: CPU of the bridge's threads (device threads + the event loop's side)
            ids: set[int | None] = {
                usb.microphone.device.native_id,
                usb.speaker.device.native_id,
                threading.main_thread().native_id,
            }
            cpu0, t0 = _thread_cpu(ids), time.monotonic()
            await asyncio.sleep(IDLE_S)
            row["cpu_percent_of_one_core"] = round(
                (_thread_cpu(ids) - cpu0) / (time.monotonic() - t0) * 100, 2
            )
            handoff = sorted(usb.microphone.handoff_s)
            row["handoff_ms_p50"] = round(float(np.percentile(handoff, 50)) * 1000, 2)
            row["handoff_ms_p95"] = round(float(np.percentile(handoff, 95)) * 1000, 2)
            # microphone: a word written into the room -> the session's first loud frame
            mic_ms = []
            for _ in range(REPEATS):
                n = len(frames)
                room.say(word)
                await asyncio.sleep(len(word) / RATE + 0.5)
                said = room.said_at[-1]
                loud = [t for t, pcm in frames[n:] if np.abs(pcm).max() > LOUD]
                if loud:
                    mic_ms.append((loud[0] - said) * 1000)
            row["mic_to_session_ms"] = percentiles(mic_ms)
            # speaker: a reply's first frame sent -> its first loud sample leaving the sink
            spk_ms = []
            for _ in range(REPEATS):
                start = len(room.played) // 2
                sent = await _play(usb, word)
                await asyncio.sleep(0.3)
                played = room.played_pcm(start)
                loud_at = np.flatnonzero(np.abs(played.astype(np.int32)) > LOUD)
                at = room.time_of_sample(start + int(loud_at[0])) if len(loud_at) else None
                if at is not None:
                    spk_ms.append((at - sent) * 1000)
            row["session_to_speaker_ms"] = percentiles(spk_ms)
            row["portaudio_input_latency_ms"] = round(usb.microphone.latency_s * 1000, 1)
            row["portaudio_output_latency_ms"] = round(usb.speaker.latency_s * 1000, 1)
            # echo: the speaker's reply heard back at -6 dB, before and after the bridge
            room.echo_gain = ECHO_GAIN
            n, echo_start = len(frames), len(room.echo_written) // 2
            await _play(usb, far)
            room.echo_gain = 0.0
            echo = np.frombuffer(bytes(room.echo_written), np.int16)[echo_start:]
            heard = np.concatenate([pcm for _, pcm in frames[n:]])
            skip = int(CONVERGE_S * RATE)
            row["echo_power_dbfs"] = _dbfs(echo[skip:])
            row["after_bridge_dbfs"] = _dbfs(heard[skip : len(echo)])
            row["erle_db"] = round(row["echo_power_dbfs"] - row["after_bridge_dbfs"], 1)
            figures[processing] = row
        finally:
            reader.cancel()
            usb.close()
    return figures


def percentiles(values: list[float]) -> dict[str, float | int | None]:
    """n, p50 and p95 (numpy linear) of `values`, rounded to 0.1."""
    return {"n": len(values), "p50": percentile(values, 50), "p95": percentile(values, 95)}


def _dbfs(pcm: np.ndarray) -> float:
    power = float(np.mean(pcm.astype(np.float64) ** 2)) if len(pcm) else 0.0
    return round(float(10 * np.log10(max(power, 1e-3) / 32768**2)), 1)


def room_figures(far: np.ndarray) -> dict[str, Any]:
    """The real bridge in the simulated room (PulseAudio pipes): CPU, latency, ERLE."""
    from bench import room_sim as audiosim

    if not audiosim.available():
        return {"skipped": "pulseaudio is not installed"}
    word = far[int(0.5 * RATE) : int(1.1 * RATE)]  # the start of the first sentence
    with audiosim.simulated_room() as room:
        return asyncio.run(_room_figures(room, far, word))


def run_bench_audio(args: argparse.Namespace, config: Config) -> int:
    """Measure, write `args.json_out`, print a summary."""
    started = datetime.datetime.now(datetime.timezone.utc)
    voice = load_voice(config)
    far = speech(voice, SENTENCES)
    near = speech(voice, USER_SENTENCES, pause_s=1.0)
    near = np.concatenate([np.zeros(int(CONVERGE_S * RATE), np.int16), near])[: len(far)]
    near = np.pad(near, (0, len(far) - len(near)))
    delay_ms = round(ECHO_DELAY_S * 1000)
    paths = {"linear": echo_path(far), "nonlinear": echo_path(far, nonlinear=True)}
    rows = [erle(p, far, mic, delay_ms, name) for name, mic in paths.items() for p in PROCESSING]
    rows += [erle("aec", far, paths["linear"], d, "linear") for d in (0, 100, 250)]
    talk = [double_talk(p, far, paths["linear"], near) for p in PROCESSING]
    cpu = [capture_cpu(p, paths["linear"]) for p in ("off", "production")]
    results: dict[str, Any] = {
        "date": started.isoformat(timespec="seconds"),
        "command": shlex.join(sys.argv),
        "machine": machine_info(),
        "echo_path": {
            "far_end": f"Piper {config.models.tts}, {len(far) / RATE:.1f} s",
            "delay_ms": delay_ms,
            "direct_gain_db": round(20 * np.log10(ECHO_GAIN), 1),
            "tail_ms": TAIL_S * 1000,
            "nonlinear_drive": NONLINEAR_DRIVE,
            "converge_s": CONVERGE_S,
        },
        "erle": rows,
        "double_talk": talk,
        "capture_cpu": cpu,
        "delays_ms": processing_delays(paths["linear"]),
        "room": room_figures(far),
    }
    out = Path(args.json_out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"USB audio bridge, {results['machine']['cpu_model']}:")
    for row in rows:
        print(
            f"  ERLE {row['echo_path']:9} {row['processing']:11} delay setting "
            f"{row['echo_delay_ms']:3} ms: {row['erle_db']:5.1f} dB"
        )
    for row in talk:
        print(f"  double talk {row['processing']:11}: user speech {row['near_retained_db']} dB")
    for row in cpu:
        print(
            f"  capture path CPU ({row['processing']}): "
            f"{row['cpu_ms_per_audio_s_median']} ms per second of audio"
        )
    print(f"  algorithmic delays: {results['delays_ms']}")
    for name, row in results["room"].items():
        print(f"  simulated room, {name}: {row}")
    print(f"results: {out}")
    return 0
