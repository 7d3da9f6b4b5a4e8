"""A bar: a claim on one stage's run, not on variants over seeds. A stage (a reward model the variants
optimise against) runs once, so no seeds measure its spread; what does is the count of items its
metric is a proportion of::

    bars: [{stage: reward, metric: test/accuracy, at_least: 0.6, count: test/pairs}]

holds when the exact one-sided (Clopper-Pearson) lower bound of the proportion clears the bar, fails
when the upper bound lies below it, and is inconclusive between (Holm across the study's bars).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from pipelines import stats as st
from pipelines.verdicts import ClaimError


@dataclass(frozen=True)
class Bar:
    stage: str
    metric: str  # a proportion in [0, 1], e.g. an accuracy
    at_least: float
    count: str  # the metric that holds the number of items the proportion is over

    @property
    def key(self) -> str:
        return f"bar/{self.stage}/{self.metric}/ge{self.at_least:g}"

    def __str__(self) -> str:
        return f"stage {self.stage} {self.metric} >= {self.at_least:g}"


def parse_bars(raw: Any, stages: list[str]) -> list[Bar]:
    """The study's `bars:` as written (dicts), checked: a known stage, a bar strictly inside (0, 1)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ClaimError("bars is a list of {stage, metric, at_least, count}, e.g. "
                         "[{stage: reward, metric: test/accuracy, at_least: 0.6, count: test/pairs}]")
    out = []
    for i, b in enumerate(raw):
        if not isinstance(b, dict) or set(b) != {"stage", "metric", "at_least", "count"}:
            raise ClaimError(f"bars[{i}]: give {{stage, metric, at_least, count}}, got {b!r}")
        if b["stage"] not in stages:
            raise ClaimError(f"bars[{i}]: stage '{b['stage']}' is not one of the study's stages {stages}")
        if not isinstance(b["at_least"], (int, float)) or not 0 < b["at_least"] < 1:
            raise ClaimError(f"bars[{i}]: at_least is a proportion strictly between 0 and 1, got {b['at_least']!r}")
        out.append(Bar(str(b["stage"]), str(b["metric"]), float(b["at_least"]), str(b["count"])))
    return out


@dataclass
class BarResult:
    bar: Bar
    outcome: str  # holds | fails | inconclusive
    value: float  # the proportion, NaN when the stage did not log it
    n: int  # items it is over
    low: float  # one-sided lower and upper bounds at `level`
    high: float
    level: float

    def line(self) -> str:
        if self.n == 0:
            return f"{self.bar}: inconclusive  [the stage logged no {self.bar.metric} with {self.bar.count}]"
        return (f"{self.bar}: {self.outcome}  [{self.value:.3g} of {self.n}, one-sided {self.level:.4g}% bounds "
                f"{self.low:.3g}..{self.high:.3g}, exact binomial]")


def proportion_bounds(k: int, n: int, alpha: float) -> tuple[float, float]:
    """One-sided exact (Clopper-Pearson) 1 - alpha lower and upper bounds of k successes in n."""
    from scipy.stats import beta

    low = 0.0 if k == 0 else float(beta.ppf(alpha, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha, k + 1, n - k))
    return low, high


def evaluate_bars(bars: list[Bar], metrics: dict[str, dict[str, float]], alpha: float = st.ALPHA) -> list[BarResult]:
    """Each bar's outcome from its stage's logged metrics (`metrics[stage][key]`), Holm across the bars."""
    seen = []
    for b in bars:
        m = metrics.get(b.stage, {})
        p, n = m.get(b.metric, math.nan), m.get(b.count, math.nan)
        ok = st.finite(p) and st.finite(n) and n >= 1 and 0 <= p <= 1
        seen.append((int(round(p * n)), int(n)) if ok else (0, 0))

    def outcome(k: int, n: int, bar: float, a: float) -> str:
        if n == 0:
            return "inconclusive"
        low, high = proportion_bounds(k, n, a)
        return "holds" if low >= bar else "fails" if high < bar else "inconclusive"

    levels = st.step_down([lambda a, kn=kn, b=b: outcome(*kn, b.at_least, a) != "inconclusive"
                           for b, kn in zip(bars, seen)], alpha)
    out = []
    for b, (k, n), a in zip(bars, seen, levels):
        a_used = a if a is not None else alpha / max(1, sum(x is None for x in levels))
        low, high = proportion_bounds(k, n, a_used) if n else (math.nan, math.nan)
        out.append(BarResult(b, outcome(k, n, b.at_least, a_used), k / n if n else math.nan, n, low, high,
                             100 * (1 - a_used)))
    return out
