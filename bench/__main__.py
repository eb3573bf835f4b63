"""The benchmarks' command line: `python -m bench <name>` from the repository root.

Each benchmark imports the daemon's code and drives it; the daemon never imports bench/.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable

from appliance import config as config_mod
from appliance import logs


def _runner(module: str, function: str) -> Callable[[argparse.Namespace], int]:
    """A command that loads the config, then runs `function` of `bench.<module>`."""

    def run(args: argparse.Namespace) -> int:
        import importlib

        config = config_mod.load_or_exit(args.config)
        fn = getattr(importlib.import_module(f"bench.{module}"), function)
        return int(fn(args, config) or 0)

    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    def add(
        name: str, help: str, module: str, function: str, json_out: str
    ) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help)
        p.add_argument("--json", dest="json_out", default=json_out)
        p.add_argument("--config", default=None)
        p.set_defaults(func=_runner(module, function))
        return p

    p = add("latency", "voice-to-voice latency", "latency", "run_bench", "bench/results.json")
    p.add_argument("--utterances", type=int, default=10)
    p.add_argument("--chart", default=None, help="also write a per-stage chart (PNG)")

    p = add(
        "eval",
        "conversation quality on a spoken corpus (bench/eval)",
        "evaluation",
        "run_eval",
        "bench/eval-results.json",
    )
    p.add_argument("--corpus", default="bench/eval/corpus.json")
    p.add_argument("--set", choices=("eval", "tune", "all"), default="eval")
    p.add_argument(
        "--configs",
        default="appliance,livekit,pipecat",
        help="comma-separated: appliance, livekit (peer 1), pipecat (peer 2)",
    )
    p.add_argument("--limit", type=int, default=0, help="only the first N items")
    p.add_argument("--spread", type=int, default=0, help="only N items spread over the set")
    p.add_argument(
        "--ptt-release",
        default="",
        help="push-to-talk instead: release the button these seconds after the last word, "
        "e.g. 0,0.1 (appliance and livekit only)",
    )

    add(
        "audio",
        "USB audio bridge figures: echo, CPU, latency",
        "usb_audio",
        "run_bench_audio",
        "bench/usbaudio.json",
    )

    p = add(
        "ptt", "push-to-talk release to first agent audio", "ptt", "run_bench_ptt", "bench/ptt.json"
    )
    p.add_argument("--utterances", type=int, default=10)
    p.add_argument(
        "--compare-interims",
        action="store_true",
        help="each question without and with interim transcripts while held, alternating",
    )

    p = add(
        "barge-in",
        "user talks over the agent: time to silence it",
        "barge_in",
        "run_bench_barge_in",
        "bench/barge-in.json",
    )
    p.add_argument("--utterances", type=int, default=10)

    p = add(
        "sip",
        "phone bridge: call set-up, RTP timing, concurrency",
        "sip_calls",
        "run_bench_sip",
        "bench/sip.json",
    )
    p.add_argument("--calls", default="1,2,3,4", help="concurrency levels, e.g. 1,2,3,4")
    p.add_argument("--turns", type=int, default=30, help="questions per level (over its calls)")

    p = add(
        "room",
        "a phone call direct and through a LiveKit room on a real server, side by side",
        "room_calls",
        "run_bench_room",
        "bench/room.json",
    )
    p.add_argument("--calls", default="1,2", help="concurrency levels, e.g. 1,2")
    p.add_argument("--turns", type=int, default=10, help="questions per call")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logs.setup(logging.DEBUG if args.verbose else logging.WARNING)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
