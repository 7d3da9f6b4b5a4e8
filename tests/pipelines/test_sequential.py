"""The sequential procedure's error rates, by simulation (no training): paired differences drawn from
known normals, thousands of simulated studies per case, looked at after every round as
`seeds: {pilot: 3, max: N}` does; and its boundaries against published tables."""

import math

import numpy as np
import pytest

from pipelines import stats as st
from pipelines.sequential import Design, running_t, t_bounds, z_bounds
from pipelines.verdicts import Claim, Plan, evaluate_claims

SIMS = 4000


def simulate(design: Design, delta: float, sd: float, seed: int, sims: int = SIMS):
    """(mean, se, looks) of `sims` studies at every look of `design`."""
    looks = design.schedule()
    d = np.random.default_rng(seed).normal(delta, sd, (sims, design.max))
    mean, se = running_t(d, looks)
    return mean, se, looks


def bounds_from_plan(design: Design, looks: list[int], alpha: float) -> np.ndarray:
    """The critical value the study would use at each look, asked of the same Plan the table uses."""
    return np.array([Plan(design, looks[:k + 1]).bound(alpha, n) for k, n in enumerate(looks)])


def test_boundaries_match_published_tables():
    # Lan-DeMets O'Brien-Fleming-type and Pocock-type, 5 equally spaced looks, two-sided 0.05
    # (Jennison & Turnbull 2000, table 7.? / R ldbounds): 4.877 3.357 2.680 2.290 2.031; 2.438 2.427 2.410 2.397 2.386
    fr = (0.2, 0.4, 0.6, 0.8, 1.0)
    np.testing.assert_allclose(z_bounds(fr, 0.05), [4.877, 3.357, 2.680, 2.290, 2.031], atol=1e-3)
    np.testing.assert_allclose(z_bounds(fr, 0.05, "pocock"), [2.438, 2.427, 2.410, 2.397, 2.386], atol=1e-3)
    # one look is the fixed design: Student's t
    from scipy import stats
    assert t_bounds(0.05, [7], 7)[0] == pytest.approx(stats.t.isf(0.025, 6))


def test_identical_variants_are_rarely_called_different_despite_looking_every_round():
    design = Design(pilot=3, max=20)
    mean, se, looks = simulate(design, 0.0, 1.0, seed=1)
    decisive = (np.abs(mean) > bounds_from_plan(design, looks, st.ALPHA) * se).any(1).mean()
    assert decisive <= 0.05
    # the failure the procedure avoids: a fixed 95% t-test at every look
    from scipy import stats
    naive = (np.abs(mean) > stats.t.isf(0.025, np.array(looks) - 1) * se).any(1).mean()
    assert naive > 0.08
    print(f"identical variants: decisive {decisive:.3f} sequential, {naive:.3f} peeking without correction")


def test_planned_seeds_decide_a_true_effect_of_the_margin_and_never_call_1_5x_margin_equivalent():
    margin, sd = 0.5, 1.0
    n = st.seeds_needed(sd, margin, design=Design(3, 20))
    assert 30 <= n <= 60  # a fixed design needs 36 (noncentral t); the looks cost a few more
    design = Design(pilot=3, max=n)
    mean, se, looks = simulate(design, margin, sd, seed=2)
    assert (np.abs(mean) > bounds_from_plan(design, looks, st.ALPHA) * se).any(1).mean() >= 0.8
    mean, se, looks = simulate(design, 0.0, sd, seed=3)
    c90 = bounds_from_plan(design, looks, 2 * st.ALPHA)
    assert (np.abs(mean) + c90 * se < margin).any(1).mean() >= 0.8  # no true difference: shown equivalent
    # "equivalent" when it is not: at 1.5x the margin (the must-show), and at the margin itself, where the
    # rate is 5% by construction, so the simulation may land within two standard errors above it
    for delta, most in ((1.5 * margin, 0.05), (margin, 0.05 + 2 * math.sqrt(0.05 * 0.95 / SIMS))):
        mean, se, looks = simulate(design, delta, sd, seed=4)
        assert (np.abs(mean) + c90 * se < margin).any(1).mean() <= most


def test_the_claims_code_decides_as_the_simulation_does():
    """Simulated studies through evaluate_claims, look by look: the same decisions as the vectorised
    rule above, for a claim of "better" and one of "equivalent" (each alone: no Holm step)."""
    design = Design(pilot=3, max=12)
    rng = np.random.default_rng(5)
    seen = set()
    for delta in (-0.9, -0.1, 0.0):
        for _ in range(10):
            d = rng.normal(delta, 0.5, 12)
            looks = []
            for n in design.schedule():
                looks.append(n)
                plan = Plan(design, list(looks))
                by_seed = {"a": {"val/loss": {s: 0.0 for s in range(n)}}, "b": {"val/loss": dict(enumerate(d[:n]))}}
                better, same = (evaluate_claims([Claim("b", "val/loss", e)], by_seed, "a", {}, {"val/loss": 0.3}, plan,
                                                planning=False)[0]
                                for e in ("better", "equivalent"))
                mean, se = d[:n].mean(), d[:n].std(ddof=1) / math.sqrt(n)
                assert (better.outcome == "holds") == (mean < -plan.bound(st.ALPHA, n) * se)
                assert (same.outcome == "holds") == (abs(mean) + plan.bound(2 * st.ALPHA, n) * se < 0.3)
                seen |= {better.outcome, same.outcome}
    assert seen == {"holds", "inconclusive", "fails"}
