"""Percentiles with bootstrap 95 % intervals, and ratios of two configurations' percentiles."""

from __future__ import annotations

import numpy as np

BOOTSTRAP = 2000  # resamples


def percentile(values: list[float], q: float) -> float | None:
    """The `q` percentile (linear interpolation), rounded to 0.1; None without values."""
    if not values:
        return None
    return round(float(np.percentile(values, q, method="linear")), 1)


def interval(values: list[float], pct: float, seed: int = 0) -> list[float] | None:
    """Bootstrap 95 % interval of the `pct` percentile of `values`."""
    if len(values) < 2:
        return None
    rng = np.random.default_rng(seed)
    data = np.asarray(values)
    stats = np.percentile(rng.choice(data, (BOOTSTRAP, len(data))), pct, axis=1)
    return [round(float(v), 1) for v in np.percentile(stats, [2.5, 97.5])]


def ratio_interval(
    a: list[float], b: list[float], pct: float = 50, seed: int = 0
) -> list[float] | None:
    """Bootstrap 95 % interval of percentile(a) / percentile(b), `a` and `b` resampled
    independently (their samples need not be paired)."""
    if len(a) < 2 or len(b) < 2:
        return None
    rng = np.random.default_rng(seed)
    pa = np.percentile(rng.choice(np.asarray(a), (BOOTSTRAP, len(a))), pct, axis=1)
    pb = np.percentile(rng.choice(np.asarray(b), (BOOTSTRAP, len(b))), pct, axis=1)
    return [round(float(v), 3) for v in np.percentile(pa / pb, [2.5, 97.5])]


def paired_ratio_interval(
    a: list[float], b: list[float], pct: float = 50, seed: int = 0
) -> list[float] | None:
    """Bootstrap 95 % interval of percentile(a) / percentile(b) for paired samples (a[i]
    and b[i] measured on the same utterance): the same indices are drawn for both."""
    if len(a) != len(b) or len(a) < 2:
        return None
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), (BOOTSTRAP, len(a)))
    pa = np.percentile(np.asarray(a)[idx], pct, axis=1)
    pb = np.percentile(np.asarray(b)[idx], pct, axis=1)
    return [round(float(v), 3) for v in np.percentile(pa / pb, [2.5, 97.5])]
