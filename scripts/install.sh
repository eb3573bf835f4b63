#!/usr/bin/env bash
# Install the appliance as a systemd service on Raspberry Pi OS bookworm (64-bit) or
# JetPack 6 (Ubuntu 22.04), or any Debian-like system. Run from a clone of the repository:
#
#   sudo scripts/install.sh                      # install, or upgrade in place
#   sudo scripts/install.sh --dry-run            # print every action, change nothing
#   sudo scripts/install.sh --uninstall          # remove the service and the code
#   sudo scripts/install.sh --uninstall --purge  # ... and the config, models and user
#
# Each step checks first and acts only when something is missing or different, so a
# second run changes nothing ("nothing to do"). The config in /etc/appliance is created
# once and never overwritten. Options:
#   --profile NAME          board profile (default: detected: pi5-4gb, pi5-8gb,
#                           orin-nano-8gb, else x86-dev)
#   --models-from DIR       import the models from DIR (a USB stick prepared with
#                           `appliance models fetch --dir DIR`) instead of downloading
#   --trust-on-first-use, --accept-licence ID
#                           passed to `appliance models fetch/import` (see docs/models.md)
#   --no-models             skip the models step
#   --root DIR              install into DIR instead of / (image building, tests): no apt,
#                           no starting of the service
set -euo pipefail

SRC="$(cd "$(dirname "$0")/.." && pwd)"
ROOT=""
DRY_RUN=0
UNINSTALL=0
PURGE=0
PROFILE=""
MODELS_FROM=""
MODELS=1
MODEL_ARGS=()

usage() { sed -n '2,23p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while (($#)); do
  case "$1" in
    --dry-run) DRY_RUN=1 ;;
    --uninstall) UNINSTALL=1 ;;
    --purge) PURGE=1 ;;
    --profile) PROFILE="${2:?--profile needs a name}"; shift ;;
    --models-from) MODELS_FROM="${2:?--models-from needs a directory}"; shift ;;
    --no-models) MODELS=0 ;;
    --trust-on-first-use) MODEL_ARGS+=(--trust-on-first-use) ;;
    --accept-licence) MODEL_ARGS+=(--accept-licence "${2:?--accept-licence needs an id}"); shift ;;
    --root) ROOT="$(realpath -m "${2:?--root needs a directory}")"; shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage 2 ;;
  esac
  shift
done
if ((PURGE && !UNINSTALL)); then echo "install.sh: --purge goes with --uninstall" >&2; exit 2; fi

USER_NAME=appliance
OPT="$ROOT/opt/appliance"
VENV="$OPT/venv"
ETC="$ROOT/etc/appliance"
CONFIG="$ETC/appliance.toml"
STATE="$ROOT/var/lib/appliance"
MODELS_DIR="$STATE/models"
UNIT_DIR="$ROOT/etc/systemd/system"
UDEV_DIR="$ROOT/etc/udev/rules.d"
# Runtime packages; build-essential, cmake and the -dev packages build llama-cpp-python
# and pyaudio from source on the board.
APT_PACKAGES=(python3-venv python3-dev build-essential cmake espeak-ng portaudio19-dev
  alsa-utils device-tree-compiler)
# gpiozero's pin factory on the Pi 5 (lgpio) builds from source against liblgpio
PI_APT_PACKAGES=(swig liblgpio-dev)

ACTIONS=0
# run DESCRIPTION CMD...: do it (or, with --dry-run, only say it)
run() {
  local what="$1"; shift
  ACTIONS=$((ACTIONS + 1))
  if ((DRY_RUN)); then echo "would: $what"; else echo "==> $what"; "$@"; fi
}
ok() { ((DRY_RUN)) || echo "ok: $1"; }
systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }
is_jetson() { [ -f "$ROOT/etc/nv_tegra_release" ]; }
is_raspberry_pi() { [ -r /proc/device-tree/model ] && grep -qa "Raspberry Pi" /proc/device-tree/model; }

