"""`appliance doctor`: check the installation and say how to fix each problem.

Each check gives `ok`, `warn` (works, but worth a look) or `fail` (the appliance will not
work as configured), a one-line finding and, for a problem, the fix. Nothing here changes
the system; checks that need something absent (systemd, a configured SIP bridge) say so.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil

from appliance.config import Config
from appliance.native import selftest
from appliance.native.build import cpu_flags
from appliance.native.selftest import llama_features, llama_fix
from appliance.store import disk, integrity
from appliance.store.manifest import load as load_manifest

SELFTEST_TIMEOUT = 60.0
# llama.cpp build feature -> the /proc/cpuinfo flag the CPU needs for it
CPU_FLAGS = {
    "SSE3": "pni",
    "SSSE3": "ssse3",
    "AVX": "avx",
    "AVX2": "avx2",
    "F16C": "f16c",
    "FMA": "fma",
    "BMI2": "bmi2",
    "AVX512": "avx512f",
    "AVX512_VBMI": "avx512vbmi",
    "AVX512_VNNI": "avx512_vnni",
    "AVX512_BF16": "avx512_bf16",
    "NEON": "asimd",
    "DOTPROD": "asimddp",
    "SVE": "sve",
    "MATMUL_INT8": "i8mm",
}
MIN_FREE_DISK = 500 * 2**20
RUNTIME_OVERHEAD = 600 * 2**20  # Python, livekit, onnxruntime, buffers: measured ~570 MB


@dataclass
class Check:
    name: str
    status: str  # ok, warn, fail
    detail: str
    fix: str = ""


def check_python() -> Check:
    """The interpreter in use (the package itself requires 3.10 or newer to install)."""
    version = platform.python_version()
    return Check("python", "ok", f"Python {version} ({sys.executable})")


def check_packages() -> Check:
    """Every pinned requirement of the installed appliance is the version installed."""
    try:
        requires = importlib.metadata.requires("appliance") or []
    except importlib.metadata.PackageNotFoundError:
        return Check("packages", "fail", "the appliance package is not installed", "pip install .")
    wrong, checked = [], 0
    for req in requires:
        if "extra ==" in req or "==" not in req:
            continue
        checked += 1
        name, version = req.split(";")[0].strip().split("==")
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = "missing"
        if have != version:
            wrong.append(f"{name} {have} (needs {version})")
    if wrong:
        return Check(
            "packages", "fail", "; ".join(wrong), "reinstall: scripts/install.sh (or pip install .)"
        )
    return Check("packages", "ok", f"all {checked} pinned packages at their pinned versions")


def check_cpu(flags: set[str] | None = None, system_info: str | None = None) -> Check:
    """The CPU has every instruction set the llama.cpp build was compiled for, and the
    build leaves out the kernels that crash (AMX)."""
    if system_info is None:
        try:
            import llama_cpp

            system_info = llama_cpp.llama_print_system_info().decode()
        except Exception as exc:
            return Check("cpu", "fail", f"llama.cpp does not load: {exc}", llama_fix())
    flags = cpu_flags() if flags is None else flags
    built = llama_features(system_info)
    missing = [f for f in built if f in CPU_FLAGS and CPU_FLAGS[f] not in flags]
    cores = os.cpu_count() or 0
    if missing:
        return Check(
            "cpu",
            "fail",
            f"llama.cpp was built for {', '.join(missing)}, which this CPU lacks: "
            "it will stop with 'illegal instruction' (a build copied from another machine?)",
            llama_fix(),
        )
    if any(f.startswith("AMX") for f in built):
        return Check(
            "cpu",
            "fail",
            "llama.cpp was built with AMX, whose kernels crash on prompts (segfault in "
            "ggml_backend_amx_mul_mat)",
            llama_fix(),
        )
    used = ", ".join(f for f in built if f in CPU_FLAGS) or "no SIMD"
    return Check("cpu", "ok", f"{cores} cores, {platform.machine()}; llama.cpp uses {used}")


def check_native(config: Config, root: Path) -> list[Check]:
    """A tiny real inference with each native library, each in a child process: a build
    that crashes on this CPU is a finding with its fix, not a core dump."""
    cfg = config.models
    manifest = load_manifest(cfg.manifest)

    def installed(model_id: str, suffix: str) -> Path | None:
        entry = manifest.models.get(model_id)
        if entry is None or not disk.installed(entry, root):
            return None
        return disk.file_path(entry, entry.file(suffix).name, root)

    gguf = installed(cfg.llm, ".gguf")
    whisper = installed(cfg.stt, "model.bin")
    voice = installed(cfg.tts, ".onnx")
    turn = installed(cfg.turn_model, ".onnx") if cfg.turn_model.startswith("smart-turn/") else None
    pip = f"{Path(sys.executable).with_name('pip')} install --force-reinstall --no-cache-dir"
    children = [
        ("llama.cpp", [str(gguf)] if gguf else None, llama_fix()),
        ("ctranslate2", [str(whisper.parent)] if whisper else None, f"{pip} ctranslate2"),
        (
            "onnxruntime",
            [str(voice), *([str(turn)] if turn else [])] if voice else None,
            f"{pip} onnxruntime=={importlib.metadata.version('onnxruntime')}",
        ),
    ]
    pending = [
        (name, selftest.start(name, *args, fix=fix) if args is not None else None)
        for name, args, fix in children
    ]
    checks = []
    for name, child in pending:
        if child is None:
            checks.append(Check(name, "warn", "self-test skipped: its model is not installed"))
            continue
        result = child.result(SELFTEST_TIMEOUT)
        status = "ok" if result.ok else "fail"
        checks.append(Check(name, status, f"self-test: {result.detail}", result.fix))
    return checks


def check_memory(config: Config) -> Check:
    manifest = load_manifest(config.models.manifest)
    weights = sum(manifest.models[i].size for i in config.models_in_use())
    need = weights + RUNTIME_OVERHEAD
    mem = psutil.virtual_memory()
    detail = (
        f"{mem.total / 2**30:.1f} GiB, {mem.available / 2**30:.1f} GiB available; "
        f"the models in use need about {need / 2**30:.1f} GiB"
    )
    if mem.total < need:
        return Check("memory", "fail", detail, "choose a smaller [models] profile")
    if mem.available < need:
        return Check("memory", "warn", detail, "other programs use the memory the models need")
    return Check("memory", "ok", detail)


def check_disk(root: Path) -> Check:
    where = root if root.exists() else next((p for p in root.parents if p.exists()), Path("/"))
    free = shutil.disk_usage(where).free
    detail = f"{free / 2**30:.1f} GiB free at {where}"
    if free < MIN_FREE_DISK:
        return Check("disk", "warn", detail, "free space before fetching bigger models")
    return Check("disk", "ok", detail)


def check_models(config: Config, root: Path) -> Check:
    manifest = load_manifest(config.models.manifest)
    entries = [manifest.models[i] for i in config.models_in_use()]
    problems, fetch, fixes = [], [], []
    for entry in entries:
        bad = [s for s in integrity.verify([entry], root) if not s.ok]
        if not bad:
            continue
        what = sorted({s.detail.split(";")[0] for s in bad})
        problems.append(f"{entry.id}: {len(bad)} file(s) {', '.join(what)}")
        if entry.embedded:
            fixes.append(disk.fix_hint(entry))
        else:
            fetch.append(entry.id)
    if fetch:
        fixes.insert(
            0,
            f"appliance models fetch {' '.join(fetch)} "
            "(offline: appliance models import DIR from a USB stick)",
        )
    if problems:
        return Check("models", "fail", f"{'; '.join(problems)} (in {root})", " / ".join(fixes))
    return Check("models", "ok", f"{len(entries)} models in use, every file verified ({root})")


def check_audio(config: Config) -> list[Check]:
    if not config.audio.enabled:
        return [Check("audio", "ok", "USB kiosk not enabled ([audio] enabled = false)")]
    from appliance.usb import portaudio
    from appliance.usb.portaudio import AudioDeviceError, find_device, list_devices

    # PortAudio can abort the process while it lists devices on some ALSA set-ups: list
    # them in a child first, and here only if the child lived
    probe = portaudio.probe()
    if not probe.ok:
        detail = f"device listing with the ALSA config {portaudio.alsa_config()}: {probe.detail}"
        return [Check("portaudio", "fail", detail, probe.fix)]
    try:
        devices = list_devices()  # the probe's success is reused
    except AudioDeviceError as exc:
        return [Check("audio", "fail", str(exc), "apt-get install portaudio19-dev")]
    checks = [Check("portaudio", "ok", probe.detail)]
    for what, name, direction in (
        ("audio input", config.audio.input, "inputs"),
        ("audio output", config.audio.output, "outputs"),
    ):
        try:
            device = find_device(devices, name, direction)
        except AudioDeviceError as exc:
            checks.append(
                Check(
                    what,
                    "fail",
                    str(exc),
                    "plug the USB sound card in; install firmware/alsa/asound.conf and the "
                    "udev rule (docs/kiosk.md); or set [audio] to a name from `appliance devices`",
                )
            )
        else:
            checks.append(Check(what, "ok", f"{name!r} is {device['name']!r}"))
    return checks


def check_gpio() -> Check:
    paths = sorted(Path("/dev").glob("gpiochip*")) + sorted(Path("/dev/input").glob("event*"))
    if not paths:
        return Check("gpio/input", "ok", "no GPIO chips or input devices on this machine")
    denied = [str(p) for p in paths if not os.access(p, os.R_OK | os.W_OK)]
    if denied:
        return Check(
            "gpio/input",
            "warn",
            f"no read/write access to {', '.join(denied[:4])}{' ...' if len(denied) > 4 else ''}",
            "add the user to the gpio and input groups; "
            "install firmware/udev/71-appliance-gpio.rules",
        )
    return Check("gpio/input", "ok", f"{len(paths)} GPIO/input devices accessible")


def check_sip(config: Config) -> Check:
    sip = config.sip
    if not sip.enabled:
        return Check("sip", "ok", "SIP bridge not enabled ([sip] enabled = false)")
    for name, path in (
        ("users_file", sip.users_file),
        ("password file", sip.register_password_file),
    ):
        if path and not os.access(path, os.R_OK):
            return Check(
                "sip",
                "fail",
                f"[sip] {name} {path!r} is not readable",
                "chmod 0640, group appliance",
            )
    family = socket.AF_INET6 if ":" in sip.listen else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.bind((sip.listen, sip.port))
        except OSError as exc:
            return Check(
                "sip",
                "warn",
                f"udp {sip.listen}:{sip.port} is taken ({exc.strerror}): by the running "
                "appliance, or by another SIP program",
                "if the appliance is not running, stop the other program or set [sip] port",
            )
    registration = f", registering {sip.register_uri}" if sip.register_uri else ""
    return Check("sip", "ok", f"udp {sip.listen}:{sip.port} is free{registration}")


def check_ports(config: Config) -> list[Check]:
    checks = [check_sip(config)]
    if config.http.enabled:
        host, port = config.http.host, config.http.port
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((host, port))
            except OSError as exc:
                checks.append(
                    Check(
                        "http port",
                        "warn",
                        f"{host}:{port} is taken ({exc.strerror}): by the running appliance, "
                        "or by another program",
                        "if the appliance is not running, set [http] port to a free port",
                    )
                )
            else:
                checks.append(Check("http port", "ok", f"{host}:{port} is free"))
    return checks


def check_service() -> Check:
    if shutil.which("systemctl") is None or not Path("/run/systemd/system").is_dir():
        return Check("service", "ok", "systemd is not running here; skipped")
    states = []
    for verb in ("is-enabled", "is-active"):
        out = subprocess.run(
            ["systemctl", verb, "appliance.service"], capture_output=True, text=True
        )
        states.append(out.stdout.strip() or out.stderr.strip())
    enabled, active = states
    detail = f"appliance.service {enabled}, {active}"
    if active == "active":
        return Check("service", "ok", detail)
    return Check(
        "service",
        "warn" if active in ("inactive", "activating") else "fail",
        detail,
        "journalctl -u appliance -b; then sudo systemctl restart appliance",
    )


def run_checks(config: Config, root: Path) -> list[Check]:
    return [
        check_python(),
        check_packages(),
        check_cpu(),
        *check_native(config, root),
        check_memory(config),
        check_disk(root),
        check_models(config, root),
        *check_audio(config),
        check_gpio(),
        *check_ports(config),
        check_service(),
    ]


def report(checks: list[Check], as_json: bool) -> str:
    if as_json:
        import json

        return json.dumps({"checks": [asdict(c) for c in checks]}, indent=2)
    lines = []
    for c in checks:
        lines.append(f"{c.status.upper():4}  {c.name}: {c.detail}")
        if c.fix:
            lines.append(f"      fix: {c.fix}")
    failed = sum(c.status == "fail" for c in checks)
    warned = sum(c.status == "warn" for c in checks)
    lines.append(f"{failed} problem(s), {warned} warning(s)")
    return "\n".join(lines)
