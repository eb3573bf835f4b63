"""`appliance doctor`: real checks against this machine, with the faults made real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from appliance.doctor import check_cpu
from appliance.native.selftest import llama_fix
from bench.room_sim import file_pcms
from tests.test_usbaudio import ABORTING_ALSA


def doctor(tmp_path: Path, config: str, env: dict[str, str]) -> tuple[int, dict[str, dict]]:
    path = tmp_path / "appliance.toml"
    path.write_text(config)
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--json", "--config", str(path)],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    return out.returncode, checks


def test_a_missing_model_and_a_missing_audio_device_are_reported(tmp_path: Path) -> None:
    empty = tmp_path / "models"
    empty.mkdir()
    (tmp_path / "mic.raw").write_bytes(bytes(32000))
    env = {"APPLIANCE_MODELS_DIR": str(empty), "ALSA_CONFIG_PATH": file_pcms(tmp_path)}
    config = '[audio]\nenabled = true\ninput = "usb-speakerphone"\n[http]\nenabled = false\n'
    code, checks = doctor(tmp_path, config, env)
    assert code == 1
    models = checks["models"]
    assert models["status"] == "fail"
    assert "whisper/tiny.en: 4 file(s) missing" in models["detail"]
    assert models["fix"].startswith("appliance models fetch whisper/tiny.en")
    assert checks["audio input"]["status"] == "fail"
    assert "input device 'usb-speakerphone': none matches" in checks["audio input"]["detail"]
    assert "voice_in" in checks["audio input"]["detail"]  # what there is instead
    assert checks["audio output"]["status"] == "ok"  # voice_out exists


def test_a_healthy_install_has_no_problem(tmp_path: Path) -> None:
    (tmp_path / "mic.raw").write_bytes(bytes(32000))
    env = {"ALSA_CONFIG_PATH": file_pcms(tmp_path)}
    code, checks = doctor(tmp_path, "[audio]\nenabled = true\n[http]\nenabled = false\n", env)
    failed = {name: c for name, c in checks.items() if c["status"] == "fail"}
    assert code == 0 and not failed, failed
    assert checks["models"]["status"] == "ok"
    assert checks["audio input"]["detail"] == "'voice_in' is 'voice_in'"


def test_an_alsa_config_that_aborts_portaudio_is_a_finding(tmp_path: Path) -> None:
    conf = tmp_path / "asound.conf"
    conf.write_text(ABORTING_ALSA)
    config = "[audio]\nenabled = true\n[http]\nenabled = false\n"
    code, checks = doctor(tmp_path, config, {"ALSA_CONFIG_PATH": str(conf)})
    assert code == 1 and "models" in checks  # the other checks still ran
    portaudio = checks["portaudio"]
    assert portaudio["status"] == "fail"
    assert f"with the ALSA config {conf}: the self-test crashed with SIGABRT" in portaudio["detail"]
    assert "PortAudio aborted while listing the ALSA devices" in portaudio["detail"]
    assert "firmware/alsa/asound.conf is known to work" in portaudio["fix"]


def test_a_llama_build_for_another_cpu_is_caught() -> None:
    built = "CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | AVX512 = 1 | FMA = 1 | OPENMP = 1 | "
    without_avx512 = {"pni", "avx", "avx2", "fma"}
    check = check_cpu(without_avx512, built)
    assert check.status == "fail" and "AVX512" in check.detail and check.fix == llama_fix()
    assert check_cpu(without_avx512 | {"avx512f"}, built).status == "ok"
    amx = check_cpu({"pni", "avx2", "amx_int8"}, "CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | ")
    assert amx.status == "fail" and "AMX" in amx.detail and "GGML_NATIVE=OFF" in amx.fix
    arm = "CPU : NEON = 1 | ARM_FMA = 1 | DOTPROD = 1 | MATMUL_INT8 = 1 | "
    pi5 = {"fp", "asimd", "asimddp", "asimdrdm"}  # Cortex-A76: no i8mm
    assert "MATMUL_INT8" in check_cpu(pi5, arm).detail