detect_profile() {
  local model="" mem_kb
  [ -r /proc/device-tree/model ] && model="$(tr -d '\0' < /proc/device-tree/model)"
  mem_kb="$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)"
  if [[ "$model" == *"Raspberry Pi 5"* ]]; then
    if ((mem_kb > 6 * 1024 * 1024)); then echo pi5-8gb; else echo pi5-4gb; fi
  elif is_jetson || [[ "$model" == *"Orin"* ]]; then
    echo orin-nano-8gb
  else
    echo x86-dev
  fi
}

# A hash of the code that gets installed: a changed tree means an upgrade.
source_hash() {
  (cd "$SRC" && find appliance models pyproject.toml README.md docs -type f \
      ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-64)
}

# install_file SRC DEST MODE: copy when DEST is missing or different
install_file() {
  local src="$1" dest="$2" mode="$3"
  if [ -f "$dest" ] && cmp -s "$src" "$dest"; then ok "$dest"; return; fi
  run "install $dest (from ${src#"$SRC"/})" install -D -m "$mode" "$src" "$dest"
}

uid_of() { awk -F: -v u="$1" '$1 == u {print $3}' "$ROOT/etc/passwd"; }
gid_of() { awk -F: -v g="$1" '$1 == g {print $3}' "$ROOT/etc/group"; }

