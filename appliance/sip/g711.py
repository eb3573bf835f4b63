"""G.711 mu-law (PCMU) and A-law (PCMA) by numpy lookup tables (no `audioop`, gone in 3.13)."""

from __future__ import annotations

import numpy as np

_ULAW_SEGMENTS = (0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF, 0x1FFF)
_ALAW_SEGMENTS = (0x1F, 0x3F, 0x7F, 0xFF, 0x1FF, 0x3FF, 0x7FF, 0xFFF)


def _segment(value: int, ends: tuple[int, ...]) -> int:
    return next((i for i, end in enumerate(ends) if value <= end), len(ends))


def _ulaw_encode_one(sample: int) -> int:
    """ITU-T G.711 mu-law of a 16-bit sample (on its top 14 bits)."""
    value = sample >> 2
    mask = 0xFF
    if value < 0:
        value, mask = -value, 0x7F
    value = min(value, 8159) + 33
    seg = _segment(value, _ULAW_SEGMENTS)
    if seg >= 8:
        return 0x7F ^ mask
    return ((seg << 4) | ((value >> (seg + 1)) & 0x0F)) ^ mask


def _ulaw_decode_one(code: int) -> int:
    code = ~code & 0xFF
    sign, exponent, mantissa = code & 0x80, (code >> 4) & 0x07, code & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return -magnitude if sign else magnitude


def _alaw_encode_one(sample: int) -> int:
    """ITU-T G.711 A-law of a 16-bit sample (on its top 13 bits)."""
    value = sample >> 3
    mask = 0xD5
    if value < 0:
        value, mask = -value - 1, 0x55
    seg = _segment(value, _ALAW_SEGMENTS)
    if seg >= 8:
        return 0x7F ^ mask
    mantissa = (value >> 1) if seg < 2 else (value >> seg)
    return ((seg << 4) | (mantissa & 0x0F)) ^ mask


def _alaw_decode_one(code: int) -> int:
    code ^= 0x55
    sign, exponent, mantissa = code & 0x80, (code >> 4) & 0x07, code & 0x0F
    magnitude = (
        (mantissa << 4) + 8 if exponent == 0 else ((mantissa << 4) + 0x108) << (exponent - 1)
    )
    return magnitude if sign else -magnitude


_SAMPLES = np.arange(-32768, 32768)
_ULAW_ENCODE = np.array([_ulaw_encode_one(int(s)) for s in _SAMPLES], np.uint8)
_ULAW_DECODE = np.array([_ulaw_decode_one(c) for c in range(256)], np.int16)
_ALAW_ENCODE = np.array([_alaw_encode_one(int(s)) for s in _SAMPLES], np.uint8)
_ALAW_DECODE = np.array([_alaw_decode_one(c) for c in range(256)], np.int16)


def ulaw_encode(pcm: np.ndarray) -> bytes:
    return bytes(_ULAW_ENCODE[pcm.astype(np.int32) + 32768])


def ulaw_decode(data: bytes) -> np.ndarray:
    return _ULAW_DECODE[np.frombuffer(data, np.uint8)]


def alaw_encode(pcm: np.ndarray) -> bytes:
    return bytes(_ALAW_ENCODE[pcm.astype(np.int32) + 32768])


def alaw_decode(data: bytes) -> np.ndarray:
    return _ALAW_DECODE[np.frombuffer(data, np.uint8)]


# RTP static payload type -> (name, encode, decode), all at 8000 Hz
CODECS = {
    0: ("PCMU", ulaw_encode, ulaw_decode),
    8: ("PCMA", alaw_encode, alaw_decode),
}
