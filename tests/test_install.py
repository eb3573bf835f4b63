"""scripts/install.sh into a scratch system tree (`--root`): dry run, install, no-op, uninstall.

`--root` installs everything the installer owns (user and groups in the tree's
/etc/passwd, the virtual environment, config, models, unit, udev rules, the enablement
symlink) into a directory, with apt left out. The models come from the test machine's own
models directory (`--models-from`, the USB-stick path), not from the network.
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from appliance.store import disk

REPO = Path(__file__).parent.parent
INSTALL = REPO / "scripts" / "install.sh"

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the installer runs as root")


def clean_root(tmp_path: Path) -> Path:
    """A system tree as a fresh OS image has it: only the user and group databases."""
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (root / "etc" / "group").write_text("root:x:0:\naudio:x:29:\ninput:x:101:\n")
    for name in ("shadow", "gshadow"):
        (root / "etc" / name).touch(mode=0o640)
    return root


def install(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(INSTALL), "--root", str(root), "--profile", "x86-dev", *args],
        capture_output=True,
        text=True,
        timeout=900,
    )


def files_under(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_dry_run_on_a_clean_root_lists_every_action_and_changes_nothing(tmp_path: Path) -> None:
    root = clean_root(tmp_path)
    before = files_under(root)
    out = install(root, "--dry-run")
    assert out.returncode == 0, out.stderr
    actions = [line for line in out.stdout.splitlines() if line.startswith("would: ")]
    expected = [
        "create system group gpio",
        "create system user appliance (groups audio, input, gpio)",
        f"create virtual environment {root}/opt/appliance/venv",
        f"install the appliance and its pinned dependencies into {root}/opt/appliance/venv",
        f"create {root}/etc/appliance/appliance.toml (profile x86-dev)",
        f"download the x86-dev models into {root}/var/lib/appliance/models",
        f"install {root}/etc/systemd/system/appliance.service (from systemd/appliance.service)",
        f"install {root}/etc/udev/rules.d/70-appliance-audio.rules",
        f"install {root}/etc/udev/rules.d/71-appliance-gpio.rules",
        f"install {root}/etc/asound.conf (from firmware/alsa/asound.conf)",
        "enable appliance.service",
    ]
    for action in expected:
        assert any(a.startswith(f"would: {action}") for a in actions), (action, out.stdout)
    assert out.stdout.rstrip().endswith("actions (dry run: nothing was changed)")
    assert files_under(root) == before


def test_install_then_a_second_run_changes_nothing_then_uninstall(tmp_path: Path) -> None:
    root = clean_root(tmp_path)
    models = disk.models_dir()
    first = install(root, "--models-from", str(models))
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.rstrip().startswith("installing") and "done:" in first.stdout

    passwd = (root / "etc" / "passwd").read_text()
    assert "appliance:x:" in passwd and ":/var/lib/appliance:/usr/sbin/nologin" in passwd
    group = {line.split(":")[0]: line for line in (root / "etc" / "group").read_text().split()}
    for name in ("audio", "input", "gpio"):
        assert group[name].endswith(":appliance"), group[name]
    gid = int(group["appliance"].split(":")[2])
    config = root / "etc" / "appliance" / "appliance.toml"
    st = config.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o640)
    assert 'profile = "x86-dev"' in config.read_text()
    wants = root / "etc" / "systemd" / "system" / "multi-user.target.wants" / "appliance.service"
    assert wants.is_symlink()
    venv = root / "opt" / "appliance" / "venv" / "bin" / "appliance"
    models_dir = root / "var" / "lib" / "appliance" / "models"
    check = subprocess.run(
        [str(venv), "models", "verify", "--config", str(config), "--dir", str(models_dir)],
        capture_output=True,
        text=True,
    )
    assert check.returncode == 0, check.stdout + check.stderr

    second = install(root, "--models-from", str(models))
    assert second.returncode == 0, second.stderr
    assert second.stdout.rstrip().endswith("nothing to do"), second.stdout
    assert "==>" not in second.stdout

    # an edited config survives an upgrade run
    config.write_text(config.read_text() + "\n# edited by the operator\n")
    assert install(root, "--models-from", str(models)).returncode == 0
    assert config.read_text().endswith("# edited by the operator\n")

    gone = install(root, "--uninstall")
    assert gone.returncode == 0, gone.stderr
    assert not (root / "opt" / "appliance").exists() and not wants.exists()
    assert not (root / "etc" / "systemd" / "system" / "appliance.service").exists()
    assert config.exists() and (models_dir / "whisper-tiny.en").is_dir()  # kept
    purged = install(root, "--uninstall", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not config.exists() and not models_dir.exists()
    assert "appliance:x:" not in (root / "etc" / "passwd").read_text()


def test_the_installer_refuses_bad_arguments(tmp_path: Path) -> None:
    out = subprocess.run(["bash", str(INSTALL), "--purge"], capture_output=True, text=True)
    assert out.returncode == 2 and "--purge goes with --uninstall" in out.stderr
    out = subprocess.run(
        ["bash", str(INSTALL), "--root", str(tmp_path / "nothing")], capture_output=True, text=True
    )
    assert out.returncode == 1 and "etc/passwd is missing" in out.stderr
