"""Trust records and verification: which digest each model file must have, and checking it.

Digests come from the manifest when it says they were verified. For the other models
the operator passes the digest (`--sha256`) or accepts the one that arrives
(`--trust-on-first-use`); either way it is recorded in `<models dir>/trust.json` and
checked from then on. Licence acceptances are recorded there too. The daemon verifies
every file in use before it loads anything.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from appliance.store.disk import ModelError, embedded_files, file_path, fix_hint, sha256_of
from appliance.store.manifest import ModelEntry, ModelFile

TRUST_FILE = "trust.json"


@dataclass
class FileStatus:
    path: Path
    ok: bool
    detail: str


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


def verify(entries: Iterable[ModelEntry], root: Path) -> list[FileStatus]:
    """Check every file of the given entries (hashing in parallel threads)."""
    trust = TrustStore(root)
    jobs: list[tuple[Path, str | None, int, ModelEntry]] = []
    missing: list[FileStatus] = []
    for entry in entries:
        if entry.embedded:
            found = embedded_files(entry)
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
