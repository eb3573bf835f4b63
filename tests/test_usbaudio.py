"""The USB audio bridge through the real PortAudio/ALSA stack, with no sound card.

ALSA's `file` plugin over a `null` slave stands in for the card (DESIGN.md section 6):
capture reads a raw file, playback writes one. These PCMs are not paced by hardware; the
bridge's own pacer keeps them at real time.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from livekit import rtc

from appliance import config as config_mod
from appliance.usb.audio import UsbAudio, find_device, list_devices
from bench.room_sim import file_pcms

FIRMWARE_ALSA = Path(__file__).parent.parent / "firmware" / "alsa" / "asound.conf"
# PCMs without ALSA's own alsa.conf: PortAudio's device listing fails a C assertion on them
# (pa_linux_alsa.c: BuildDeviceList: Assertion `devIdx < numDeviceNames' failed: SIGABRT)
ABORTING_ALSA = """\
pcm.held_in { type file slave.pcm { type null } file "/dev/null" infile "in.raw" format "raw" }
pcm.held_out { type file slave.pcm { type null } file "/dev/null" format "raw" }
"""


@pytest.fixture(params=["plain", "production"])
def alsa_files(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Path]:
    """File PCMs named voice_in/voice_out; or the production asound.conf with only its
    card-facing PCMs (dsnoop/dmix over the card, which need real hardware) replaced."""
    if request.param == "plain":
        path = file_pcms(tmp_path)
    else:
        path = file_pcms(tmp_path, "voice_capture", "voice_playback", str(FIRMWARE_ALSA))
    monkeypatch.setenv("ALSA_CONFIG_PATH", path)
    (tmp_path / "mic.raw").write_bytes(bytes(16000 * 2 * 10))  # 10 s of silence by default
    yield tmp_path


def audio_config(**over: object) -> config_mod.AudioConfig:
    return config_mod.AudioConfig(enabled=True, **over)  # type: ignore[arg-type]


def test_devices_are_listed_and_found_by_name(alsa_files: Path) -> None:
    devices = list_devices()
    assert find_device(devices, "voice_in", "inputs")["name"] == "voice_in"
    assert find_device(devices, "voice_out", "outputs")["name"] == "voice_out"
    with pytest.raises(Exception, match="input device 'usb-speakerphone': none matches"):
        find_device(devices, "usb-speakerphone", "inputs")


def test_capture_is_bit_exact_at_the_session_rate(alsa_files: Path) -> None:
    rng = np.random.default_rng(1)
    mic = rng.integers(-20000, 20000, 16000 * 2, dtype=np.int16)
    np.concatenate([mic, np.zeros(16000 * 3, np.int16)]).tofile(alsa_files / "mic.raw")
    cfg = audio_config(
        input_rate=16000,
        output_rate=16000,
        echo_cancellation=False,
        noise_suppression=False,
        auto_gain_control=False,
        high_pass_filter=False,
    )

    async def main() -> np.ndarray:
        usb = UsbAudio(cfg)
        usb.start()
        usb.microphone.on_attached()  # as a session does when it starts listening
        try:
            frames = []
            async for frame in usb.microphone:
                assert frame.sample_rate == 16000 and frame.samples_per_channel == 320  # 20 ms
                frames.append(np.frombuffer(bytes(frame.data), np.int16))
                if len(frames) == 100:
                    break
            return np.concatenate(frames)
        finally:
            usb.close()

    got = asyncio.run(main())
    assert np.array_equal(got, mic)


def test_playback_is_bit_exact_and_reports_the_played_position(alsa_files: Path) -> None:
    cfg = audio_config(input_rate=16000, output_rate=48000, echo_cancellation=False)
    tone = (8000 * np.sin(2 * np.pi * 440 * np.arange(48000) / 48000 + 0.5)).astype(np.int16)

    async def main() -> tuple[list[dict[str, float | bool]], list[float]]:
        usb = UsbAudio(cfg)
        usb.start()
        try:
            assert await usb.wait_connected(5)
            speaker = usb.speaker
            started: list[float] = []
            speaker.on("playback_started", lambda ev: started.append(ev.created_at))
            finished = asyncio.Event()
            speaker.on("playback_finished", lambda ev: finished.set())
            for i in range(0, len(tone), 960):  # 20 ms frames, as TTS sends them
                chunk = tone[i : i + 960]
                await speaker.capture_frame(rtc.AudioFrame(chunk.tobytes(), 48000, 1, len(chunk)))
            speaker.flush()
            await asyncio.wait_for(finished.wait(), 5)
            return speaker.segments, started
        finally:
            usb.close()

    segments, started = asyncio.run(main())
    assert len(started) == 1
    assert segments == [{"played": 1.0, "interrupted": False}]
    played = np.fromfile(alsa_files / "speaker.raw", np.int16)
    # every sample, unchanged and in order; a loaded machine may starve the device for a
    # moment (the event loop behind), which plays silence in between, as a real card would
    assert np.array_equal(played[played != 0], tone[tone != 0])


def test_devices_command_lists_the_named_pcms(alsa_files: Path) -> None:
    import json

    out = subprocess.run(
        [sys.executable, "-m", "appliance", "devices", "--json"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    names = {d["name"]: d for d in json.loads(out.stdout)["devices"]}
    assert names["voice_in"]["inputs"] > 0 and names["voice_out"]["outputs"] > 0
    assert "ALSA lib" not in out.stderr  # native probe noise is kept out of the logs


def test_device_threads_ask_for_real_time_priority(alsa_files: Path) -> None:
    """Under the unit (LimitRTPRIO=20) the audio threads run SCHED_FIFO; else they say why."""
    import os
    import resource

    cfg = audio_config(realtime_priority=5, echo_cancellation=False)
    soft, _ = resource.getrlimit(resource.RLIMIT_RTPRIO)

    async def main() -> list[int]:
        usb = UsbAudio(cfg)
        usb.start()
        try:
            assert await usb.wait_connected(5)
            ids = [usb.microphone.device.native_id, usb.speaker.device.native_id]
            return [os.sched_getscheduler(i) & ~os.SCHED_RESET_ON_FORK for i in ids if i]
        finally:
            usb.close()

    policies = asyncio.run(main())
    allowed = os.geteuid() == 0 or soft == resource.RLIM_INFINITY or soft >= 5
    expected = os.SCHED_FIFO if allowed else os.SCHED_OTHER
    assert policies == [expected, expected]


@pytest.fixture
def aborting_alsa(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """ALSA_CONFIG_PATH set to ABORTING_ALSA; the config's path."""
    conf = tmp_path / "asound.conf"
    conf.write_text(ABORTING_ALSA)
    (tmp_path / "in.raw").write_bytes(bytes(32000))
    monkeypatch.setenv("ALSA_CONFIG_PATH", str(conf))
    return conf


