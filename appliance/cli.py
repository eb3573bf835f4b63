"""The `appliance` command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from appliance import config as config_mod
from appliance import logs
from appliance.store.commands import add_models_parser
from appliance.store.disk import ModelError, models_dir
from appliance.store.download import DownloadError
from appliance.store.manifest import ManifestError

if TYPE_CHECKING:
    from appliance.session.modelset import ModelSet

EXAMPLE_QUESTION = Path(__file__).parent / "data" / "question.wav"


def _load_models(config: config_mod.Config) -> ModelSet:
    from appliance.session.modelset import ModelSet

    try:
        models = ModelSet(config)
    except ModelError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(config_mod.EX_CONFIG) from None
    models.warm()
    return models


def cmd_converse(args: argparse.Namespace) -> int:
    from appliance.converse import converse_command

    config = config_mod.load_or_exit(args.config)
    t0 = time.perf_counter()
    models = _load_models(config)
    print(f"models ready in {time.perf_counter() - t0:.1f} s", file=sys.stderr)
    try:
        return converse_command(models, config, args.input, args.out, args.transcript)
    finally:
        models.close()


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


def cmd_room_token(args: argparse.Namespace) -> int:
    from appliance.room.commands import room_token  # livekit loads only for this command

    return room_token(args)


def cmd_devices(args: argparse.Namespace) -> int:
    from appliance.usb.portaudio import show_devices

    return show_devices(as_json=args.json)


def cmd_run(args: argparse.Namespace) -> int:
    from appliance import logs, service

    config = config_mod.load_or_exit(args.config)
    if not args.verbose:
        logs.setup(service.LOG_LEVELS[config.service.log_level])
    return service.run(config, args.config)


def cmd_dial(args: argparse.Namespace) -> int:
    """Place a call with the agent on it, from this process, until either side hangs up."""
    import asyncio

    from appliance.sip.dial import dial_with_agent

    config = config_mod.load_or_exit(args.config)
    sip = config.sip.model_copy(update={"enabled": True, "port": args.port})
    config = config.model_copy(update={"sip": sip})
    models = _load_models(config)
    try:
        return asyncio.run(dial_with_agent(config, models, args.uri, args.timeout))
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return config_mod.EX_CONFIG
    finally:
        models.close()


def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance.doctor import check_cpu, check_native, report, run_checks

    config = config_mod.load_or_exit(args.config)
    root = models_dir(config.models.dir)
    native = args.native
    checks = [check_cpu(), *check_native(config, root)] if native else run_checks(config, root)
    print(report(checks, args.json))
    return 1 if any(c.status == "fail" for c in checks) else 0


def cmd_events(args: argparse.Namespace) -> int:
    import asyncio

    from appliance.observe.events import follow, stream_url

    config = config_mod.load_or_exit(args.config)
    try:
        token = args.token if args.token is not None else config.http.secret()
    except config_mod.ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return config_mod.EX_CONFIG
    try:
        return asyncio.run(follow(args.url or stream_url(config.http), token, args.json))
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

    add_models_parser(sub)

    p = sub.add_parser("room", help="LiveKit room tools")
    rsub = p.add_subparsers(dest="action", required=True)
    t = rsub.add_parser("token", help="print a join token for a person in a conversation's room")
    t.add_argument("room", help="the room's name (the events stream and the log show it)")
    t.add_argument("--identity", required=True, help="the person's identity in the room")
    t.add_argument("--name", default="", help="the name shown to others (default: identity)")
    t.add_argument("--listen-only", action="store_true", help="may hear the room, not speak")
    t.add_argument("--ttl", type=int, default=0, help="seconds the token is valid")
    t.add_argument("--config", default=None, help="config file ([livekit])")
    t.set_defaults(func=cmd_room_token)

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
    except (ModelError, DownloadError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except ManifestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return config_mod.EX_CONFIG


if __name__ == "__main__":
    raise SystemExit(main())
