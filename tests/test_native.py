"""Native code: llama.cpp built for this CPU without the kernels that crash, and every
native library run first in a child process whose crash becomes a finding with its fix."""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from appliance.native import build, selftest
from appliance.native.selftest import Pending
from appliance.store.disk import models_dir

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent

# /proc/cpuinfo flags of a Sapphire Rapids Xeon VM (abridged): AMX besides AVX-512
SAPPHIRE_RAPIDS = (
    "flags\t\t: fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt avx f16c bmi1 avx2 bmi2 "
    "avx512f avx512dq avx512cd avx512bw avx512vl avx512vbmi avx512_vnni avx512_bf16 "
    "avx_vnni amx_bf16 amx_tile amx_int8\n"
)
PI5 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid "
PI5 += "asimdrdm lrcpc dcpop asimddp\n"
CORTEX_A53 = "Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 cpuid\n"


def options(args: list[str]) -> dict[str, str]:
    return dict(arg[2:].split("=", 1) for arg in args)


def test_an_amx_xeon_gets_avx512_and_vnni_but_never_amx() -> None:
    args = options(build.llama_cmake_args(build.cpu_flags(SAPPHIRE_RAPIDS), "x86_64"))
    assert args["GGML_NATIVE"] == "OFF"
    for option in ("GGML_AVX2", "GGML_AVX512", "GGML_AVX512_VNNI", "GGML_AVX_VNNI", "GGML_FMA"):
        assert args[option] == "ON", option
    for option in ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16"):
        assert args[option] == "OFF", option


def test_an_x86_cpu_without_avx512_gets_none() -> None:
    flags = build.cpu_flags("flags : sse4_2 avx f16c fma bmi2 avx2 avx512f\n")
    args = options(build.llama_cmake_args(flags, "x86_64"))
    assert args["GGML_AVX2"] == "ON"
    assert args["GGML_AVX512"] == "OFF"  # avx512f alone: the build needs BW, DQ, VL, CD too


def test_arm_cores_get_their_extensions_not_march_native() -> None:
    pi5 = build.llama_cmake_args(build.cpu_flags(PI5), "aarch64")
    assert pi5 == ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8.2-a+dotprod+fp16"]
    a53 = build.llama_cmake_args(build.cpu_flags(CORTEX_A53), "aarch64")
    assert a53 == ["-DGGML_NATIVE=OFF", "-DGGML_CPU_ARM_ARCH=armv8-a"]


def test_the_pinned_llama_cpp_python_is_the_one_built() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert build.LLAMA_CPP_PYTHON in pyproject["project"]["dependencies"]


def test_the_installed_llama_cpp_is_the_installers_build_without_amx() -> None:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    assert "AMX" not in info, info
    assert "OPENMP" in info or "AVX" in info or "NEON" in info, info
    # the set-up built it with this CPU's options (not pip's default -march=native build)
    assert (Path(sys.prefix) / ".llama-build").read_text().strip() == build.build_key(
        sys.executable
    )
    wanted = options(build.llama_cmake_args())
    if platform.machine() == "x86_64":
        used = set(selftest.llama_features(info))
        assert ("AVX512" in used) == (wanted["GGML_AVX512"] == "ON"), info
        assert ("AVX2" in used) == (wanted["GGML_AVX2"] == "ON"), info


@pytest.mark.parametrize("sig", [signal.SIGSEGV, signal.SIGILL, signal.SIGABRT])
def test_a_child_that_crashes_is_a_broken_build_with_its_fix(sig: signal.Signals) -> None:
    code = f"import os, signal; os.kill(os.getpid(), signal.{sig.name})"
    result = Pending("llama.cpp", [sys.executable, "-c", code], selftest.llama_fix(), None)
    checked = result.result(30)
    assert not checked.ok
    assert sig.name in checked.detail and "does not run on this CPU" in checked.detail
    assert "CMAKE_ARGS=" in checked.fix and "GGML_NATIVE=OFF" in checked.fix
    assert "--force-reinstall" in checked.fix and build.LLAMA_CPP_PYTHON in checked.fix


def test_a_child_that_hangs_is_killed_and_reported() -> None:
    code = "import time; time.sleep(60)"
    checked = Pending("x", [sys.executable, "-c", code], "fix it", None).result(0.5)
    assert not checked.ok and "no answer within 0.5 s" in checked.detail
    assert checked.fix == "fix it"


def test_the_installed_llm_decodes_in_a_child() -> None:
    gguf = next(models_dir().glob("smollm2-135m-instruct/*.gguf"))
    checked = selftest.check_llama(gguf)
    assert checked.ok, checked.detail
    assert "decoded" in checked.detail and "build uses" in checked.detail


# A llama_cpp that imports like the real one and crashes in native code when a model loads.
FAKE_LLAMA_CPP = """
import ctypes, os, signal
__version__ = "0.3.36"
def llama_print_system_info():
    return b"CPU : SSE3 = 1 | AVX2 = 1 | AMX_INT8 = 1 | "
class Llama:
    def __init__(self, *args, **kwargs):
        os.kill(os.getpid(), signal.SIGSEGV)
class LlamaGrammar:
    pass
"""


@pytest.fixture
def crashing_llama(tmp_path: Path) -> dict[str, str]:
    package = tmp_path / "fake" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA_CPP)
    (package / "llama_chat_format.py").write_text("class Jinja2ChatFormatter:\n    pass\n")
    path = os.pathsep.join([str(tmp_path / "fake"), str(ROOT), *sys.path[1:]])
    return {**os.environ, "PYTHONPATH": path}


def test_the_daemon_exits_78_with_the_fix_when_llama_cpp_crashes(
    tmp_path: Path, crashing_llama: dict[str, str]
) -> None:
    config = tmp_path / "phone.toml"
    config.write_text(
        '[models]\nllm_requantize = ""\n[sip]\nenabled = true\nlisten = "127.0.0.1"\n'
        "port = 0\n[http]\nenabled = false\n"
    )
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "run", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=120,
        env=crashing_llama,
    )
    assert out.returncode == 78, out.stderr
    assert "llama.cpp self-test" in out.stderr and "SIGSEGV" in out.stderr
    assert "CMAKE_ARGS=" in out.stderr and "Segmentation fault" not in out.stderr


def test_the_doctor_reports_a_crashing_llama_build_with_the_fix(
    tmp_path: Path, crashing_llama: dict[str, str]
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "appliance", "doctor", "--native", "--json"],
        capture_output=True,
        text=True,
        timeout=300,
        env=crashing_llama,
    )
    assert out.returncode == 1, out.stderr
    checks = {c["name"]: c for c in json.loads(out.stdout)["checks"]}
    assert checks["cpu"]["status"] == "fail" and "AMX" in checks["cpu"]["detail"]
    assert checks["llama.cpp"]["status"] == "fail"
    assert "SIGSEGV" in checks["llama.cpp"]["detail"]
    assert "CMAKE_ARGS=" in checks["llama.cpp"]["fix"]
    for name in ("ctranslate2", "onnxruntime"):
        assert checks[name]["status"] == "ok", checks[name]
