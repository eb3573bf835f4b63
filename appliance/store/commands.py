"""`appliance models ...`: list, verify, fetch, import and remove the model store's files."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from appliance import config as config_mod
from appliance.store.disk import installed, models_dir, profiles_using
from appliance.store.install import (
    FileResult,
    check_space,
    fetch,
    import_dir,
    remove,
    result_dicts,
    updating_trust,
)
from appliance.store.integrity import TrustStore, verify
from appliance.store.manifest import Manifest, ManifestError, ModelEntry
from appliance.store.manifest import load as load_manifest


def _models_context(args: argparse.Namespace) -> tuple[config_mod.Config, Manifest, Path]:
    config = config_mod.load_or_exit(args.config)
    manifest = load_manifest(config.models.manifest)
    root = Path(args.dir).expanduser() if args.dir else models_dir(config.models.dir)
    return config, manifest, root


def _selected(args: argparse.Namespace, config: config_mod.Config, manifest: Manifest) -> list[str]:
    """Model ids named on the command line, by --profile, else those the config uses."""
    ids = list(args.ids)
    if args.profile:
        ids += manifest.profile(args.profile).model_ids()
    if not ids:
        ids = config.models_in_use()
    for model_id in ids:
        if model_id not in manifest.models:
            raise ManifestError(f"unknown model {model_id!r}; see `appliance models list`")
    return list(dict.fromkeys(ids))


def _digest_args(values: list[str]) -> dict[str, str]:
    digests = {}
    for value in values:
        name, sep, digest = value.partition("=")
        digest = digest.strip().lower()
        if not sep or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ManifestError(f"--sha256 {value!r}: expected FILE=<64 hex digits>")
        digests[name.strip()] = digest
    return digests


def _licences_accepted(
    entries: list[ModelEntry], accepted: list[str], root: Path, source: Path | None = None
) -> bool:
    """Show each licence; restricted ones need --accept-licence ID (or a recorded acceptance)."""
    recorded = TrustStore(root).data["licences"]
    if source is not None:
        recorded = {**TrustStore(source).data["licences"], **recorded}
    ok = True
    for e in entries:
        if e.embedded:
            continue
        note = "" if e.trusted_digests else f"\n  digest {e.digest}: {e.digest_note}"
        print(f"{e.id}: {e.size / 1e6:.1f} MB, licence: {e.licence}{note}", file=sys.stderr)
        if not e.restricted:
            continue
        if e.id in accepted or "all" in accepted or e.id in recorded:
            continue
        where = f" ({e.licence_url})" if e.licence_url else ""
        print(
            f"error: {e.id} is under {e.licence}{where}, which restricts use; "
            f"read it and pass --accept-licence {e.id} to accept it",
            file=sys.stderr,
        )
        ok = False
    return ok


def _report(root: Path, results: list[FileResult], as_json: bool) -> int:
    failed = [r for r in results if r.action == "rejected"]
    if as_json:
        print(
            json.dumps(
                {"models_dir": str(root), "ok": not failed, "files": result_dicts(results)},
                indent=2,
            )
        )
    else:
        for r in results:
            detail = f": {r.detail}" if r.detail and r.action != "present" else ""
            print(f"{r.action:>9}  {r.model} {r.file}{detail}")
    return 1 if failed else 0


def cmd_models_install(args: argparse.Namespace) -> int:
    """fetch and import."""
    config, manifest, root = _models_context(args)
    importing = args.action == "import"
    source = Path(args.source).expanduser() if importing else None
    if source is not None and not source.is_dir():
        print(f"error: {source}: not a directory", file=sys.stderr)
        return 1
    if importing and not args.ids and not args.profile:
        assert source is not None
        ids = [
            e.id
            for e in manifest.models.values()
            if not e.embedded
            and ((source / e.dir).is_dir() or any((source / n).is_file() for n in _archives(e)))
        ]
        if not ids:
            print(f"error: {source}: no model of the manifest found there", file=sys.stderr)
            return 1
    else:
        ids = _selected(args, config, manifest)
    entries = [manifest.models[i] for i in ids]
    digests = _digest_args(args.sha256)
    if not _licences_accepted(entries, args.accept_licence, root, source):
        return 1
    check_space(entries, root)
    restricted = [e for e in entries if e.restricted and not e.embedded]
    if restricted:
        with updating_trust(root) as trust:
            for entry in restricted:
                trust.accept_licence(entry)
    results: list[FileResult] = []
    for entry in entries:
        if source is not None:
            results += import_dir(
                entry, source, root, digests=digests, trust_on_first_use=args.trust_on_first_use
            )
        else:
            results += fetch(
                entry, root, digests=digests, trust_on_first_use=args.trust_on_first_use
            )
    return _report(root, results, args.json)


def _archives(entry: ModelEntry) -> list[str]:
    """The file names of the registry packages a model comes in (its archive, or the
    packages its files' parts are in)."""
    names = [entry.archive.filename] if entry.archive else []
    return names + [p.archive.filename for f in entry.files for p in f.parts]


def cmd_models_remove(args: argparse.Namespace) -> int:
    config, manifest, root = _models_context(args)
    in_use = set(config.models_in_use())
    for model_id in _selected(args, config, manifest) if args.ids or args.profile else []:
        if model_id in in_use and not args.force:
            print(
                f"error: {model_id} is in use by the configuration; the daemon would not start "
                "without it (pass --force to remove it anyway)",
                file=sys.stderr,
            )
            return 1
        entry = manifest.models[model_id]
        if entry.embedded:
            print(f"{model_id}: part of an installed package, left alone", file=sys.stderr)
            continue
        removed = remove(entry, root)
        print(f"{model_id}: removed {len(removed)} files from {root / entry.dir}")
    return 0


def cmd_models_show(args: argparse.Namespace) -> int:
    """list and verify."""
    config, manifest, root = _models_context(args)
    in_use = set(config.models_in_use())
    if args.action == "verify":
        entries = [manifest.models[i] for i in _selected(args, config, manifest)]
    elif args.profile:
        entries = [manifest.models[i] for i in manifest.profile(args.profile).model_ids()]
    else:
        entries = list(manifest.models.values())
    trust = TrustStore(root)
    rows: list[dict[str, Any]] = []
    for e in entries:
        present = installed(e, root)
        statuses = verify([e], root) if present or args.action == "verify" else []
        rows.append(
            {
                "id": e.id,
                "kind": e.kind,
                "in_use": e.id in in_use,
                "profiles": profiles_using(manifest, e.id),
                "installed": present,
                "verified": bool(statuses) and all(s.ok for s in statuses),
                "size": e.size,
                "quantisation": e.quantisation,
                "licence": e.licence,
                "restricted": e.restricted,
                "licence_accepted": e.id in trust.data["licences"],
                "digest": e.digest,
                "source": e.source,
                "problems": [f"{s.path}: {s.detail}" for s in statuses if not s.ok],
            }
        )
    if args.json:
        print(json.dumps({"models_dir": str(root), "models": rows}, indent=2))
    else:
        print(f"models directory: {root}   (* = in use by the configuration)")
        for r in rows:
            state = "verified" if r["verified"] else "NOT OK" if r["installed"] else "not installed"
            mark = "*" if r["in_use"] else " "
            print(
                f"{mark} {r['id']:38} {r['kind']:4} {r['size'] / 1e6:7.1f} MB  {state:13}  "
                f"{r['licence']}  [{', '.join(r['profiles']) or '-'}]"
            )
            for p in r["problems"] if r["installed"] or args.action == "verify" else []:
                print(f"      {p}")
    if args.action == "list":
        return 0
    return 0 if all(r["verified"] for r in rows) else 1


def cmd_models_profiles(args: argparse.Namespace) -> int:
    config, manifest, _ = _models_context(args)
    out = []
    for p in manifest.profiles.values():
        entries = [manifest.models[i] for i in p.model_ids()]
        out.append(
            {
                **p.model_dump(),
                "download_size": sum(e.size for e in entries),
                "licences": {e.id: e.licence for e in entries},
                "selected": p.name == config.models.profile,
            }
        )
    if args.json:
        print(json.dumps({"profiles": out}, indent=2))
        return 0
    for row in out:
        mark = " (selected)" if row["selected"] else ""
        print(
            f"{row['name']}{mark}: {row['board']}; {row['download_size'] / 1e6:.0f} MB, "
            f"settings {row['settings']}"
        )
        for kind, model_id in manifest.profiles[row["name"]].by_kind().items():
            why = row["why"].get(kind, "")
            print(f"  {kind:4} {model_id:38} {why}")
    return 0


def add_models_parser(sub: Any) -> None:
    """`appliance models ...` on the command line's subparsers."""
    p = sub.add_parser("models", help="the model store: list, verify, fetch, import, remove")
    msub = p.add_subparsers(dest="action", required=True)

    def models_parser(name: str, help: str, *, ids: bool = True) -> argparse.ArgumentParser:
        m = msub.add_parser(name, help=help)
        if ids:
            m.add_argument("ids", nargs="*", help="model ids (default: those the config uses)")
            m.add_argument("--profile", default=None, help="the models of this board profile")
        m.add_argument("--config", default=None, help="config file (default: embedded)")
        m.add_argument("--dir", default=None, help="models directory (default: from config)")
        m.add_argument("--json", action="store_true", help="machine-readable output")
        return m

    m = models_parser(
        "list", "every model: installed, verified, size, licence, profiles", ids=False
    )
    m.add_argument("--profile", default=None, help="only this profile's models")
    m.set_defaults(func=cmd_models_show)
    models_parser("verify", "check the sha256 of every model file in use").set_defaults(
        func=cmd_models_show
    )
    models_parser("profiles", "the board profiles and why", ids=False).set_defaults(
        func=cmd_models_profiles
    )
    for name, help in (
        ("fetch", "download models (resumable, verified, atomic)"),
        ("import", "side-load models from a directory or USB stick, verified"),
    ):
        m = models_parser(name, help)
        if name == "import":
            m.add_argument("source", help="directory holding a copied models directory or wheels")
            m.add_argument("ids", nargs="*", help="model ids (default: every model found)")
        m.add_argument(
            "--accept-licence",
            action="append",
            default=[],
            metavar="ID",
            help="accept the restricting licence of this model ('all' for every one)",
        )
        m.add_argument(
            "--sha256",
            action="append",
            default=[],
            metavar="FILE=HEX",
            help="the digest you checked for a file whose manifest digest is not verified",
        )
        m.add_argument(
            "--trust-on-first-use",
            action="store_true",
            help="accept and record the digest of what arrives for unverified files",
        )
        m.set_defaults(func=cmd_models_install)
    m = models_parser("remove", "delete models from the models directory")
    m.add_argument("--force", action="store_true", help="even when the config uses them")
    m.set_defaults(func=cmd_models_remove)
