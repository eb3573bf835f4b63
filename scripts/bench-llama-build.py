"""Compare llama.cpp builds side by side: prompt evaluation and generation speed.

Each build is a folder that `pip install --no-deps --target DIR WHEEL` filled; the runs
alternate between the builds, each in a fresh child process with that folder first on
its path, so the machine's drift hits all of them alike. Prints medians, the 5th
percentile (the slow end) and the ratio of each build to the first; `--json` keeps every
sample.

    .venv/bin/python scripts/bench-llama-build.py --model FILE.gguf \
        native=/tmp/native explicit=/tmp/explicit --rounds 8 --json bench/llama-build.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PROMPT = (
    "You are a helpful voice assistant on a small offline device. Answer in one or two "
    "short sentences, plainly, without lists or markdown. The user speaks to you through "
    "a microphone and hears your answer from a speaker. Question: what is the tallest "
    "mountain in the world, and in which country does it stand? Please answer briefly."
)
GENERATE = 32


def child(model: str, threads: int) -> dict[str, float | str]:
    """One measurement in this process: prompt tokens/s and generated tokens/s."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=model, n_ctx=512, n_batch=512, n_threads=threads, verbose=False
    )
    tokens = llm.tokenize(PROMPT.encode(), add_bos=True)
    llm.eval(tokens[:4])  # first-call costs (repacking, buffers) out of the timing
    llm.reset()
    t = time.perf_counter()
    llm.eval(tokens)
    prompt_s = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(GENERATE):
        token = int(llm.scores[llm.n_tokens - 1].argmax())
        llm.eval([token])
    gen_s = time.perf_counter() - t
    return {
        "prompt_tps": len(tokens) / prompt_s,
        "gen_tps": GENERATE / gen_s,
        "system_info": llama_cpp.llama_print_system_info().decode(),
    }


def slow_tail(values: list[float]) -> float:
    """The 5th percentile of a speed: the slow runs' end (p95 of the time per token)."""
    return statistics.quantiles(values, n=20, method="inclusive")[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="*", help="NAME=DIR, the first is the baseline")
    parser.add_argument("--model", required=True)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--child", nargs=2, metavar=("MODEL", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]))))
        return 0
    builds = dict(b.split("=", 1) for b in args.builds)
    samples: dict[str, dict[int, list[dict]]] = {n: {t: [] for t in args.threads} for n in builds}
    for _ in range(args.rounds):
        for threads in args.threads:
            for name, folder in builds.items():
                env = {**os.environ, "PYTHONPATH": folder}
                argv = [sys.executable, __file__, "--model", args.model, "--child"]
                out = subprocess.run(
                    [*argv, args.model, str(threads)],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                samples[name][threads].append(json.loads(out.stdout.splitlines()[-1]))
    base = next(iter(builds))
    summary = {}
    for name in builds:
        for threads in args.threads:
            rows = samples[name][threads]
            figures = {}
            for key in ("prompt_tps", "gen_tps"):
                values = [r[key] for r in rows]
                base_median = statistics.median(r[key] for r in samples[base][threads])
                figures[key] = {
                    "median": round(statistics.median(values), 1),
                    "p5": round(slow_tail(values), 1),
                    "ratio_to_" + base: round(statistics.median(values) / base_median, 3),
                }
            summary[f"{name} {threads}t"] = figures
            print(
                f"{name:>10} {threads} thread(s): prompt {figures['prompt_tps']['median']:7.1f} "
                f"tok/s (x{figures['prompt_tps']['ratio_to_' + base]:.3f}), generation "
                f"{figures['gen_tps']['median']:6.1f} tok/s "
                f"(x{figures['gen_tps']['ratio_to_' + base]:.3f}); {rows[0]['system_info']}"
            )
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(
                {
                    "command": " ".join(sys.argv),
                    "model": args.model,
                    "rounds": args.rounds,
                    "summary": summary,
                    "samples": samples,
                },
                f,
                indent=1,
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