def run_python(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *argv], capture_output=True, text=True, cwd=cwd, timeout=60
    )


def test_devices_command_reports_an_alsa_config_that_aborts_portaudio(
    aborting_alsa: Path,
) -> None:
    out = run_python("-m", "appliance", "devices", cwd=aborting_alsa.parent)
    assert out.returncode == 1, (out.returncode, out.stderr)  # not -6: SIGABRT
    said = f"error: PortAudio cannot list the audio devices with the ALSA config {aborting_alsa}:"
    assert out.stderr.startswith(said), out.stderr
    assert "SIGABRT" in out.stderr and "Assertion" in out.stderr
    assert "firmware/alsa/asound.conf is known to work" in out.stderr


def test_listing_devices_raises_instead_of_aborting(aborting_alsa: Path) -> None:
    code = (
        "from appliance.usb.audio import AudioDeviceError, list_devices\n"
        "try:\n"
        "    list_devices()\n"
        "except AudioDeviceError as exc:\n"
        "    print('raised:', exc)\n"
    )
    out = run_python("-c", code, cwd=aborting_alsa.parent)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.startswith(
        f"raised: PortAudio cannot list the audio devices with the ALSA config {aborting_alsa}"
    )


KIOSK_AUDIO = """\
import asyncio, logging, pathlib, sys
from appliance.config import AudioConfig
from appliance.usb.audio import UsbAudio

async def main() -> None:
    usb = UsbAudio(AudioConfig(enabled=True, input="held_in", output="held_out"))
    usb.start()
    try:
        print("before the fix:", await usb.wait_connected(2.0), flush=True)
        pathlib.Path(sys.argv[1]).write_text(sys.argv[2])
        print("after the fix:", await usb.wait_connected(10.0), flush=True)
    finally:
        usb.close()

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
asyncio.run(main())
"""


def test_kiosk_audio_survives_an_aborting_alsa_config_and_recovers(aborting_alsa: Path) -> None:
    """The device threads log once each, keep retrying (probing again), and open the
    devices once the config is fixed, with no restart."""
    infile = aborting_alsa.parent / "in.raw"
    fixed = "</usr/share/alsa/alsa.conf>\n" + ABORTING_ALSA.replace('"in.raw"', f'"{infile}"')
    out = run_python("-c", KIOSK_AUDIO, str(aborting_alsa), fixed, cwd=aborting_alsa.parent)
    assert out.returncode == 0, (out.returncode, out.stderr)
    assert out.stdout.splitlines() == ["before the fix: False", "after the fix: True"]
    lost = [line for line in out.stderr.splitlines() if " unavailable: PortAudio cannot" in line]
    assert len(lost) == 2, out.stderr  # input and output, each once however many retries
    assert all(line.startswith("ERROR audio ") and str(aborting_alsa) in line for line in lost)
    assert out.stderr.count("is back") == 2, out.stderr
