"""Whisper's fitted window and short answers: how often transcripts loop, and what the
full-window redo costs, against the fitted window alone and the full window alone.

Run: .venv/bin/python scripts/bench-stt-loops.py 10 > bench/stt-loops.txt
"""

import collections
import statistics
import sys
import time
import warnings

import numpy as np

from appliance import config as config_mod
from appliance.audio.pcm import resample
from appliance.plugins.whisper import engine as whisper_stt
from appliance.session.modelset import ModelSet
from bench.latency import QUESTIONS

warnings.filterwarnings("ignore")
BEFORE = 9600  # the 0.6 s of audio the STT keeps before speech starts


def run(models: ModelSet, texts: list[str], after: int, renderings: int) -> None:
    """Print each variant's median and p95 time and its count of looping transcripts."""
    whisper, voice = models.whisper, models.voice
    variants = {
        "fit only (before)": lambda a: whisper_stt._transcribe_fitted(whisper, a, "en"),
        "fit, loop -> full (now)": lambda a: whisper_stt.transcribe(whisper, a, "en"),
        "full": lambda a: whisper_stt.transcribe(whisper, a, "en", window="full"),
    }
    ms: dict[str, list[float]] = collections.defaultdict(list)
    loops: collections.Counter[str] = collections.Counter()
    for _ in range(renderings):
        for text in texts:
            pcm = resample(voice.synthesize(text), voice.sample_rate, 16000)
            pcm = np.concatenate([np.zeros(BEFORE, np.int16), pcm, np.zeros(after, np.int16)])
            audio = pcm.astype(np.float32) / 32768
            for label, transcribe in variants.items():
                start = time.perf_counter()
                heard = transcribe(audio)[0]
                ms[label].append(1000 * (time.perf_counter() - start))
                loops[label] += whisper_stt._loops(heard)
    for label, times in ms.items():
        times.sort()
        print(
            f"  {label}: median {statistics.median(times):.0f} ms, "
            f"p95 {times[int(0.95 * (len(times) - 1))]:.0f} ms, "
            f"looping transcripts {loops[label]}/{len(times)}",
            flush=True,
        )


def main() -> None:
    renderings = int(sys.argv[1])
    models = ModelSet(config_mod.parse({}, "<bench-stt-loops>"))
    models.warm()
    print("short answers (Yes. No. Thank you. Goodbye. Hello.), 0.6 s before, 0.5 s after:")
    run(models, ["Yes.", "No.", "Thank you.", "Goodbye.", "Hello."], 8000, renderings)
    print("the 12 bench questions, 0.6 s before, 0.2 s after:")
    run(models, list(QUESTIONS), 3200, renderings)


if __name__ == "__main__":
    main()
