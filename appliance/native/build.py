"""The CMake options llama.cpp is compiled with on this CPU.

llama.cpp's default build (`GGML_NATIVE=ON`) turns on every instruction set the compiler
finds on the build machine. On AMX-capable Xeons that includes the AMX kernels, which
segfault in `ggml_backend_amx_mul_mat` on any prompt longer than one token (llama-cpp-python
0.3.36). So the appliance builds with `GGML_NATIVE=OFF` and names each instruction set it
wants, read from /proc/cpuinfo: every fast kernel that works (AVX2, AVX-512, VNNI, the
repacked Q4/Q8 paths; NEON, dot product, fp16 and int8 matrix multiply on ARM), never AMX,
never SVE (ggml's SVE kernels depend on the vector length of the core they run on).

Stdlib only: the installers run `python3 -m appliance.native.build --install VENV_PYTHON`
before the appliance is installed in that environment. The wheel it builds is kept in a
cache named after the options, so another environment on the same machine (the installer's
beside the developer's) reuses it; pip's own cache cannot be used, as it ignores CMAKE_ARGS.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"

# x86-64: ggml option -> the /proc/cpuinfo flags it needs (all of them)
X86_OPTIONS = {
    "GGML_SSE42": ("sse4_2",),
    "GGML_AVX": ("avx",),
    "GGML_F16C": ("f16c",),
    "GGML_FMA": ("fma",),
    "GGML_BMI2": ("bmi2",),
    "GGML_AVX2": ("avx2",),
    "GGML_AVX_VNNI": ("avx_vnni",),
    "GGML_AVX512": ("avx512f", "avx512cd", "avx512vl", "avx512dq", "avx512bw"),
    "GGML_AVX512_VBMI": ("avx512vbmi",),
    "GGML_AVX512_VNNI": ("avx512_vnni",),
    "GGML_AVX512_BF16": ("avx512_bf16",),
}
# never built, whatever the CPU has: AMX crashes (see the module's docstring)
X86_NEVER = ("GGML_AMX_TILE", "GGML_AMX_INT8", "GGML_AMX_BF16")
# aarch64: the -march extension -> the /proc/cpuinfo feature it needs
ARM_EXTENSIONS = {"dotprod": "asimddp", "fp16": "asimdhp", "i8mm": "i8mm"}


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The CPU's feature flags (`flags` on x86, `Features` on ARM) from /proc/cpuinfo."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return set()
    flags: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags


def arm_march(flags: set[str]) -> str:
    """The -march for an aarch64 core: armv8.2-a with the extensions it has (a Pi 5's
    Cortex-A76 and an Orin's A78AE: +dotprod+fp16), else plain armv8-a."""
    extensions = [ext for ext, flag in ARM_EXTENSIONS.items() if flag in flags]
    if not extensions:
        return "armv8-a"
    return "armv8.2-a" + "".join(f"+{ext}" for ext in extensions)


def llama_cmake_args(flags: set[str] | None = None, machine: str | None = None) -> list[str]:
    """The `CMAKE_ARGS` that build llama.cpp for this CPU without the kernels that crash."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    args = ["-DGGML_NATIVE=OFF"]
    if machine in ("x86_64", "amd64"):
        for option, needs in X86_OPTIONS.items():
            on = all(flag in flags for flag in needs)
            args.append(f"-D{option}={'ON' if on else 'OFF'}")
        args += [f"-D{option}=OFF" for option in X86_NEVER]
    elif machine in ("aarch64", "arm64"):
        args.append(f"-DGGML_CPU_ARM_ARCH={arm_march(flags)}")
    else:
        # another architecture: llama.cpp's own detection, nothing known to crash there
        args = ["-DGGML_NATIVE=ON"]
    return args


def rebuild_command(venv_pip: str = "pip") -> str:
    """The shell command that rebuilds llama-cpp-python for this CPU."""
    cmake_args = " ".join(llama_cmake_args())
    return (
        f"CMAKE_ARGS={shlex.quote(cmake_args)} {venv_pip} install --no-cache-dir "
        f"--force-reinstall --no-deps {LLAMA_CPP_PYTHON}"
    )


def wheel_cache() -> Path:
    """Where built llama-cpp-python wheels are kept, one folder per build configuration."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "appliance" / "wheels"


def build_key(python: str) -> str:
    """A name for the llama-cpp-python build this CPU gets in the environment of `python`."""
    cmake_args = " ".join(llama_cmake_args())
    tag = subprocess.run(
        [python, "-c", "import sys; print(sys.implementation.cache_tag)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    config = f"{LLAMA_CPP_PYTHON} {platform.machine()} {tag} {cmake_args}"
    return hashlib.sha256(config.encode()).hexdigest()[:16]


def install_llama(python: str, cache: Path | None = None) -> bool:
    """Install llama-cpp-python built for this CPU into the environment of `python`
    (VENV/bin/python); False when it is there already, built with the same options."""
    cmake_args = " ".join(llama_cmake_args())
    key = build_key(python)
    stamp = Path(python).parent.parent / ".llama-build"
    if stamp.is_file() and stamp.read_text().strip() == key:
        return False
    folder = (cache or wheel_cache()) / f"llama-cpp-python-{key}"
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"building {LLAMA_CPP_PYTHON} for this CPU: {cmake_args}", flush=True)
        part = folder.with_name(folder.name + ".part")
        shutil.rmtree(part, ignore_errors=True)
        pip = [python, "-m", "pip", "wheel", "-q", "--no-cache-dir", "--no-deps", "-w", str(part)]
        env = {**os.environ, "CMAKE_ARGS": cmake_args}
        subprocess.run([*pip, LLAMA_CPP_PYTHON], env=env, check=True)
        shutil.rmtree(folder, ignore_errors=True)
        part.rename(folder)
        wheels = sorted(folder.glob("*.whl"))
    pip = [python, "-m", "pip", "install", "-q", "--no-deps", "--force-reinstall"]
    subprocess.run([*pip, str(wheels[-1])], check=True)
    stamp.write_text(key + "\n")
    return True


def main(argv: list[str] | None = None) -> int:
    """`python3 -m appliance.native.build`: print the CMAKE_ARGS; `--install PYTHON`:
    install llama-cpp-python built with them; `--rebuild-command PIP`: the command."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--rebuild-command"]:
        print(rebuild_command(*argv[1:2]))
    elif argv[:1] == ["--install"] and len(argv) == 2:
        install_llama(argv[1])
    else:
        print(" ".join(llama_cmake_args()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
