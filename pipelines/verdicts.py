"""What a study can tell: the four words for its comparisons, and its claims.

A study declares margins (what difference matters, per metric) and claims (what it exists to show)::

    margins: {test/loss: 0.02}
    claims:
      - {variant: lora-r8, metric: test/loss, expect: equivalent}           # within margins[test/loss]
      - {variant: lora-r8, metric: mem/optimizer_bytes, expect: "<= 0.1x"}  # a ratio against the baseline
      - {variant: layers-2, metric: test/loss, expect: worse}
      - {variant: batch-b4, metric: test/acc, expect: worse, against: batch-b64}   # another variant

A study may declare which metrics mean the same under every variant (``comparable: [test/loss]``;
default: all): only those get a verdict and a claim. A DDPM's L_simple under two noise schedules is a
different average, so `ddpm-quick` declares none.

A claim holds, fails or is inconclusive:
  better / worse   holds when the comparison earns that word; fails when it earns the other one or
                   "equivalent" (the margin rules out a difference that matters);
  equivalent       holds when the 1 - 2a interval lies inside ±margin; fails when it lies beyond;
  "<= Rx", ">= Rx" the ratio variant / baseline (geometric mean over seeds: a paired t-interval on
                   the log ratio) holds when the one-sided bound clears R; fails when it is on the
                   wrong side of R.

Censored values: a run that ended before it could measure a metric M (a time to a target it never
reached) may log M_at_least, a lower bound (`modules.targets.TimeToTarget`). A claim reads that
bound in place of the missing value only where it can understate the claim's case, never overstate
it: for the variant when larger variant values support the claim (">= Rx", or "worse" on a metric
where lower is better), for the baseline when larger baseline values do ("<= Rx", "better"). Such
a claim can hold, but it cannot fail on a bound (the true value may lie anywhere above it): that
outcome is "inconclusive". Its line counts the bounds read.

Bars, a claim on one stage's run against a declared bar, are `pipelines.bars`.

Multiplicity: the k comparisons against the baseline on the report metric are one family (Holm,
separately for differences and for equivalence); a study's claims are another (Holm). Under a
group-sequential `pipelines.sequential.Design` the same step-down runs on the repeated intervals
(Maurer & Bretz 2013).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from pipelines import stats as st
from pipelines.sequential import Design, t_bound

RATIO = re.compile(r"^\s*(<=|>=|<|>)\s*([0-9.]+(?:e-?[0-9]+)?)\s*x\s*$")
EXPECT = ("better", "worse", "equivalent")


class ClaimError(ValueError):
    pass


@dataclass
class Plan:
    """How a study decides: a fixed list of seeds (no `design`: one look), or a group-sequential
    design and the seed counts at which it has looked so far."""

    design: Design | None = None
    looks: list[int] = field(default_factory=list)

    def bound(self, alpha: float, n: int) -> float:
        """The critical |t| of a two-sided 1 - alpha (repeated) interval at n paired seeds."""
        if n < 2:
            return math.nan
        if self.design is None:
            return t_bound(alpha, [n], n)
        looks = sorted({min(x, n) for x in self.looks if min(x, n) >= 2} | {n})
        return t_bound(alpha, looks, max(self.design.max, n), self.design.spending)

    def half(self, d: st.Diff, alpha: float) -> float:
        if d.n < 2:
            return math.nan
        return 0.0 if d.sd == 0 else self.bound(alpha, d.n) * d.se

    def detectable(self, d: st.Diff, alpha: float) -> float:
        """The smallest difference these seeds detect with 80% power (`stats.detectable`)."""
        return st.detectable(d.sd, d.n, self.bound(alpha, d.n)) if d.n >= 2 else math.nan

    def needed(self, d: st.Diff, target: float, alpha: float) -> float:
        """Seeds that decide a difference of `target` with 80% power either way (`stats.seeds_needed`)."""
        if d.n < 2:
            return math.nan
        return st.seeds_needed(d.sd, target, alpha, self.design)

    def describe(self) -> str:
        return self.design.describe() if self.design else "fixed seeds: one look, Student's t"


def word(d: st.Diff, mode: str | None, margin: float | None, plan: Plan, alpha: float = st.ALPHA) -> str:
    """better / worse / equivalent / inconclusive at level alpha ("" without a better direction)."""
    if mode is None or not math.isfinite(d.mean):
        return ""
    return st.verdict(d.mean, plan.half(d, alpha), mode, margin, plan.half(d, 2 * alpha))


def family_words(diffs: list[st.Diff], mode: str | None, margin: float | None, plan: Plan,
                 alpha: float = st.ALPHA) -> list[str]:
    """The words of k comparisons against one baseline, Holm-adjusted: differences one family,
    equivalence (where a margin is declared) another."""
    if mode is None:
        return [""] * len(diffs)
    differ = st.step_down([lambda a, d=d: d.n >= 2 and abs(d.mean) > plan.half(d, a) for d in diffs], alpha)
    same = st.step_down([lambda a, d=d: margin is not None and d.n >= 2
                         and abs(d.mean) + plan.half(d, 2 * a) < margin for d in diffs], alpha)
    out = []
    for d, a_d, a_s in zip(diffs, differ, same):
        if a_d is not None:
            out.append("better" if (d.mean < 0) == (mode == "min") else "worse")
        else:
            out.append("equivalent" if a_s is not None else ("inconclusive" if math.isfinite(d.mean) else ""))
    return out


def parse_seeds(raw: Any) -> tuple[list[int | None], Design | None]:
    """A study's `seeds:`: a list (every variant once per seed, one look) or ``{pilot: 3, max: 20}``
    (`pipelines.sequential.Design`: seeds 0, 1, ... added in rounds); "auto" is {pilot: 3, max: 20}."""
    if raw == "auto":
        raw = {"pilot": 3, "max": 20}
    if isinstance(raw, dict):
        unknown = set(raw) - {"pilot", "max", "step", "spending"}
        if unknown or not {"pilot", "max"} <= set(raw):
            raise ClaimError(f"seeds: give a list such as [0, 1, 2] or {{pilot: 3, max: 20}} (optional step, "
                             f"spending: obrien-fleming|pocock); got {raw!r}")
        design = Design(**raw)
        return list(range(design.max)), design
    if not isinstance(raw, list) or not raw or not all(isinstance(x, int) for x in raw if x is not None) \
            or len(set(raw)) != len(raw):
        raise ClaimError(f"seeds must be a non-empty list of distinct integers, e.g. [0, 1, 2], or "
                         f"{{pilot: 3, max: 20}}; got {raw!r}")
    return raw, None


# ---- claims -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Claim:
    variant: str
    metric: str
    expect: str  # better | worse | equivalent | "<= 0.1x" ...
    against: str | None = None  # the variant it is compared with (default: the study's baseline)

    @property
    def ratio(self) -> tuple[str, float] | None:
        m = RATIO.match(self.expect)
        return (m.group(1)[0], float(m.group(2))) if m else None

    @property
    def key(self) -> str:
        """MLflow-safe name: claim/<variant>/<metric>/<expect>, "<= 0.1x" as le0.1x."""
        r = self.ratio
        tail = self.expect if r is None else f"{'le' if r[0] == '<' else 'ge'}{r[1]:g}x"
        return f"claim/{self.variant}/{self.metric}/{tail}" + (f"/vs/{self.against}" if self.against else "")

    def __str__(self) -> str:
        return f"{self.variant} {self.metric} {self.expect}" + (f" against {self.against}" if self.against else "")


def parse_claims(raw: Any, variants: list[str], baseline: str, margins: dict[str, float],
                 modes: dict[str, str] | None = None) -> list[Claim]:
    """The study's `claims:` list as written (dicts), read and checked (`check_claims`)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ClaimError("claims is a list of {variant, metric, expect}, e.g. "
                         "[{variant: lora-r8, metric: test/loss, expect: equivalent}]")
    out = []
    for i, c in enumerate(raw):
        if not isinstance(c, dict) or not {"variant", "metric", "expect"} <= set(c) <= {"variant", "metric", "expect",
                                                                                       "against"}:
            raise ClaimError(f"claims[{i}]: give {{variant, metric, expect}} (optional: against), got {c!r}")
        out.append(Claim(str(c["variant"]), str(c["metric"]), str(c["expect"]).strip(), c.get("against")))
    return check_claims(out, variants, baseline, margins, modes)


