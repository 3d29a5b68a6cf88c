"""The report's statistics, numpy only and seeded (the same scores give the same numbers):
bootstrap 95% intervals of means, paired differences over (prompt, seed) with a paired bootstrap
interval and a sign-flip permutation test, and win rates with ties counted apart.

Why these: the cells of two columns share their prompt and seed, so the paired difference
removes the prompts' own difficulty; the sign-flip test (exact up to 16 pairs, else Monte
Carlo) assumes only that, with no effect, each difference is as likely negative as positive,
which fits bounded, lumpy scores (a share of requirements met) better than a t-test.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np

LEVEL = 0.95
TIE = 1e-9  # differences this small are ties (scores are floats from one scorer)
_CHUNK = 256  # bootstrap resamples drawn at once: memory stays at _CHUNK x n


def _percentiles(x: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """The percentile bootstrap interval of the mean of `x` at LEVEL."""
    rng = np.random.default_rng(seed)
    means = []
    for start in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - start)
        means.append(x[rng.integers(0, len(x), (k, len(x)))].mean(axis=1))
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(np.concatenate(means), [tail, 100 - tail])
    return float(lo), float(hi)


def mean_ci(values: Sequence[float], resamples: int = 2000, seed: int = 0) -> dict:
    """n, mean, and its bootstrap interval (lo, hi); None where there is no value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) == 0:
        return {"n": 0, "mean": None, "lo": None, "hi": None}
    lo, hi = (float(x[0]),) * 2 if len(x) == 1 else _percentiles(x, resamples, seed)
    return {"n": len(x), "mean": float(x.mean()), "lo": lo, "hi": hi}


def sign_flip_p(diffs: Sequence[float], resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided p of the mean difference under random signs: exact (every sign pattern) up to
    16 pairs, else Monte Carlo with the observed pattern counted ((k + 1) / (N + 1))."""
    d = np.asarray(diffs, dtype=np.float64)
    n = len(d)
    if n == 0 or np.all(np.abs(d) <= TIE):
        return 1.0
    observed = abs(d.mean()) - TIE
    if n <= 16:
        signs = np.array(list(itertools.product((1.0, -1.0), repeat=n)))
        return float(np.mean(np.abs(signs @ d / n) >= observed))
    rng = np.random.default_rng(seed)
    hits = 0
    for start in range(0, resamples, _CHUNK):
        k = min(_CHUNK, resamples - start)
        signs = rng.choice((1.0, -1.0), size=(k, n))
        hits += int(np.sum(np.abs(signs @ d / n) >= observed))
    return (hits + 1) / (resamples + 1)


def paired(
    treatment: Sequence[float], control: Sequence[float], resamples: int = 2000, seed: int = 0
) -> dict:
    """Treatment minus control over pairs (the same prompt and seed): n, the mean difference
    with its paired bootstrap interval, the sign-flip p, and the shares of pairs the treatment
    wins, ties and loses."""
    t, c = np.asarray(treatment, dtype=np.float64), np.asarray(control, dtype=np.float64)
    if t.shape != c.shape:
        raise ValueError(f"{len(t)} treatment scores for {len(c)} control scores")
    d = t - c
    n = len(d)
    if n == 0:
        return {"n": 0, "diff": None, "lo": None, "hi": None, "p": None,
                "win": None, "tie": None, "loss": None}  # fmt: skip
    ci = mean_ci(d, resamples, seed)
    wins, losses = int(np.sum(d > TIE)), int(np.sum(d < -TIE))
    return {
        "n": n,
        "diff": ci["mean"],
        "lo": ci["lo"],
        "hi": ci["hi"],
        "p": sign_flip_p(d, max(resamples, 2000), seed),
        "win": wins / n,
        "tie": (n - wins - losses) / n,
        "loss": losses / n,
    }


def excludes_zero(result: dict) -> bool:
    """Whether a paired difference's interval lies on one side of 0."""
    return result["n"] > 1 and (result["lo"] > 0 or result["hi"] < 0)


def share(
    part: Sequence[float], whole: Sequence[float], resamples: int = 2000, seed: int = 0
) -> dict:
    """mean(part) / mean(whole) over the same pairs (a LoRA's change as a share of the loop's
    gain), with a paired percentile bootstrap interval; None where the whole's mean is 0 (and
    resamples whose whole is 0 are left out of the interval)."""
    a, b = np.asarray(part, dtype=np.float64), np.asarray(whole, dtype=np.float64)
    n = len(a)
    if n == 0 or abs(b.mean()) <= TIE:
        return {"n": n, "share": None, "lo": None, "hi": None}
    rng = np.random.default_rng(seed)
    ratios = []
    for start in range(0, resamples, _CHUNK):
        idx = rng.integers(0, n, (min(_CHUNK, resamples - start), n))
        den = b[idx].mean(axis=1)
        keep = np.abs(den) > TIE
        ratios.append(a[idx][keep].mean(axis=1) / den[keep])
    tail = (1 - LEVEL) / 2 * 100
    lo, hi = np.percentile(np.concatenate(ratios), [tail, 100 - tail])
    return {"n": n, "share": float(a.mean() / b.mean()), "lo": float(lo), "hi": float(hi)}
