"""Self-tests of the native libraries, each a tiny real inference in a child process.

A native build that does not fit the CPU (an instruction it lacks, a kernel that crashes,
a PortAudio assertion) kills the whole process that runs it. So each piece is first run in
a child: a crash there (any signal) becomes a clear finding with the command that fixes
it, never a core dump in the daemon or the doctor. `python -m appliance.native.selftest
KIND ARGS` is the child; its last stdout line is a JSON object with a `detail` line.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from appliance.native.build import rebuild_command

LLAMA_TIMEOUT = 30.0  # a 1.5B model's first decode from an SD card is a few seconds
PROMPT = b"The capital of France is"


@dataclass
class Result:
    """What one self-test found."""

    name: str
    ok: bool
    detail: str
    fix: str = ""
    seconds: float = 0.0


class Pending:
    """A self-test running in its child process."""

    def __init__(
        self,
        name: str,
        argv: list[str],
        fix: str,
        env: dict[str, str] | None,
        crash: str = "this build does not run on this CPU",
    ) -> None:
        self.name = name
        self.fix = fix
        self.crash = crash  # what a crash (a signal) means
        self._start = time.perf_counter()
        self._proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

    def result(self, timeout: float) -> Result:
        """Wait for the child (killed after `timeout` s) and judge how it ended."""
        try:
            out, err = self._proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.communicate()
            return self._done(False, f"no answer within {timeout:g} s (killed)")
        code = self._proc.returncode
        lines = [line.strip() for line in err.splitlines() if line.strip()]
        if code < 0:
            try:
                sig = signal.Signals(-code).name
            except ValueError:
                sig = f"signal {-code}"
            said = f" ({lines[-1]})" if lines else ""  # an assertion's message, say
            return self._done(False, f"the self-test crashed with {sig}: {self.crash}{said}")
        if code != 0:
            return self._done(False, f"the self-test failed: {lines[-1] if lines else code}")
        try:
            detail = str(json.loads(out.strip().splitlines()[-1])["detail"])
        except (IndexError, ValueError, KeyError, TypeError):
            return self._done(False, f"the self-test said nothing readable: {out[-200:]!r}")
        return self._done(True, detail)

    def _done(self, ok: bool, detail: str) -> Result:
        seconds = round(time.perf_counter() - self._start, 3)
        return Result(self.name, ok, detail, "" if ok else self.fix, seconds)


def start(
    kind: str,
    *args: str,
    fix: str,
    env: dict[str, str] | None = None,
    crash: str = "this build does not run on this CPU",
) -> Pending:
    """Start `python -m appliance.native.selftest KIND ARGS` in a child process."""
    argv = [sys.executable, "-m", "appliance.native.selftest", kind, *args]
    return Pending(kind, argv, fix, env, crash)


def llama_fix() -> str:
    """How to rebuild llama.cpp for this CPU in the virtual environment in use."""
    pip = Path(sys.executable).with_name("pip")
    command = rebuild_command(str(pip))
    if not os.access(pip.parent, os.W_OK):
        command = f"sudo {command}"
    return f"rebuild llama.cpp for this CPU: {command}"


def start_llama(gguf: Path) -> Pending:
    """Decode a short prompt and one token with the GGUF model, in a child."""
    return start("llama.cpp", str(gguf), fix=llama_fix())


def check_llama(gguf: Path, timeout: float = LLAMA_TIMEOUT) -> Result:
    return start_llama(gguf).result(timeout)


# -- the children --


def llama_features(system_info: str) -> list[str]:
    """The CPU features a llama.cpp build uses, from `llama_print_system_info()`."""
    return re.findall(r"([A-Z][A-Z0-9_]*) = 1", system_info)


def _child_llama(gguf: str) -> str:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode()
    start = time.perf_counter()
    llm = llama_cpp.Llama(model_path=gguf, n_ctx=64, n_batch=16, n_threads=1, verbose=False)
    tokens = llm.tokenize(PROMPT, add_bos=True)
    llm.eval(tokens)  # a batch of several tokens: the matrix kernels that crashed on AMX
    token = llm.sample(temp=0.0)
    llm.eval([token])
    word = llm.detokenize([token]).decode(errors="replace")
    ms = (time.perf_counter() - start) * 1000
    used = ", ".join(llama_features(info)) or "no SIMD"
    return (
        f"decoded {len(tokens)} prompt tokens and 2 more in {ms:.0f} ms "
        f"(next word {word!r}); build uses {used}"
    )


def _child_ctranslate2(model_dir: str) -> str:
    import tempfile

    import numpy as np

    # CTranslate2 logs the instruction set and GEMM backends it chose to fd 2 when loaded
    # with CT2_VERBOSE=1: catch that log in a file
    os.environ["CT2_VERBOSE"] = "1"
    saved = os.dup(2)
    with tempfile.TemporaryFile("w+") as log:
        os.dup2(log.fileno(), 2)
        try:
            from appliance.plugins.whisper.engine import load_model, transcribe

            model = load_model(model_dir, threads=1)
        finally:
            os.dup2(saved, 2)
        log.seek(0)
        text = log.read()
    transcribe(model, np.zeros(16000, np.float32), "en")
    isa = re.search(r"Selected ISA: (\S+)", text)
    gemm = re.search(r"GEMM_S8 backend: (\S+)", text)
    return (
        f"instruction set {isa.group(1) if isa else 'unknown'}, int8 GEMM "
        f"{gemm.group(1) if gemm else 'unknown'}; transcribed 1 s of audio"
    )


def mlas_kernels(flags: set[str]) -> str:
    """The kernels onnxruntime's MLAS picks by CPUID at run time (float, int8)."""
    if "asimd" in flags:
        return "NEON float, " + ("dot-product int8" if "asimddp" in flags else "NEON int8")
    floats = next(
        (
            name
            for name, flag in (("AVX512F", "avx512f"), ("FMA3", "fma"), ("AVX", "avx"))
            if flag in flags
        ),
        "SSE",
    )
    int8 = next(
        (
            name
            for name, flag in (
                ("AMX", "amx_int8"),
                ("AVX512-VNNI", "avx512_vnni"),
                ("AVX512BW", "avx512bw"),
                ("AVX-VNNI", "avx_vnni"),
                ("AVX2", "avx2"),
            )
            if flag in flags
        ),
        "SSE",
    )
    return f"{floats} float, {int8} int8"