def check_claims(claims: list[Claim], variants: list[str], baseline: str, margins: dict[str, float],
                 modes: dict[str, str] | None = None, comparable: list[str] | None = None) -> list[Claim]:
    """Known variants (not the one compared with), a known expectation, a margin for every
    "equivalent", a direction for better/worse, and a metric the study declares comparable (all, when
    it declares none). Metric keys are as the table shows them (after `report: test`)."""
    for i, claim in enumerate(claims):
        if comparable is not None and claim.metric not in comparable:
            raise ClaimError(f"claims[{i}]: {claim.metric} is not among the metrics the study declares comparable "
                             f"across variants ({comparable}); a verdict on it would mislead: drop the claim, or add "
                             "the metric to comparable: if it means the same under every variant")
        for v in (claim.variant, claim.against):
            if v is not None and v not in variants:
                raise ClaimError(f"claims[{i}]: variant '{v}' is not one of {variants}")
        if claim.variant == (claim.against or baseline):
            raise ClaimError(f"claims[{i}]: '{claim.variant}' is the variant it is compared with; name another")
        if claim.expect not in EXPECT and claim.ratio is None:
            raise ClaimError(f"claims[{i}]: expect '{claim.expect}' is unknown; use one of {', '.join(EXPECT)} "
                             "or a ratio against the baseline such as \"<= 0.1x\" or \">= 2x\"")
        if claim.expect == "equivalent" and claim.metric not in margins:
            raise ClaimError(f"claims[{i}]: 'equivalent' needs a margin for {claim.metric}: add "
                             f"margins: {{{claim.metric}: SIZE}} (the difference that would matter)")
        if claim.expect in ("better", "worse") and st.mode_of(claim.metric, modes) is None:
            raise ClaimError(f"claims[{i}]: {claim.metric} has no better direction; say which in "
                             f"modes: {{{claim.metric}: min}} (or max)")
    return claims


