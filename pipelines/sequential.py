"""Seeds on demand without peeking: a group-sequential design with alpha spending.

A study declared with ``seeds: {pilot: 3, max: 20}`` runs the pilot seeds, looks at its claims, and
adds ``step`` seeds at a time until every claim is decided or ``max`` is reached. Looking after each
round and stopping at the first interval that excludes zero would make a 5% test a 15-20% one; here
each look k spends only part of alpha, so the error over all looks together stays at alpha:

* the spending function (Lan & DeMets 1983) gives how much of alpha may be spent by information
  fraction t = n / max, alpha/2 on each side: O'Brien-Fleming-type 2 - 2 Phi(z_{alpha/4} / sqrt t)
  per side (the default: almost nothing early, nearly the full level at the cap) or Pocock-type
  (alpha/2) ln(1 + (e - 1) t) per side;
* the boundary c_k at look k solves P(no crossing before k, |Z_k| >= c_k) = spent(t_k) - spent(t_{k-1})
  for the canonical joint distribution of the z statistics (independent Brownian increments),
  integrated numerically look by look (Armitage, McPherson & Rowe 1969; Jennison & Turnbull 2000, ch. 19);
* the variance is estimated, so c_k becomes the t quantile with the same tail probability at n_k - 1
  degrees of freedom (the "significance level approach", Jennison & Turnbull 2000, section 11.2);
* diff ± c_k se is a repeated confidence interval (Jennison & Turnbull 1989): it covers the true
  difference at every look at once with probability 1 - alpha, so "better/worse" (the 95% one excludes
  zero) and "equivalent" (the 90% one inside ±margin) keep their error rates however often one looks.

One look at n_max = n is the fixed design: c is Student's t quantile.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Sequence

import numpy as np
from scipy import optimize, stats

SPENDING = ("obrien-fleming", "pocock")
GRID = 101  # Simpson points per look: boundaries within 1e-6 of a 301-point grid and of published tables


def spent(t: np.ndarray, alpha: float, spending: str = "obrien-fleming") -> np.ndarray:
    """Two-sided alpha spent by information fraction t (Lan & DeMets 1983), alpha/2 on each side."""
    t = np.clip(np.asarray(t, dtype=float), 1e-12, 1.0)
    if spending == "obrien-fleming":
        return 4 * stats.norm.sf(stats.norm.isf(alpha / 4) / np.sqrt(t))
    if spending == "pocock":
        return alpha * np.log1p((math.e - 1) * t)
    raise ValueError(f"unknown spending function '{spending}'; choose one of {', '.join(SPENDING)}")


@lru_cache(maxsize=4096)
def z_bounds(fracs: tuple[float, ...], alpha: float, spending: str = "obrien-fleming") -> tuple[float, ...]:
    """Two-sided z boundaries c_1..c_K at information fractions `fracs` (increasing, the last <= 1)."""
    t = np.asarray(fracs, dtype=float)
    inc = np.diff(spent(t, alpha, spending), prepend=0.0)
    bounds = [float(stats.norm.isf(inc[0] / 2))]
    z, w = _simpson(bounds[0])
    f = stats.norm.pdf(z)  # the sub-density of Z_1 on the continuation region (-c_1, c_1)
    for k in range(1, len(t)):
        s_prev, s_now, s_step = math.sqrt(t[k - 1]), math.sqrt(t[k]), math.sqrt(t[k] - t[k - 1])

        def crossing(c: float) -> float:  # P(still running at k-1, |Z_k| >= c)
            p = stats.norm.cdf((-c * s_now - s_prev * z) / s_step) + stats.norm.sf((c * s_now - s_prev * z) / s_step)
            return float(np.sum(w * f * p))

        if inc[k] <= 0 or crossing(40.0) >= inc[k]:
            c = 40.0
        else:
            c = optimize.brentq(lambda c: crossing(c) - inc[k], 1e-6, 40.0, xtol=1e-10)
        bounds.append(c)
        y, wy = _simpson(c)
        # Z_k = (sqrt(t_{k-1}) Z_{k-1} + sqrt(t_k - t_{k-1}) W) / sqrt(t_k): the new sub-density on (-c, c)
        kern = stats.norm.pdf((y[:, None] * s_now - s_prev * z[None, :]) / s_step) * s_now / s_step
        f = kern @ (w * f)
        z, w = y, wy
    return tuple(bounds)


def _simpson(c: float) -> tuple[np.ndarray, np.ndarray]:
    x = np.linspace(-c, c, GRID)
    w = np.ones(GRID)
    w[1:-1:2], w[2:-1:2] = 4, 2
    return x, w * (x[1] - x[0]) / 3


def t_bounds(alpha: float, looks: Sequence[int], n_max: int, spending: str = "obrien-fleming") -> np.ndarray:
    """The critical |t| at each of `looks` (seed counts, increasing, each >= 2) of a design capped at
    n_max seeds. A boundary depends only on the looks up to its own, so one call serves every prefix."""
    looks = [int(x) for x in looks]
    fracs = tuple(min(1.0, x / max(n_max, looks[-1])) for x in looks)
    c = np.asarray(z_bounds(fracs, float(alpha), spending))
    return stats.t.isf(stats.norm.sf(c), np.asarray(looks) - 1)


def t_bound(alpha: float, looks: Sequence[int], n_max: int, spending: str = "obrien-fleming") -> float:
    """The critical |t| at the last of `looks` (seed counts, increasing) of a design capped at n_max
    seeds: Student's t quantile for one look at n_max; the group-sequential boundary otherwise."""
    if int(looks[-1]) < 2:
        return math.nan
    return float(t_bounds(alpha, sorted({int(x) for x in looks if x >= 2}), n_max, spending)[-1])


