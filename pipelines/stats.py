"""The numbers behind a study's verdict: means over seeds with 95% t-intervals, paired differences
against the baseline variant, and the four words a comparison can earn.

Runs of two variants at the same seed share data order and initialisation where the architecture
allows (paired design), so the per-seed difference removes what the seed does to both and its
t-interval (Student's t on the n paired differences, scipy's ``ttest_rel``) is tighter than
comparing two independent means.

The four words (`WORDS`):
  better / worse  the 95% interval of the difference excludes zero;
  equivalent      the 90% interval lies inside ±margin, a margin the study declared for that metric:
                  two one-sided tests at 5% each (Schuirmann 1987; Lakens 2017, "Equivalence tests");
  inconclusive    everything else: the seeds could not tell. Without a margin, never "equivalent".

Critical values come from `pipelines.sequential.t_bound`: one look (a fixed list of seeds) gives
Student's t quantile; several looks (seeds added in rounds) give the group-sequential boundary.
Power follows the paired t-test through the noncentral t distribution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy import optimize, stats

from pipelines.sequential import t_bound

LEVEL = 0.95
ALPHA = 1 - LEVEL
POWER = 0.8
WORDS = {
    "better": "the 95% interval of the paired difference excludes zero, on the better side",
    "worse": "the 95% interval of the paired difference excludes zero, on the worse side",
    "equivalent": "the 90% interval lies inside ±margin, the study's declared margin (two one-sided tests)",
    "inconclusive": "neither: these seeds cannot tell (no margin declared: never 'equivalent')",
}
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
    x = np.asarray([v for v in values if finite(v)], dtype=float)
    if len(x) == 0:
        return math.nan, math.nan, 0
    if len(x) < 2:
        return float(x.mean()), math.nan, 1
    if np.ptp(x) == 0:
        return float(x[0]), 0.0, len(x)
    lo, hi = stats.ttest_1samp(x, 0.0).confidence_interval(LEVEL)
    return float(x.mean()), float((hi - lo) / 2), len(x)


@dataclass(frozen=True)
class Diff:
    """The paired differences a[seed] - b[seed] of one metric: their mean, standard deviation and count."""

    mean: float
    sd: float
    n: int

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(self.n) if self.n >= 2 else math.nan

    def half(self, alpha: float = ALPHA, looks: Sequence[int] | None = None, n_max: int | None = None) -> float:
        """Half-width of the two-sided 1 - alpha interval (repeated over `looks` when given)."""
        if self.n < 2:
            return math.nan
        return 0.0 if self.sd == 0 else t_bound(alpha, looks or [self.n], n_max or self.n) * self.se


def paired(a: dict, b: dict, log: bool = False) -> Diff:
    """a[seed] - b[seed] over the seeds both have (log a - log b with `log`: ratios)."""
    seeds = [s for s in a if s in b and finite(a[s]) and finite(b[s])]
    if log:
        seeds = [s for s in seeds if a[s] > 0 and b[s] > 0]
    d = np.asarray([math.log(a[s] / b[s]) if log else a[s] - b[s] for s in seeds], dtype=float)
    if len(d) == 0:
        return Diff(math.nan, math.nan, 0)
    sd = float(d.std(ddof=1)) if len(d) > 1 and np.ptp(d) > 0 else (0.0 if len(d) > 1 else math.nan)
    return Diff(float(d.mean()), sd, len(d))


def paired_difference(a: dict, b: dict) -> tuple[float, float, int]:
    """Mean of a[seed] - b[seed] over the seeds both have, its 95% half-width (paired t), and n."""
    d = paired(a, b)
    return d.mean, d.half(), d.n


def verdict(diff: float, half: float, mode: str | None, margin: float | None = None,
            half90: float | None = None) -> str:
    """One of the four words (`WORDS`) from a difference and the half-widths of its 95% and 90%
    intervals; "" for a metric without a better direction."""
    if mode is None or not math.isfinite(diff):
        return ""
    if not math.isfinite(half):
        return "inconclusive"
    if abs(diff) > half:
        return "better" if (diff < 0) == (mode == "min") else "worse"
    if margin is not None and half90 is not None and math.isfinite(half90) and abs(diff) + half90 < margin:
        return "equivalent"
    return "inconclusive"


def step_down(tests: Sequence[Callable[[float], bool]], alpha: float = ALPHA) -> list[float | None]:
    """Holm's step-down (Holm 1979) over tests given as "decided at level a?" functions: every test is
    tried at alpha/m; each one decided leaves its share to the rest (alpha/(m-1), ...) until a round
    decides nothing. With p-values this is Holm's procedure exactly; with group-sequential boundaries it
    is the graphical Holm of Maurer & Bretz (2013). The family-wise error stays at alpha.

    Returns, per test, the level at which it was decided, or None."""
    level: list[float | None] = [None] * len(tests)
    while True:
        left = [i for i, a in enumerate(level) if a is None]
        if not left:
            return level
        a = alpha / len(left)
        new = [i for i in left if tests[i](a)]
        if not new:
            return level
        for i in new:
            level[i] = a


def holm(pvalues: Sequence[float]) -> np.ndarray:
    """Holm-adjusted p-values (each the smallest family-wise level at which its test is decided)."""
    p = np.asarray(pvalues, dtype=float)
    order = np.argsort(p)
    m = len(p)
    adj = np.maximum.accumulate((m - np.arange(m)) * p[order]).clip(max=1.0)
    out = np.empty(m)
    out[order] = adj
    return out


# ---- power --------------------------------------------------------------------------------------


def power_difference(delta: float, sd: float, n: int, c: float) -> float:
    """P(|T| > c) for the paired t statistic when the true difference is `delta` (noncentral t)."""
    if n < 2:
        return 0.0
    return _power_ncp(delta * math.sqrt(n) / sd, n, c)


def _power_ncp(ncp: float, n: int, c: float) -> float:
    return 1.0 - _nct_cdf(c, n - 1, ncp) + _nct_cdf(-c, n - 1, ncp)


def _nct_cdf(x: float, df: int, ncp: float) -> float:
    """scipy's noncentral t cdf, whose far tails come back NaN at some arguments: then its sf, then the
    limit (0 left of the noncentrality, 1 right of it)."""
    v = float(stats.nct.cdf(x, df, ncp))
    if math.isnan(v):
        v = 1.0 - float(stats.nct.sf(x, df, ncp))
    return (0.0 if x < ncp else 1.0) if math.isnan(v) else v


def power_equivalence(margin: float, sd: float, n: int, c: float) -> float:
    """A lower bound on P(both one-sided tests decide) when the true difference is zero:
    1 - 2 P(T_margin < c), each one-sided statistic noncentral t with ncp margin sqrt(n) / sd."""
    if n < 2:
        return 0.0
    return max(0.0, 1.0 - 2.0 * _nct_cdf(c, n - 1, margin * math.sqrt(n) / sd))


def detectable(sd: float, n: int, c: float | None = None, power: float = POWER) -> float:
    """The smallest true difference the paired t-test detects with `power` at n seeds and spread sd,
    with critical value c (default: the fixed design's at 95%)."""
    if n < 2 or not math.isfinite(sd):
        return math.nan
    if sd == 0:
        return 0.0
    c = t_bound(ALPHA, [n], n) if c is None else c
    hi = 8.0
    while _power_ncp(hi, n, c) < power:  # widen the bracket
        if hi > 1e3:
            return math.inf
        hi *= 2
    return optimize.brentq(lambda k: _power_ncp(k, n, c) - power, 0.0, hi) * sd / math.sqrt(n)


def seeds_needed(sd: float, margin: float, alpha: float = ALPHA, design=None, power: float = POWER,
                 cap: int = 200) -> float:
    """The fewest seeds that decide `margin` with `power` either way: a true difference of `margin`
    comes out better/worse, and a true difference of zero comes out equivalent.

    One look (no `design`): the noncentral t power, exact. A `pipelines.sequential.Design` capped at N:
    its simulated power, whose lower 2-standard-error bound must reach `power`. NaN where the spread is
    unknown; inf beyond `cap`."""
    if not (math.isfinite(sd) and math.isfinite(margin)) or margin <= 0:
        return math.nan
    if sd == 0:
        return 2

    def enough(n: int) -> bool:
        if design is None:
            return (power_difference(margin, sd, n, t_bound(alpha, [n], n)) >= power
                    and power_equivalence(margin, sd, n, t_bound(2 * alpha, [n], n)) >= power)
        if n < design.pilot:
            return False
        return all(p - 2 * se >= power for p, se in (design.power(margin, sd, n, alpha),
                                                     design.power(0.0, sd, n, alpha, equivalence=margin)))

    lo = 2
    hi = lo
    while not enough(hi):  # doubling, then bisection: the power grows with n
        if hi >= cap:
            return math.inf
        lo, hi = hi + 1, min(cap, hi * 2)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if enough(mid) else (mid + 1, hi)
    return lo


def finite(v) -> bool:
    return v is not None and math.isfinite(v)