@dataclass
class ClaimResult:
    claim: Claim
    outcome: str  # holds | fails | inconclusive
    estimate: float  # the mean paired difference, or the ratio for ratio claims
    low: float
    high: float
    level: float  # of the interval [low, high]
    n: int
    needed: float  # seeds that would decide it (NaN: decided, or no spread yet)
    margin: float | None = None
    censored: int = 0  # lower bounds read in place of missing values (see "Censored values")

    @property
    def decided(self) -> bool:
        return self.outcome != "inconclusive"

    def line(self, human: Callable[[float, str], str] = lambda v, key: f"{v:.4g}") -> str:
        """``lora-r8 test/loss equivalent (±0.02): inconclusive  [Δ +0.34, 90% interval -0.22..0.90, n=2;
        about 37 seeds would decide it]``; `human(value, metric key)` writes the numbers (units)."""
        c = self.claim
        m = c.metric
        what = f"{c} (±{human(self.margin, m)})" if c.expect == "equivalent" else str(c)
        est = (f"ratio {self.estimate:.4g}" if c.ratio else
               f"Δ {'+' if self.estimate > 0 else ''}{human(self.estimate, m)}")
        if self.n == 0 or not math.isfinite(self.estimate):  # no figures to print, so no blank ones
            fig = "no seed finished on both sides"
        elif not (math.isfinite(self.low) and math.isfinite(self.high)):
            fig = f"{est}, no interval yet"
        elif c.ratio:
            fig = f"ratio {self.estimate:.4g}, {self.level:.4g}% interval {self.low:.4g}..{self.high:.4g}"
        else:
            fig = (f"Δ {'+' if self.estimate > 0 else ''}{human(self.estimate, m)}, {self.level:.4g}% interval "
                   f"{human(self.low, m)}..{human(self.high, m)}")
        more = ""
        if not self.decided:
            more = ("; more than 200 seeds would be needed" if self.needed == math.inf else
                    f"; about {self.needed:.0f} seeds would decide it" if math.isfinite(self.needed) else "")
        bounds = (f", {self.censored} of them a lower bound (a run that never got there, counted at its end)"
                  if self.censored else "")
        return f"{what}: {self.outcome}  [{fig}, n={self.n}{bounds}{more}]"


