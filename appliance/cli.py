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
from . import logs
from . import models as store
from .download import DownloadError
from .manifest import Manifest, ManifestError, ModelEntry
from .manifest import load as load_manifest

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
    if config.livekit.enabled:
        try:
            config.livekit.secret()
        except config_mod.ConfigError as exc:
            print(f"error: {args.file}: {exc}", file=sys.stderr)
            return EX_CONFIG
    print(f"{args.file}: ok (turn_detection={config.turn_detection!r})")
    if config.ptt.enabled and config.session.turn_detection != "manual":
        print(
            f"note: [ptt] backend = {config.ptt.backend!r} makes turns manual (the button "
            f"ends each turn); [session] turn_detection = "
            f"{config.session.turn_detection!r} is not used"
        )
    return 0


def _models_context(args: argparse.Namespace) -> tuple[config_mod.Config, Manifest, Path]:
    config = _load_config(args.config)
    manifest = load_manifest(config.models.manifest)
    root = Path(args.dir).expanduser() if args.dir else store.models_dir(config.models.dir)
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
    recorded = store.TrustStore(root).data["licences"]
    if source is not None:
        recorded = {**store.TrustStore(source).data["licences"], **recorded}
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


def _report(root: Path, results: list[store.FileResult], as_json: bool) -> int:
    failed = [r for r in results if r.action == "rejected"]
    if as_json:
        print(
            json.dumps(
                {"models_dir": str(root), "ok": not failed, "files": store.result_dicts(results)},
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
    store.check_space(entries, root)
    restricted = [e for e in entries if e.restricted and not e.embedded]
    if restricted:
        with store.updating_trust(root) as trust:
            for entry in restricted:
                trust.accept_licence(entry)
    results: list[store.FileResult] = []
    for entry in entries:
        if source is not None:
            results += store.import_dir(
                entry, source, root, digests=digests, trust_on_first_use=args.trust_on_first_use
            )
        else:
            results += store.fetch(
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
        removed = store.remove(entry, root)
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
    trust = store.TrustStore(root)
    rows: list[dict[str, Any]] = []
    for e in entries:
        present = store.installed(e, root)
        statuses = store.verify([e], root) if present or args.action == "verify" else []
        rows.append(
            {
                "id": e.id,
                "kind": e.kind,
                "in_use": e.id in in_use,
                "profiles": store.profiles_using(manifest, e.id),
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


def cmd_devices(args: argparse.Namespace) -> int:
    from .usbaudio import AudioDeviceError, list_devices

    try:
        devices = list_devices()
    except AudioDeviceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"devices": devices}, indent=2))
        return 0
    if not devices:
        print(
            "no audio devices: is the USB sound card plugged in, and the ALSA config "
            "(/etc/asound.conf) installed? See `aplay -l`.",
            file=sys.stderr,
        )
        return 1
    for d in devices:
        kinds = "/".join(k for k, n in (("in", d["inputs"]), ("out", d["outputs"])) if n)
        print(f"{d['index']:3}  {kinds:6}  {d['default_rate']:6} Hz  {d['name']}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from . import logs, service

    config = _load_config(args.config)
    if not args.verbose:
        logs.setup(service.LOG_LEVELS[config.service.log_level])
    return service.run(config, args.config)


def cmd_dial(args: argparse.Namespace) -> int:
    """Place a call with the agent on it, from this process, until either side hangs up."""
    import asyncio
    import signal

    from .sip.bridge import serve_sip
    from .sip.message import SipError

    config = _load_config(args.config)
    sip = config.sip.model_copy(update={"enabled": True, "port": args.port})
    config = config.model_copy(update={"sip": sip})
    models = _load_models(config)

    async def main() -> int:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        ready: asyncio.Future[Any] = loop.create_future()
        bridge = asyncio.create_task(serve_sip(lambda: config, models, stop, ready=ready))
        try:
            await asyncio.wait([bridge, ready], return_when=asyncio.FIRST_COMPLETED)
            if not ready.done():
                bridge.result()  # raises why the bridge could not start
            ua = ready.result()
            try:
                call = await ua.dial(args.uri, timeout=args.timeout)
            except (ConnectionRefusedError, TimeoutError, OSError, SipError) as exc:
                print(f"error: {args.uri}: {exc}", file=sys.stderr)
                return 1
            print(f"connected to {args.uri} (call {call.call_id})", file=sys.stderr)
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, lambda: asyncio.ensure_future(call.hangup("Ctrl-C")))
            await call.ended.wait()
            print(f"call ended: {call.end_reason}", file=sys.stderr)
            return 0
        finally:
            stop.set()
            await bridge

    try:
        return asyncio.run(main())
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_CONFIG
    finally:
        models.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import check_cpu, check_native, report, run_checks

    config = _load_config(args.config)
    root = store.models_dir(config.models.dir)
    native = args.native
    checks = [check_cpu(), *check_native(config, root)] if native else run_checks(config, root)
    print(report(checks, args.json))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_events(args: argparse.Namespace) -> int:
    import asyncio

    from .events import follow

    config = _load_config(args.config)
    h = config.http
    host = "127.0.0.1" if h.host in ("0.0.0.0", "::") else h.host
    url = args.url or f"ws://{host}:{h.port}/api/events"
    try:
        token = args.token if args.token is not None else h.secret()
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_CONFIG
    try:
        return asyncio.run(follow(url, token, args.json))
    except KeyboardInterrupt:
        return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench import run_bench

    return run_bench(args, _load_config(args.config))


def cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import run_eval

    return run_eval(args, _load_config(args.config))


def cmd_bench_audio(args: argparse.Namespace) -> int:
    from .bench_audio import run_bench_audio

    return run_bench_audio(args, _load_config(args.config))


def cmd_bench_sip(args: argparse.Namespace) -> int:
    from .bench_sip import run_bench_sip

    return run_bench_sip(args, _load_config(args.config))


def cmd_bench_ptt(args: argparse.Namespace) -> int:
    from .bench_ptt import run_bench_ptt

    return run_bench_ptt(args, _load_config(args.config))


def cmd_bench_barge_in(args: argparse.Namespace) -> int:
    from .bench_barge_in import run_bench_barge_in

    return run_bench_barge_in(args, _load_config(args.config))


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

    p = sub.add_parser("run", help="run the appliance (the USB kiosk when [audio] is enabled)")
    p.add_argument("--config", default=None, help="config file")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("devices", help="list audio input and output devices")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_devices)

    p = sub.add_parser("dial", help="call a phone (SIP URI) and put the agent on the line")
    p.add_argument("uri", help="sip:user@host[:port]")
    p.add_argument("--config", default=None, help="config file ([sip], [agent], models)")
    p.add_argument("--port", type=int, default=0, help="local SIP port (default: any free)")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for an answer")
    p.set_defaults(func=cmd_dial)

    p = sub.add_parser("events", help="print the live events stream of a running appliance")
    p.add_argument("--config", default=None, help="config file (for [http] host, port, token)")
    p.add_argument("--url", default=None, help="ws://host:port/api/events (default: from config)")
    p.add_argument("--token", default=None, help="access token (default: from config)")
    p.add_argument("--json", action="store_true", help="one JSON message per line")
    p.set_defaults(func=cmd_events)

    p = sub.add_parser("doctor", help="check the installation and say how to fix problems")
    p.add_argument("--config", default=None, help="config file (default: embedded)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--native",
        action="store_true",
        help="only the CPU and the native libraries' self-tests (what the installers run)",
    )
    p.set_defaults(func=cmd_doctor)

    p = sub.add_parser("bench", help="voice-to-voice latency benchmark")
    p.add_argument("--json", dest="json_out", default="bench/results.json")
    p.add_argument("--config", default=None)
    p.add_argument("--utterances", type=int, default=10)
    p.add_argument("--chart", default=None, help="also write a per-stage chart (PNG)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("eval", help="conversation quality on a spoken corpus (bench/eval)")
    p.add_argument("--json", dest="json_out", default="bench/eval-results.json")
    p.add_argument("--config", default=None)
    p.add_argument("--corpus", default="bench/eval/corpus.json")
    p.add_argument("--set", choices=("eval", "tune", "all"), default="eval")
    p.add_argument("--configs", default="appliance,stock", help="appliance and/or stock")
    p.add_argument("--limit", type=int, default=0, help="only the first N items")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("bench-audio", help="USB audio bridge figures: echo, CPU, latency")
    p.add_argument("--json", dest="json_out", default="bench/usbaudio.json")
    p.add_argument("--config", default=None)
    p.set_defaults(func=cmd_bench_audio)

    p = sub.add_parser("bench-ptt", help="push-to-talk release to first agent audio")
    p.add_argument("--json", dest="json_out", default="bench/ptt.json")
    p.add_argument("--config", default=None)
    p.add_argument("--utterances", type=int, default=10)
    p.add_argument(
        "--compare-interims",
        action="store_true",
        help="each question without and with interim transcripts while held, alternating",
    )
    p.set_defaults(func=cmd_bench_ptt)

    p = sub.add_parser("bench-barge-in", help="user talks over the agent: time to silence it")
    p.add_argument("--json", dest="json_out", default="bench/barge-in.json")
    p.add_argument("--config", default=None)
    p.add_argument("--utterances", type=int, default=10)
    p.set_defaults(func=cmd_bench_barge_in)

    p = sub.add_parser("bench-sip", help="phone bridge: call set-up, RTP timing, concurrency")
    p.add_argument("--json", dest="json_out", default="bench/sip.json")
    p.add_argument("--config", default=None)
    p.add_argument("--calls", default="1,2,3", help="concurrency levels, e.g. 1,2,3")
    p.set_defaults(func=cmd_bench_sip)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    talkative = args.command in ("run", "dial")  # a daemon, a call: say what happens
    logs.setup(logging.DEBUG if args.verbose else logging.INFO if talkative else logging.WARNING)
    try:
        return int(args.func(args) or 0)
    except (store.ModelError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EX_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