@dataclass(frozen=True)
class Design:
    """``seeds: {pilot: 3, max: 20, step: 3, spending: obrien-fleming}``: the pilot's seeds first, then
    `step` more per round (default: the pilot's size) until every claim is decided or `max` seeds ran."""

    pilot: int
    max: int
    step: int = 0
    spending: str = "obrien-fleming"

    def __post_init__(self):
        if not (2 <= self.pilot <= self.max):
            raise ValueError(f"seeds: need 2 <= pilot <= max, got pilot={self.pilot}, max={self.max}")
        if self.spending not in SPENDING:
            raise ValueError(f"seeds.spending '{self.spending}' is unknown; choose one of {', '.join(SPENDING)}")
        if self.step < 0:
            raise ValueError(f"seeds.step must be positive, got {self.step}")

    @property
    def round(self) -> int:
        return self.step or self.pilot

    def schedule(self, n_max: int | None = None) -> list[int]:
        """The seed counts at which the study looks, capped at n_max (default: max); a last round of
        less than half a round joins the one before (a sliver of information would get a sliver of alpha)."""
        cap = self.max if n_max is None else n_max
        looks = [x for x in range(self.pilot, cap, self.round) if cap - x >= self.round / 2]
        return [*looks, cap]

    def power(self, delta: float, sd: float, n_max: int, alpha: float, equivalence: float | None = None,
              sims: int = 4000) -> tuple[float, float]:
        """(simulated power, its standard error) of this design capped at n_max: the share of studies
        with true paired difference `delta` (spread `sd`) whose repeated interval decides by the cap:
        excludes zero, or with `equivalence` (a margin) lies inside ±margin at level 1 - 2 alpha."""
        looks = np.asarray(self.schedule(n_max))
        rng = np.random.default_rng(0)  # the same draws for every n: power rises smoothly with n
        mean, se = running_t(rng.standard_normal((sims, n_max)) * sd + delta, looks)
        if equivalence is None:
            done = np.abs(mean) > t_bounds(alpha, looks, n_max, self.spending) * se
        else:
            done = np.abs(mean) + t_bounds(2 * alpha, looks, n_max, self.spending) * se < equivalence
        p = float(done.any(1).mean())
        return p, math.sqrt(p * (1 - p) / sims)

    def describe(self) -> str:
        name = {"obrien-fleming": "O'Brien-Fleming", "pocock": "Pocock"}[self.spending]
        return (f"group-sequential: pilot {self.pilot} seeds, +{self.round} per round, at most {self.max}; "
                f"Lan-DeMets {name}-type alpha spending, repeated confidence intervals (Jennison & Turnbull)")


def running_t(d: np.ndarray, looks: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(mean, standard error) of each row's first n values for every n in `looks`: (rows, len(looks))."""
    idx = np.asarray(looks) - 1
    n = np.asarray(looks, dtype=float)
    s1, s2 = np.cumsum(d, 1)[:, idx], np.cumsum(d * d, 1)[:, idx]
    mean = s1 / n
    var = np.maximum(s2 - n * mean * mean, 0) / (n - 1)
    return mean, np.sqrt(var / n)
