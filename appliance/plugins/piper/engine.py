"""A Piper voice run directly with onnxruntime (no livekit here).

Phonemes come from espeak-ng (`EspeakProcess`), clause by clause, each followed by its
punctuation character as Piper's own phonemizer does; every sentence is synthesized
separately, and with the voice split into acoustic model and vocoder (`split_voice`, ONNX
graph surgery kept in the model cache) a sentence's first audio comes before the rest is
decoded.
"""

from __future__ import annotations

import collections
import itertools
import json
import logging
import re
import shutil
import subprocess
import threading
import time
import unicodedata
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from appliance.plugins.piper.espeak import EspeakProcess
from appliance.plugins.piper.text import split_sentences, wrap_lines

logger = logging.getLogger(__name__)

_PAD, _BOS, _EOS = "_", "^", "$"
_ESPEAK_TIMEOUT_S = 30.0
_SILENCE_LEVEL = 100  # int16: below this the voice is silent (about -50 dBFS)
_LANG_SWITCH_RE = re.compile(r"\([a-z]{2,3}(?:-[a-z0-9]+)*\)")  # espeak's "(fr)" markers
# The vocoder (HiFi-GAN) makes each stretch of audio from the latent frames around it, so a
# stretch of frames decodes on its own given this many frames of context on each side: at
# 12 the pieces join bit-exact in int16 (joe-medium; at 8 they differed by up to 30).
VOCODER_CONTEXT = 12
RENDERED_KEEP = 8  # texts whose audio a voice keeps (`PiperVoice.rendered`)
FIRST_PIECE_FRAMES = 16  # a sentence's first audio: 16 frames, 186 ms at 22.05 kHz
URGENT_PIECES = 2  # a reply's first pieces rendered as urgent (`Priority`: the LLM waits)
_VOCODER_NODE = "/dec/conv_pre/Conv"  # the vocoder's first node in Piper's VITS export


class PiperVoiceError(RuntimeError):
    """A Piper voice could not be loaded or could not synthesize."""


class EspeakNotFoundError(PiperVoiceError):
    """The ``espeak-ng`` program is not installed."""

    def __init__(self) -> None:
        super().__init__(
            "the espeak-ng program was not found on PATH; Piper voices need it for phonemes: "
            "install it with `apt-get install espeak-ng`"
        )


def split_voice(model_path: Path, sha256: str, cache: Path) -> tuple[Path, Path] | None:
    """The voice as two ONNX models, made once and kept in `cache`: the acoustic model
    (phoneme ids to latent frames) and the vocoder (frames to audio), so that a sentence's
    first frames can be heard before the rest are decoded (`PiperVoice.pieces`).

    None (logged) where the graph has no vocoder of the expected shape (`_VOCODER_NODE`:
    Piper's VITS export) or the parts cannot be made: the voice then runs whole.
    """
    from appliance.store.disk import derived

    stem = f"{model_path.stem}.{sha256[:16]}"
    parts = (cache / f"{stem}.acoustic.onnx", cache / f"{stem}.vocoder.onnx")

    def make(part: Path, which: int) -> None:
        import onnx
        import onnx.utils

        model = onnx.load(str(model_path))
        graph = model.graph
        conv = next((n for n in graph.node if n.name == _VOCODER_NODE), None)
        if conv is None:
            raise ValueError(f"no {_VOCODER_NODE} node")
        inputs = [i.name for i in graph.input]
        outputs = [o.name for o in graph.output]
        ends = ((inputs, [conv.input[0]]), ([conv.input[0]], outputs))[which]
        onnx.save(onnx.utils.Extractor(model).extract_model(*ends), str(part))

    try:
        return (
            derived(parts[0], lambda part: make(part, 0)),
            derived(parts[1], lambda part: make(part, 1)),
        )
    except Exception as e:  # onnx's own errors: a graph it cannot cut, a bad file
        logger.warning("%s runs whole (no first audio before the rest): %s", model_path.name, e)
        return None