step_apt() {
  if [ -n "$ROOT" ]; then ok "apt packages (not managed with --root)"; return; fi
  local missing=() packages=("${APT_PACKAGES[@]}")
  is_raspberry_pi && packages+=("${PI_APT_PACKAGES[@]}")
  for pkg in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" \
      || missing+=("$pkg")
  done
  if ((${#missing[@]} == 0)); then ok "apt packages"; return; fi
  run "apt-get install ${missing[*]}" \
    env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
}

step_user() {
  for group in audio input gpio; do
    if grep -q "^$group:" "$ROOT/etc/group"; then ok "group $group"; continue; fi
    run "create system group $group" groupadd --system ${ROOT:+--root "$ROOT"} "$group"
  done
  if grep -q "^$USER_NAME:" "$ROOT/etc/passwd"; then
    ok "user $USER_NAME"
  else
    run "create system user $USER_NAME (groups audio, input, gpio)" \
      useradd --system ${ROOT:+--root "$ROOT"} --user-group --home-dir /var/lib/appliance \
        --no-create-home --shell /usr/sbin/nologin --groups audio,input,gpio "$USER_NAME"
  fi
}

step_code() {
  local want have=""
  want="$(source_hash)"
  [ -f "$OPT/.source-hash" ] && have="$(cat "$OPT/.source-hash")"
  if [ -x "$VENV/bin/appliance" ] && [ "$want" = "$have" ]; then ok "$VENV (up to date)"; return; fi
  if [ ! -x "$VENV/bin/python" ]; then
    run "create virtual environment $VENV" python3 -m venv "$VENV"
    run "upgrade pip in $VENV" "$VENV/bin/pip" install -q --upgrade pip wheel
  fi
  # llama.cpp for this CPU's instruction sets, never AMX (appliance/native/build.py)
  run "build llama.cpp for this CPU into $VENV" \
    env PYTHONPATH="$SRC" CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" \
      python3 -m appliance.native.build --install "$VENV/bin/python"
  run "install the appliance and its pinned dependencies into $VENV" \
    env CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install -q --upgrade "$SRC[ptt]"
  if is_raspberry_pi; then
    run "install lgpio (gpiozero on the Pi 5) into $VENV" "$VENV/bin/pip" install -q lgpio==0.2.2.0
  fi
  run "install README.md into $OPT" install -D -m 0644 "$SRC/README.md" "$OPT/README.md"
  run "install the guides (docs/) into $OPT/docs" \
    sh -c "install -d -m 0755 '$OPT/docs' && install -m 0644 '$SRC'/docs/*.md '$OPT/docs/'"
  run "record the installed version" sh -c "echo '$want' > '$OPT/.source-hash'"
  CHANGED=1
}

step_config() {
  local profile="$1" gid
  if [ -f "$CONFIG" ]; then
    ok "$CONFIG (kept as it is)"
  else
    run "create $CONFIG (profile $profile)" sh -c "install -d -m 0750 '$ETC' && \
      sed 's/^profile = .*/profile = \"$profile\"/' '$SRC/systemd/appliance.toml' > '$CONFIG'"
  fi
  # root owns the config, the service's group reads it, nobody else does
  gid="$(gid_of "$USER_NAME")"
  if [ -n "$gid" ] && [ -f "$CONFIG" ] && [ "$(stat -c '%u:%g %a' "$CONFIG")" = "0:$gid 640" ] \
      && [ "$(stat -c '%u:%g %a' "$ETC")" = "0:$gid 750" ]; then
    ok "$CONFIG permissions"
  else
    run "chown root:$USER_NAME $ETC and $CONFIG, modes 0750 and 0640" \
      sh -c "chown 0:$gid '$ETC' '$CONFIG' && chmod 0750 '$ETC' && chmod 0640 '$CONFIG'"
  fi
}

step_state() {
  local uid gid
  uid="$(uid_of "$USER_NAME")"; gid="$(gid_of "$USER_NAME")"
  if [ -d "$STATE" ] && [ -d "$MODELS_DIR" ] && [ "$(stat -c %u "$STATE")" = "$uid" ]; then
    ok "$STATE"; return
  fi
  # the service owns its state; the models are root's: it reads them, never writes them
  run "create $STATE (owner $USER_NAME) and $MODELS_DIR (owner root)" sh -c \
    "install -d -m 0750 -o '${uid:-0}' -g '${gid:-0}' '$STATE' && \
     install -d -m 0750 -o 0 -g '${gid:-0}' '$MODELS_DIR'"
}

step_models() {
  local profile="$1"
  if ((!MODELS)); then ok "models (skipped: --no-models)"; return; fi
  local appliance=("$VENV/bin/appliance")
  if [ -x "$VENV/bin/appliance" ] && "${appliance[@]}" models verify --profile "$profile" \
      --config "$CONFIG" --dir "$MODELS_DIR" >/dev/null 2>&1; then
    ok "models of profile $profile (verified)"; return
  fi
  if [ -n "$MODELS_FROM" ]; then
    run "import the $profile models from $MODELS_FROM" "${appliance[@]}" models import \
      "$MODELS_FROM" --profile "$profile" --dir "$MODELS_DIR" "${MODEL_ARGS[@]}"
  else
    run "download the $profile models into $MODELS_DIR" "${appliance[@]}" models fetch \
      --profile "$profile" --dir "$MODELS_DIR" "${MODEL_ARGS[@]}"
  fi
  run "make $MODELS_DIR readable by the service" sh -c \
    "chgrp -R '$(gid_of "$USER_NAME")' '$MODELS_DIR' && chmod -R g+rX '$MODELS_DIR'"
}

step_selftest() {
  # a tiny real inference with each native library, each in a child process: a build that
  # crashes on this CPU stops the install here, with its fix, before the service starts
  if ((DRY_RUN || !MODELS)) || [ -n "$ROOT" ]; then return; fi
  if ! "$VENV/bin/appliance" doctor --native --config "$CONFIG"; then
    echo "install.sh: a native library failed its self-test on this CPU (see above);" \
      "the service was not started" >&2
    exit 1
  fi
}

step_system_files() {
  install_file "$SRC/systemd/appliance.service" "$UNIT_DIR/appliance.service" 0644
  if is_jetson; then
    install_file "$SRC/systemd/appliance.service.d/jetson.conf" \
      "$UNIT_DIR/appliance.service.d/jetson.conf" 0644
  fi
  install_file "$SRC/firmware/udev/70-appliance-audio.rules" \
    "$UDEV_DIR/70-appliance-audio.rules" 0644
  install_file "$SRC/firmware/udev/71-appliance-gpio.rules" \
    "$UDEV_DIR/71-appliance-gpio.rules" 0644
  # /etc/asound.conf may be the operator's own: install ours only where there is none
  local asound="$ROOT/etc/asound.conf"
  if [ ! -e "$asound" ]; then
    install_file "$SRC/firmware/alsa/asound.conf" "$asound" 0644
  elif cmp -s "$SRC/firmware/alsa/asound.conf" "$asound"; then
    ok "$asound"
  else
    echo "note: $asound exists and differs from firmware/alsa/asound.conf; left alone" \
      "(the kiosk needs voice_in/voice_out, see docs/kiosk.md)" >&2
  fi
}

step_enable() {
  if [ -L "$UNIT_DIR/multi-user.target.wants/appliance.service" ]; then
    ok "appliance.service enabled"
  else
    run "enable appliance.service" systemctl ${ROOT:+--root="$ROOT"} enable appliance.service
  fi
  if ! systemd_running; then return; fi
  if ((CHANGED)) || ! systemctl is-active --quiet appliance.service; then
    run "systemctl daemon-reload" systemctl daemon-reload
    run "udevadm control --reload" udevadm control --reload
    run "(re)start appliance.service" systemctl restart appliance.service
  fi
}

uninstall() {
  if systemd_running && systemctl is-enabled --quiet appliance.service 2>/dev/null; then
    run "stop and disable appliance.service" systemctl disable --now appliance.service
  elif [ -L "$UNIT_DIR/multi-user.target.wants/appliance.service" ]; then
    run "disable appliance.service" systemctl ${ROOT:+--root="$ROOT"} disable appliance.service
  fi
  for path in "$UNIT_DIR/appliance.service" "$UNIT_DIR/appliance.service.d" "$OPT" \
      "$UDEV_DIR/70-appliance-audio.rules" "$UDEV_DIR/71-appliance-gpio.rules"; do
    [ -e "$path" ] && run "remove $path" rm -rf "$path"
  done
  if ((PURGE)); then
    for path in "$ETC" "$STATE"; do [ -e "$path" ] && run "remove $path" rm -rf "$path"; done
    if grep -q "^$USER_NAME:" "$ROOT/etc/passwd"; then
      run "remove user $USER_NAME" userdel ${ROOT:+--root "$ROOT"} "$USER_NAME"
    fi
  else
    echo "kept: $ETC (config) and $STATE (models); --purge removes them"
  fi
  if cmp -s "$SRC/firmware/alsa/asound.conf" "$ROOT/etc/asound.conf" 2>/dev/null; then
    echo "kept: $ROOT/etc/asound.conf (other programs may use voice_in/voice_out)"
  fi
}

if [ -z "$ROOT" ] && ((!DRY_RUN)) && [ "$(id -u)" -ne 0 ]; then
  echo "install.sh: run as root (sudo scripts/install.sh), or with --dry-run" >&2
  exit 1
fi
if [ -n "$ROOT" ] && [ ! -f "$ROOT/etc/passwd" ]; then
  echo "install.sh: $ROOT/etc/passwd is missing: --root must be a system tree" >&2
  exit 1
fi

CHANGED=0
if ((UNINSTALL)); then
  uninstall
else
  PROFILE="${PROFILE:-$(detect_profile)}"
  echo "installing the appliance from $SRC into ${ROOT:-/} (profile $PROFILE)"
  step_apt
  step_user
  step_code
  step_config "$PROFILE"
  step_state
  step_models "$PROFILE"
  step_selftest
  step_system_files
  step_enable
fi
if ((ACTIONS == 0)); then
  echo "nothing to do"
elif ((DRY_RUN)); then
  echo "$ACTIONS actions (dry run: nothing was changed)"
else
  echo "done: $ACTIONS actions"
fi
