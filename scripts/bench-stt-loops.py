"""Whisper fitted window vs short answers: how often transcripts loop, and what the full-window redo costs.

Run: .venv/bin/python scripts/bench-stt-loops.py 10 > bench/stt-loops.txt
"""
import sys, time, collections, statistics, warnings
warnings.filterwarnings("ignore")
import numpy as np
from appliance import config as config_mod
from appliance.modelset import ModelSet
from appliance.fileaudio import resample
from appliance.plugins import whisper_stt as W
from appliance.bench import QUESTIONS
m = ModelSet(config_mod.parse({}, "<x>")); m.warm(); v = m.voice
N = int(sys.argv[1])
def run(texts, tail):
    ms = collections.defaultdict(list); loops = collections.Counter(); wrong = collections.Counter()
    for i in range(N):
        for text in texts:
            pcm = resample(v.synthesize(text), v.sample_rate, 16000)
            a = np.concatenate([np.zeros(9600, np.int16), pcm, np.zeros(tail, np.int16)]).astype(np.float32) / 32768
            for label, fn in (("fit only (before)", lambda: W._transcribe_fitted(m.whisper, a, "en")), ("fit, loop -> full (now)", lambda: W.transcribe(m.whisper, a, "en")), ("full", lambda: W.transcribe(m.whisper, a, "en", window="full"))):
                t0 = time.perf_counter(); t = fn()[0]; ms[label].append(1000 * (time.perf_counter() - t0))
                loops[label] += W._loops(t)
    for k in ms:
        xs = sorted(ms[k]); print(f"  {k}: median {statistics.median(xs):.0f} ms, p95 {xs[int(0.95 * (len(xs) - 1))]:.0f} ms, looping transcripts {loops[k]}/{len(xs)}", flush=True)
print("short answers (Yes. No. Thank you. Goodbye. Hello.), 0.6 s before, 0.5 s after:")
run(["Yes.", "No.", "Thank you.", "Goodbye.", "Hello."], 8000)
print("the 12 bench questions, 0.6 s before, 0.2 s after:")
run(list(QUESTIONS), 3200)
