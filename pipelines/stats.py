"""The numbers behind a study's verdict: means over seeds with 95% t-intervals, and paired differences
against the baseline variant.

Runs of two variants at the same seed share data order and initialisation where the architecture
allows (paired design), so the per-seed difference removes what the seed does to both and its
t-interval (Student's t on the n paired differences, scipy's ``ttest_rel``) is tighter than
comparing two independent means. A difference is a verdict only when its interval excludes zero.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import stats

LEVEL = 0.95
# Which way is better, read from a metric's name; a study's `modes:` overrides it.
LOWER = ("loss", "ppl", "fid", "_bytes", "time_s", "fit_s", "step_time")
HIGHER = ("acc", "per_s", "coverage", "confidence", "accuracy", "reward", "margin")


def mode_of(key: str, modes: dict[str, str] | None = None) -> str | None:
    """"min", "max" or None (no better direction: a count, a ratio)."""
    if modes and key in modes:
        return modes[key]
    name = key.split("/")[-1]
    if any(s in name for s in HIGHER):
        return "max"
    if any(s in name for s in LOWER):
        return "min"
    return None


def mean_ci(values) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t-interval, n) of the finite values; the half-width is NaN for n < 2."""
    x = np.asarray([v for v in values if v is not None and math.isfinite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) < 2:
        return float(x.mean()), math.nan, 1
    if np.ptp(x) == 0:
        return float(x[0]), 0.0, len(x)
    lo, hi = stats.ttest_1samp(x, 0.0).confidence_interval(LEVEL)
    return float(x.mean()), float((hi - lo) / 2), len(x)


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean of a[seed] - b[seed] over the seeds both have, its 95% half-width (paired t), and n."""
    seeds = [s for s in a if s in b and _finite(a[s]) and _finite(b[s])]
    d = np.asarray([a[s] - b[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return math.nan, math.nan, 0
    if len(d) < 2:
        return float(d.mean()), math.nan, 1
    if np.ptp(d) == 0:  # every pair differs by the same amount (zero variance): the interval is a point
        return float(d[0]), 0.0, len(d)
    lo, hi = stats.ttest_rel([a[s] for s in seeds], [b[s] for s in seeds]).confidence_interval(LEVEL)
    return float(d.mean()), float((hi - lo) / 2), len(d)


def verdict(diff: float, half: float, mode: str | None) -> str:
    """"better", "worse" or "no difference" (the interval holds zero); "n<2" without an interval."""
    if mode is None or not math.isfinite(diff):
        return ""
    if not math.isfinite(half):
        return "n<2"
    if abs(diff) <= half:
        return "no difference"
    return "better" if (diff < 0) == (mode == "min") else "worse"


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)