def _child_onnxruntime(voice: str, turn: str = "") -> str:
    import numpy as np
    import onnxruntime

    from appliance.native.build import cpu_flags
    from appliance.plugins.piper.engine import PiperVoice

    piper = PiperVoice(Path(voice), Path(voice + ".json"), threads=1)
    audio = piper.synthesize("Ready.")
    done = f"Piper rendered {len(audio) / piper.sample_rate:.1f} s of speech"
    if turn:  # int8: MLAS's quantized kernels
        from appliance.plugins.smart_turn.engine import SmartTurnModel

        SmartTurnModel(Path(turn), threads=1).predict(np.zeros(16000, np.int16))
        done += ", smart-turn ran"
    return (
        f"onnxruntime {onnxruntime.__version__}, MLAS kernels chosen at run time: "
        f"{mlas_kernels(cpu_flags())}; {done}"
    )


def _child_portaudio() -> str:
    from appliance.usb.portaudio import list_devices, load_pyaudio

    pyaudio = load_pyaudio()
    pa = pyaudio.PyAudio()  # where an ALSA config can abort the process
    try:
        devices = list_devices(pa)
    finally:
        pa.terminate()
    return f"{pyaudio.get_portaudio_version_text()}; {len(devices)} devices"


CHILDREN: dict[str, Callable[..., str]] = {
    "llama.cpp": _child_llama,
    "ctranslate2": _child_ctranslate2,
    "onnxruntime": _child_onnxruntime,
    "portaudio": _child_portaudio,
}


def main(argv: list[str]) -> int:
    import resource

    # a crash here is the finding: no core file (the kiosk probes PortAudio at each retry)
    resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    kind, *args = argv
    print(json.dumps({"detail": CHILDREN[kind](*args)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