def evaluate_claims(claims: list[Claim], by_seed: dict[str, dict[str, dict]], baseline: str,
                    modes: dict[str, str], margins: dict[str, float], plan: Plan,
                    alpha: float = st.ALPHA, planning: bool = True) -> list[ClaimResult]:
    """Each claim's outcome, Holm across the claims. `by_seed[variant][metric]` maps seed -> value of
    the finished runs. `planning`: work out the seeds an undecided claim would need."""
    diffs, censored = [], []
    for c in claims:
        mine, theirs, k = _with_bounds(c, by_seed.get(c.variant, {}), by_seed.get(c.against or baseline, {}), modes)
        diffs.append(st.paired(mine, theirs, log=c.ratio is not None))
        censored.append(k)

    def outcome_of(c: Claim, d: st.Diff, k: int, a: float) -> str:
        o = _outcome(c, d, modes, margins, plan, a)
        return "inconclusive" if o == "fails" and k else o  # a bound can support a claim, never refute it

    levels = st.step_down([lambda a, c=c, d=d, k=k: outcome_of(c, d, k, a) != "inconclusive"
                           for c, d, k in zip(claims, diffs, censored)], alpha)
    out = []
    for c, d, k, a in zip(claims, diffs, censored, levels):
        a_used = a if a is not None else alpha / max(1, sum(x is None for x in levels))
        outcome = outcome_of(c, d, k, a_used)
        two_sided = c.expect in ("better", "worse")
        half = plan.half(d, a_used if two_sided else 2 * a_used)
        margin = margins.get(c.metric)
        if c.ratio:
            est, low, high = math.exp(d.mean), math.exp(d.mean - half), math.exp(d.mean + half)
            target = abs(d.mean - math.log(c.ratio[1]))
        else:
            est, low, high = d.mean, d.mean - half, d.mean + half
            target = margin if margin is not None else abs(d.mean)
        needed = plan.needed(d, target, a_used) if planning and outcome == "inconclusive" else math.nan
        out.append(ClaimResult(c, outcome, est, low, high, 100 * (1 - (a_used if two_sided else 2 * a_used)),
                               d.n, needed, margin, k))
    return out


BOUND = "_at_least"


def _with_bounds(c: Claim, variant: dict[str, dict], base: dict[str, dict], modes: dict) -> tuple[dict, dict, int]:
    """(variant's {seed: value}, baseline's {seed: value}, bounds read) for claim `c`: a seed missing
    `c.metric` but holding its lower bound `c.metric + "_at_least"` gets the bound on the side where
    a larger value supports the claim, and only on that side of the pair (one exact value beside it)."""
    mine, theirs = dict(variant.get(c.metric, {})), dict(base.get(c.metric, {}))
    if c.ratio:
        larger_variant = c.ratio[0] in (">=", ">")
    elif c.expect in ("better", "worse"):
        mode = st.mode_of(c.metric, modes)
        if mode is None:
            return mine, theirs, 0
        larger_variant = (c.expect == "worse") == (mode == "min")
    else:
        return mine, theirs, 0  # equivalence: a bound says nothing about closeness
    side, bounds, other = ((mine, variant.get(c.metric + BOUND, {}), theirs) if larger_variant
                           else (theirs, base.get(c.metric + BOUND, {}), mine))
    k = 0
    for seed, bound in bounds.items():
        if not st.finite(side.get(seed)) and st.finite(other.get(seed)) and st.finite(bound):
            side[seed] = bound
            k += 1
    return mine, theirs, k


def _outcome(c: Claim, d: st.Diff, modes: dict, margins: dict, plan: Plan, alpha: float) -> str:
    if d.n < 2 or not math.isfinite(d.mean):
        return "inconclusive"
    if c.ratio:  # one-sided at alpha on the log ratio: the 1 - 2 alpha interval against log R
        op, r = c.ratio
        half, t = plan.half(d, 2 * alpha), math.log(r)
        lo, hi = d.mean - half, d.mean + half
        below, above = hi <= t if half > 0 else d.mean <= t, lo >= t if half > 0 else d.mean >= t
        if (op == "<" and below) or (op == ">" and above):
            return "holds"
        return "fails" if (op == "<" and lo > t) or (op == ">" and hi < t) else "inconclusive"
    margin = margins.get(c.metric)
    if c.expect == "equivalent":
        half = plan.half(d, 2 * alpha)
        if abs(d.mean) + half < margin:
            return "holds"
        return "fails" if abs(d.mean) - half > margin else "inconclusive"
    w = word(d, st.mode_of(c.metric, modes), margin, plan, alpha)
    if w == c.expect:
        return "holds"
    return "inconclusive" if w in ("inconclusive", "") else "fails"