def _load_session(model_path: Path, threads: int) -> ort.InferenceSession:
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads > 1:  # idle worker threads sleep instead of spinning on the other models' cores
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        return ort.InferenceSession(
            str(model_path), sess_options=options, providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # onnxruntime raises its own exception types
        raise PiperVoiceError(f"cannot load Piper voice model {model_path}: {e}") from e


def _int16(audio: np.ndarray) -> np.ndarray:
    return (np.clip(audio.reshape(-1), -1.0, 1.0) * 32767.0).astype(np.int16)


class PiperVoice:
    """A loaded Piper voice: heavy, loaded once per process, shared by sessions,
    thread-safe for synthesis."""

    def __init__(
        self,
        model_path: Path,
        config_path: Path,
        *,
        threads: int = 1,
        urgent_threads: int = 0,
        parts: tuple[Path, Path] | None = None,
    ) -> None:
        """Load the voice's ``.onnx.json`` config and ``.onnx`` model.

        ``parts``: the model split by `split_voice`, loaded instead of the whole one (which
        is used if they cannot be loaded), so that `pieces` yields a sentence's first
        audio before the rest is decoded.
        ``urgent_threads`` above ``threads`` loads the model a second time with that many
        threads, for `pieces(urgent=True)`: a reply's first audio, rendered while the other
        models wait (`Priority`), may use every core.

        Raises PiperVoiceError naming the file when either cannot be read, and
        EspeakNotFoundError when the espeak-ng program is missing.
        """
        model_path, config_path = Path(model_path), Path(config_path)
        try:
            config = json.loads(config_path.read_text(encoding="utf-8"))
            self._sample_rate = int(config["audio"]["sample_rate"])
            self._espeak_voice = str(config.get("espeak", {}).get("voice", "en-us"))
            id_map = config["phoneme_id_map"]
            self._id_map: dict[str, list[int]] = {
                str(k): [int(i) for i in v] for k, v in id_map.items()
            }
            inference = config.get("inference", {})
            self._scales = np.array(
                [
                    float(inference.get("noise_scale", 0.667)),
                    float(inference.get("length_scale", 1.0)),
                    float(inference.get("noise_w", 0.8)),
                ],
                dtype=np.float32,
            )
            self._num_speakers = int(config.get("num_speakers", 1))
            for symbol in (_PAD, _BOS, _EOS):
                if symbol not in self._id_map:
                    raise KeyError(f"phoneme_id_map has no {symbol!r}")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise PiperVoiceError(f"cannot read Piper voice config {config_path}: {e}") from e

        espeak = shutil.which("espeak-ng")
        if espeak is None:
            raise EspeakNotFoundError()
        self._espeak = EspeakProcess([espeak, "-q", "-b", "1", "--ipa", "-v", self._espeak_voice])

        self._missing: set[str] = set()
        self._missing_lock = threading.Lock()
        self._rendered: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self._rendered_lock = threading.Lock()
        self._models: list[ort.InferenceSession] = []  # the whole model, or its two parts
        self._urgent_models: list[ort.InferenceSession] = []
        for files in ([*parts], [model_path]) if parts else ([model_path],):
            try:
                self._models = [_load_session(f, threads) for f in files]
                self._inputs = {i.name for i in self._models[0].get_inputs()}
                if not {"input", "input_lengths"} <= self._inputs:
                    raise PiperVoiceError(
                        f"{files[0]} is not a Piper voice model (inputs: {sorted(self._inputs)})"
                    )
                if len(files) == 2 and not self._pieces_join():
                    raise PiperVoiceError(
                        f"its vocoder reaches past {VOCODER_CONTEXT} frames of context, so "
                        "pieces would click where they join"
                    )
                if urgent_threads > threads:
                    self._urgent_models = [_load_session(f, urgent_threads) for f in files]
                break
            except PiperVoiceError as e:
                if len(files) == 1:
                    raise
                logger.warning("running the voice whole: %s", e)
        self._espeak.prepare()
        weakref.finalize(self, self._espeak.close)

    def close(self) -> None:
        """Stop the espeak-ng process waiting for the next text (synthesis still works)."""
        self._espeak.close()

    @property
    def sample_rate(self) -> int:
        """Sample rate of the synthesized audio, in Hz."""
        return self._sample_rate

    def phonemize(self, text: str) -> list[str]:
        """Phonemize text with espeak-ng: one phoneme string per sentence (may be empty)."""
        sentences = split_sentences(text)
        clauses = [clause for sentence in sentences for clause, _ in sentence]
        if not clauses:
            return []
        phonemes = self._espeak_clauses(clauses)
        result: list[str] = []
        it = iter(phonemes)
        for sentence in sentences:
            parts = []
            for _, mark in sentence:
                parts.append(next(it) + mark + (" " if mark in ",;:" else ""))
            result.append(unicodedata.normalize("NFD", "".join(parts).strip()))
        return result

    def _run_espeak(self, text: str) -> str:
        """One espeak-ng run: text lines in, one line of IPA per espeak clause out."""
        try:
            code, out, err = self._espeak.run(
                text.encode("utf-8", errors="ignore"), timeout=_ESPEAK_TIMEOUT_S
            )
        except FileNotFoundError as e:
            raise EspeakNotFoundError() from e
        except subprocess.TimeoutExpired as e:
            raise PiperVoiceError(f"espeak-ng took more than {_ESPEAK_TIMEOUT_S} s") from e
        if code != 0:
            error = err.decode("utf-8", errors="replace").strip()
            raise PiperVoiceError(f"espeak-ng failed (exit {code}): {error}")
        return _LANG_SWITCH_RE.sub("", out.decode("utf-8", errors="replace"))

    def _espeak_clauses(self, clauses: list[str]) -> list[str]:
        """Phonemes of each clause, with one espeak-ng process for all of them.

        Clauses go in separated by blank lines, each of which comes back as an empty line;
        espeak may cut a clause into several lines, which are joined again. If the groups
        do not come back one per clause, each clause is run in its own process instead.
        """
        out = self._run_espeak("\n\n".join("\n".join(wrap_lines(c)) for c in clauses) + "\n")
        groups = [g.split("\n") for g in out.rstrip("\n").split("\n\n")]
        if len(groups) == len(clauses) and all(all(s.strip() for s in g) for g in groups):
            return [" ".join(s.strip() for s in g) for g in groups]
        logger.debug("espeak-ng output did not map back to %d clauses", len(clauses))
        outs = (self._run_espeak("\n".join(wrap_lines(c)) + "\n").split("\n") for c in clauses)
        return [" ".join(s.strip() for s in lines if s.strip()) for lines in outs]

    def _phoneme_ids(self, phonemes: str) -> list[int]:
        """Piper's id sequence: BOS, pad, then every phoneme followed by pad, then EOS."""
        pad = self._id_map[_PAD]
        ids = [*self._id_map[_BOS], *pad]
        for ph in phonemes:
            mapped = self._id_map.get(ph)
            if mapped is None:
                with self._missing_lock:
                    if ph not in self._missing:
                        self._missing.add(ph)
                        logger.debug("dropping phoneme %r: not in the voice's id map", ph)
                continue
            ids.extend(mapped)
            ids.extend(pad)
        ids.extend(self._id_map[_EOS])
        return ids

    def _feeds(self, ids: list[int]) -> dict[str, Any]:
        feeds: dict[str, Any] = {
            "input": np.array([ids], dtype=np.int64),
            "input_lengths": np.array([len(ids)], dtype=np.int64),
        }
        if "scales" in self._inputs:
            feeds["scales"] = self._scales
        if "sid" in self._inputs:
            feeds["sid"] = np.array([0], dtype=np.int64)
        return feeds

    def _pieces_join(self) -> bool:
        """Whether frames decoded in two pieces, each with `VOCODER_CONTEXT` frames of
        context, give the audio of one decode (checked once per voice: a vocoder that
        reaches further would click at every cut)."""
        acoustic, vocoder = self._models
        ids = self._phoneme_ids("ðɪs ɪz ɐ tˈɛst ʌv ðə vˈɔɪs, wˈʌn tˈuː θɹˈiː.")
        frames = np.asarray(acoustic.run(None, self._feeds(ids))[0])
        frames = np.concatenate([frames] * (1 + 64 // frames.shape[-1]), axis=-1)[..., :64]
        name, cut = vocoder.get_inputs()[0].name, 24

        def decode(part: np.ndarray) -> np.ndarray:
            return _int16(np.asarray(vocoder.run(None, {name: part})[0])).astype(np.int32)

        whole = decode(frames)
        hop = whole.size // frames.shape[-1]
        first = decode(frames[..., : cut + VOCODER_CONTEXT])[: cut * hop]
        rest = decode(frames[..., cut - VOCODER_CONTEXT :])[VOCODER_CONTEXT * hop :]
        joined = np.concatenate([first, rest])
        return joined.size == whole.size and int(np.abs(joined - whole).max()) <= 2

    def synthesize_phonemes(
        self, phonemes: str, *, run_options: ort.RunOptions | None = None, urgent: bool = False
    ) -> np.ndarray:
        """Blocking: int16 mono audio for one sentence's phoneme string (may be empty)."""
        pieces = list(self.pieces(phonemes, run_options=run_options, urgent=urgent))
        return np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int16)

    def pieces(
        self, phonemes: str, *, run_options: ort.RunOptions | None = None, urgent: bool = False
    ) -> Iterator[np.ndarray]:
        """Blocking generator: one sentence's int16 audio, in pieces as they are decoded.

        ``urgent`` (a reply's first audio): with the voice split (`split_voice`), the first
        piece is the sentence's first `FIRST_PIECE_FRAMES` frames (about 0.19 s), and each
        next one as long as decodes in a third of the time the audio ahead of it lasts
        (at the speed measured on the piece before); the pieces join exactly. The first
        `URGENT_PIECES` use the ``urgent_threads`` copy, if loaded. Otherwise (or with a
        whole voice) the sentence comes in one piece: each cut decodes
        `VOCODER_CONTEXT` frames twice.
        Setting ``run_options.terminate`` from another thread aborts the inference.
        """
        ids = self._phoneme_ids(phonemes)
        if len(ids) <= 3:  # BOS, pad, EOS: nothing to say
            return
        models = self._urgent_models if urgent and self._urgent_models else self._models
        out = np.asarray(models[0].run(None, self._feeds(ids), run_options)[0])
        if len(models) == 1:
            pcm = _int16(out)
            yield pcm[self._leading_silence(pcm) :]
            return
        frames, start, size = out.shape[-1], 0, FIRST_PIECE_FRAMES if urgent else out.shape[-1]
        played_until = per_frame = 0.0  # when the audio given so far ends; decoding speed
        for n in itertools.count():  # the n-th piece
            if start >= frames:
                return
            if start:  # as much as decodes in a third of the time the audio ahead lasts
                ahead = played_until - time.monotonic()
                size = max(FIRST_PIECE_FRAMES, int(ahead / 3 / per_frame) - 2 * VOCODER_CONTEXT)
            end = frames if frames - (start + size) < VOCODER_CONTEXT else start + size
            low, high = max(0, start - VOCODER_CONTEXT), min(frames, end + VOCODER_CONTEXT)
            vocoder = models[1] if n < URGENT_PIECES else self._models[1]
            feed = {vocoder.get_inputs()[0].name: out[..., low:high]}
            began = time.monotonic()
            audio = np.asarray(vocoder.run(None, feed, run_options)[0]).reshape(-1)
            now = time.monotonic()
            per_frame = max(now - began, 1e-6) / (high - low)
            hop = audio.size // (high - low)
            pcm = _int16(audio[(start - low) * hop : (end - low) * hop])
            pcm = pcm[self._leading_silence(pcm) :] if start == 0 else pcm
            played_until = max(played_until, now) + pcm.size / self._sample_rate
            yield pcm
            start = end

    def _leading_silence(self, pcm: np.ndarray) -> int:
        """Samples of the voice's near-silent lead-in (30-60 ms) to drop, keeping 10 ms."""
        loud = np.flatnonzero(np.abs(pcm) > _SILENCE_LEVEL)
        return max(0, int(loud[0]) - self.sample_rate // 100) if len(loud) else 0

    def synthesize_sentences(self, text: str) -> Iterator[np.ndarray]:
        """Blocking: yield int16 audio per sentence as soon as each is ready."""
        for phonemes in self.phonemize(text):
            audio = self.synthesize_phonemes(phonemes)
            if audio.size:
                yield audio

    def synthesize(self, text: str) -> np.ndarray:
        """Blocking: int16 mono audio at ``sample_rate`` for the whole text (may be empty)."""
        chunks = list(self.synthesize_sentences(text))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int16)

    def rendered(self, text: str) -> np.ndarray:
        """Blocking: `synthesize(text)`, made once and kept (the last `RENDERED_KEEP`
        texts): a greeting said at the start of every call is ready at once. Thread-safe."""
        with self._rendered_lock:
            audio = self._rendered.get(text)
            if audio is not None:
                self._rendered.move_to_end(text)
                return audio
        audio = self.synthesize(text)
        with self._rendered_lock:
            self._rendered[text] = audio
            while len(self._rendered) > RENDERED_KEEP:
                self._rendered.popitem(last=False)
        return audio
