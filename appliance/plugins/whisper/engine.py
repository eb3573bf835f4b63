"""Speech-to-text with faster-whisper (CTranslate2 int8), without livekit.

Whisper encodes a window fitted to the utterance rather than its fixed 30 s (about 10x
less encoder work for a short question); a fitted transcript that loops is transcribed
again in the full window. Every call blocks: the STT runs it on an executor.
"""

from __future__ import annotations

import logging
import re

import ctranslate2
import numpy as np
from faster_whisper import WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer

logger = logging.getLogger("appliance.stt")

SAMPLE_RATE = 16000


def load_model(model_dir: str, *, threads: int) -> WhisperModel:
    """Load the CTranslate2 Whisper model once per process."""
    return WhisperModel(model_dir, device="cpu", compute_type="int8", cpu_threads=threads)


def transcribe(
    model: WhisperModel,
    audio: np.ndarray,
    language: str,
    *,
    window: str = "fit",
    redo_loops: bool = True,
    beam_size: int = 1,
) -> tuple[str, float]:
    """Blocking transcription of float32 16 kHz audio (greedy, or a beam search of
    `beam_size`); returns (text, confidence).

    `window` "fit": the encoder sees the utterance plus 1 s, not Whisper's fixed 30 s
    window (CTranslate2 accepts the shorter input): about 10x less encoder work for a
    3 s question; "full": the 30 s window, as faster-whisper runs it. Audio over 29 s
    always uses full windows, and so does an utterance whose fitted transcript loops
    (`_loops`: tiny.en hears a short "Yes." as "Yes? Yes? Yes? Yes? ..."), unless
    ``redo_loops`` is False (interim transcripts): then a loop gives no words.
    """
    if window == "fit" and len(audio) < (_FULL_FRAMES - _FIT_MARGIN_FRAMES) * _HOP:
        text, confidence = _transcribe_fitted(model, audio, language, beam_size)
        if not _loops(text):
            return text, confidence
        if not redo_loops:
            return "", 0.0
        logger.debug("fitted window looped (%r): transcribing in the full one", text)
    segments, _info = model.transcribe(
        audio,
        language=language,
        beam_size=beam_size,
        best_of=1,
        temperature=0.0,
        condition_on_previous_text=False,
        without_timestamps=True,
        vad_filter=False,
    )
    texts, logprobs = [], []
    for seg in segments:
        if _is_noise(seg.no_speech_prob, seg.avg_logprob):
            continue
        texts.append(seg.text.strip())
        logprobs.append(seg.avg_logprob)
    text = " ".join(t for t in texts if t)
    confidence = float(np.exp(np.mean(logprobs))) if logprobs else 0.0
    return text, confidence


_HOP = 160  # samples per log-mel frame
_FULL_FRAMES = 3000  # Whisper's 30 s window
_FIT_MARGIN_FRAMES = 100  # 1 s of silence after the utterance


_WORD_RE = re.compile(r"[a-z0-9']+")


def _loops(text: str) -> bool:
    """Whether a transcript repeats itself: a phrase of one or two words three times in a
    row, or a longer one twice. Whisper in a fitted window does this after short words
    and after long trailing silence; a person rarely does, and then the full window
    only costs time."""
    words = _WORD_RE.findall(text.lower())
    for n in range(1, len(words) // 2 + 1):
        times = 3 if n < 3 else 2
        for i in range(len(words) - n * times + 1):
            phrase = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == phrase for k in range(1, times)):
                return True
    return False


def _is_noise(no_speech_prob: float, avg_logprob: float) -> bool:
    return no_speech_prob > 0.6 and avg_logprob < -1.0  # Whisper's hallucination on silence


def _transcribe_fitted(
    model: WhisperModel, audio: np.ndarray, language: str, beam_size: int = 1
) -> tuple[str, float]:
    features = model.feature_extractor(audio)
    features = pad_or_trim(features, min(_FULL_FRAMES, features.shape[-1] + _FIT_MARGIN_FRAMES))
    tokenizer = Tokenizer(
        model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language
    )
    encoded = model.model.encode(
        ctranslate2.StorageView.from_array(features[None].astype(np.float32)), to_cpu=False
    )
    seconds = len(audio) / SAMPLE_RATE
    (result,) = model.model.generate(
        encoded,
        [[*tokenizer.sot_sequence, tokenizer.no_timestamps]],
        beam_size=beam_size,
        max_length=int(16 + 8 * seconds),  # speech is ~4 tokens/s: a loop cannot run on
        return_scores=True,
        return_no_speech_prob=True,
        suppress_blank=True,
        suppress_tokens=[-1],
    )
    tokens = [t for t in result.sequences_ids[0] if t < tokenizer.eot]
    avg_logprob = result.scores[0] * len(tokens) / (len(tokens) + 1)
    if not tokens or _is_noise(result.no_speech_prob, avg_logprob):
        return "", 0.0
    return tokenizer.decode(tokens).strip(), float(np.exp(avg_logprob))
