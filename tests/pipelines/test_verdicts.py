"""The four words, Holm, power and claims against hand computations and scipy (no training)."""

import math

import numpy as np
import pytest
from scipy import stats

from pipelines import stats as st
from pipelines.sequential import Design
from pipelines.verdicts import (
    Claim,
    ClaimError,
    Plan,
    evaluate_claims,
    family_words,
    parse_claims,
    parse_seeds,
)


def test_holm_by_hand():
    # p = 0.01, 0.04, 0.03 with m = 3: 0.01*3 = 0.03; 0.03*2 = 0.06; max(0.06, 0.04*1) = 0.06
    np.testing.assert_allclose(st.holm([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    # the step-down over "decided at level a?" tests is the same procedure
    p = [0.01, 0.04, 0.03, 0.2]
    levels = st.step_down([lambda a, x=x: x <= a for x in p], 0.05)
    assert [lv is not None for lv in levels] == list(st.holm(p) <= 0.05)
    levels = st.step_down([lambda a, x=x: x <= a for x in [0.012, 0.02, 0.04]], 0.05)
    assert levels == [0.05 / 3, 0.05 / 2, 0.05]  # each decision frees its share for the rest


def test_family_words_are_holm_adjusted():
    plan = Plan()
    t = stats.t.isf(0.025, 4)
    sd = 1.0
    se = sd / math.sqrt(5)
    # |t| = 2.9: beyond 2.776 (alone, 5%) but short of the 2-test Holm first step (2.5%: 3.495)
    alone = st.Diff(2.9 * se, sd, 5)
    assert family_words([alone], "min", None, plan) == ["worse"]
    assert family_words([alone, st.Diff(0.0, sd, 5)], "min", None, plan) == ["inconclusive", "inconclusive"]
    # a clear one frees the full level for the other: 4.0 > 3.495 first, then 2.9 > 2.776
    assert family_words([alone, st.Diff(-4.0 * se, sd, 5)], "min", None, plan) == ["worse", "better"]
    assert t < 2.9
    # equivalence: 90% interval inside ±margin
    tiny = st.Diff(0.01, 0.02, 5)
    half90 = stats.t.isf(0.05, 4) * 0.02 / math.sqrt(5)
    assert family_words([tiny], "min", 0.01 + half90 * 1.01, plan) == ["equivalent"]
    assert family_words([tiny], "min", 0.01 + half90 * 0.99, plan) == ["inconclusive"]


def test_power_against_the_noncentral_t_and_a_simulation():
    n, sd = 10, 1.0
    mdd = st.detectable(sd, n)
    c = stats.t.isf(0.025, n - 1)
    rng = np.random.default_rng(0)
    d = rng.normal(mdd, sd, (20000, n))
    t = d.mean(1) / (d.std(1, ddof=1) / math.sqrt(n))
    assert (np.abs(t) > c).mean() == pytest.approx(0.8, abs=0.015)
    n_need = st.seeds_needed(sd, 0.5)
    assert st.power_difference(0.5, sd, n_need, stats.t.isf(0.025, n_need - 1)) >= 0.8
    assert st.power_difference(0.5, sd, n_need - 1, stats.t.isf(0.025, n_need - 2)) < 0.8 or \
        st.power_equivalence(0.5, sd, n_need - 1, stats.t.isf(0.05, n_need - 2)) < 0.8
    assert st.seeds_needed(0.0, 0.5) == 2 and math.isnan(st.seeds_needed(math.nan, 0.5))


def test_claims_are_checked():
    ok = dict(variants=["full", "lora"], baseline="full", margins={"test/loss": 0.02})
    assert parse_claims([{"variant": "lora", "metric": "test/loss", "expect": "equivalent"},
                         {"variant": "lora", "metric": "mem/optimizer_bytes", "expect": "<= 0.1x"}], **ok)
    for bad, match in [
        ([{"variant": "nope", "metric": "test/loss", "expect": "better"}], "not one of"),
        ([{"variant": "full", "metric": "test/loss", "expect": "better"}], "is the variant it is compared with"),
        ([{"variant": "lora", "metric": "test/loss", "expect": "better", "against": "qlora"}], "'qlora' is not one of"),
        ([{"variant": "lora", "metric": "test/acc", "expect": "equivalent"}], "needs a margin for test/acc"),
        ([{"variant": "lora", "metric": "test/loss", "expect": "same"}], "unknown"),
        ([{"variant": "lora", "metric": "params/total", "expect": "better"}], "no better direction"),
        ({"variant": "lora"}, "is a list"),
    ]:
        with pytest.raises(ClaimError, match=match):
            parse_claims(bad, **ok)
    assert parse_seeds([0, 1]) == ([0, 1], None)
    assert parse_seeds("auto") == (list(range(20)), Design(3, 20))
    with pytest.raises(ClaimError, match="pilot"):
        parse_seeds({"max": 5})
    with pytest.raises(ValueError, match="pilot <= max"):
        parse_seeds({"pilot": 6, "max": 5})


def test_ratio_and_word_claims_on_deterministic_and_noisy_metrics():
    by_seed = {"full": {"mem/optimizer_bytes": {0: 1000.0, 1: 1000.0}, "test/loss": {0: 2.0, 1: 2.1, 2: 2.0}},
               "lora": {"mem/optimizer_bytes": {0: 12.0, 1: 12.0}, "test/loss": {0: 2.3, 1: 1.6, 2: 2.4}}}
    claims = [Claim("lora", "mem/optimizer_bytes", "<= 0.1x"), Claim("lora", "mem/optimizer_bytes", ">= 0.5x"),
              Claim("lora", "test/loss", "equivalent")]
    res = evaluate_claims(claims, by_seed, "full", {}, {"test/loss": 0.3}, Plan())
    assert [r.outcome for r in res] == ["holds", "fails", "inconclusive"]
    assert res[0].estimate == pytest.approx(0.012) and res[0].n == 2
    d = np.array([0.3, -0.5, 0.4])  # lora - full at each seed
    assert res[2].estimate == pytest.approx(d.mean())
    assert res[2].high - res[2].low == pytest.approx(2 * stats.t.isf(0.05, 2) * d.std(ddof=1) / math.sqrt(3))
    assert res[2].needed == st.seeds_needed(d.std(ddof=1), 0.3, 0.05 / 1) and 3 < res[2].needed < 200
    assert f"about {res[2].needed:.0f} seeds would decide" in res[2].line()
    against = evaluate_claims([Claim("full", "mem/optimizer_bytes", ">= 50x", against="lora")], by_seed, "full", {},
                              {}, Plan())[0]
    assert against.outcome == "holds" and against.estimate == pytest.approx(1000 / 12)
    tight = evaluate_claims(claims[2:], by_seed, "full", {}, {"test/loss": 0.02}, Plan())[0]
    assert tight.needed == math.inf and "more than 200 seeds" in tight.line()
    assert claims[0].key == "claim/lora/mem/optimizer_bytes/le0.1x"
    assert "holds" in res[0].line() and "ratio 0.012" in res[0].line()


def test_a_claim_with_no_pair_or_one_pair_says_so_instead_of_blank_figures():
    by_seed = {"new": {"test/fid": {0: 10.0, 1: 12.0}}, "old": {"test/fid": {0: 60.0}}}
    claims = [Claim("old", "test/fid", "worse"), Claim("old", "test/fid", ">= 2x"), Claim("no-v", "test/fid", "worse")]
    one, ratio, none = evaluate_claims(claims, by_seed, "new", {"test/fid": "min"}, {}, Plan())
    assert (one.n, ratio.n, none.n) == (1, 1, 0)
    assert "Δ +50, no interval yet, n=1" in one.line() and "ratio 6, no interval yet" in ratio.line()
    assert "no seed finished on both sides" in none.line()
    for r in (one, ratio, none):
        assert r.outcome == "inconclusive" and "nan" not in r.line() and ".." not in r.line(), r.line()


def test_compare_help_explains_the_four_words(capsys):
    from pipelines.cli import main

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    out = capsys.readouterr().out
    for word in ("better", "worse", "equivalent", "inconclusive"):
        assert any(line.split()[:1] == [word] for line in out.splitlines()), word
    assert "no difference" not in out


def test_a_censored_time_counts_as_its_lower_bound_only_where_it_understates_the_claim():
    # nanogpt never reached the target at seed 2: it logged only target/time_s_at_least (its whole fit)
    by_seed = {"speedrun": {"target/time_s": {0: 50.0, 1: 52.0, 2: 55.0}},
               "nanogpt": {"target/time_s": {0: 140.0, 1: 100.0, 2: math.nan},
                           "target/time_s_at_least": {2: 160.0}}}
    slower = Claim("nanogpt", "target/time_s", ">= 1.67x")
    without = evaluate_claims([slower], {v: {"target/time_s": m["target/time_s"]} for v, m in by_seed.items()},
                              "speedrun", {}, {}, Plan())[0]
    assert (without.outcome, without.n, without.censored) == ("inconclusive", 2, 0)
    res = evaluate_claims([slower], by_seed, "speedrun", {}, {}, Plan())[0]
    logs = np.log([140 / 50, 100 / 52, 160 / 55])  # the bound in place of the missing value
    assert (res.outcome, res.n, res.censored) == ("holds", 3, 1)
    assert res.estimate == pytest.approx(math.exp(logs.mean()))
    assert "1 of them a lower bound" in res.line()
    # the same bound on the side where it would overstate the claim is not read
    faster = evaluate_claims([Claim("nanogpt", "target/time_s", "<= 3x")], by_seed, "speedrun", {}, {}, Plan())[0]
    assert (faster.n, faster.censored) == (2, 0)
    worse = evaluate_claims([Claim("nanogpt", "target/time_s", "worse")], by_seed, "speedrun",
                            {"target/time_s": "min"}, {}, Plan())[0]
    assert (worse.n, worse.censored) == (3, 1)
    better = evaluate_claims([Claim("nanogpt", "target/time_s", "better")], by_seed, "speedrun",
                             {"target/time_s": "min"}, {}, Plan())[0]
    assert (better.n, better.censored) == (2, 0)
    # a bound supports a claim but never refutes it: far below the bar it is inconclusive, not fails
    low = {"speedrun": by_seed["speedrun"], "nanogpt": {"target/time_s": {0: 51.0, 1: 53.0},
                                                         "target/time_s_at_least": {2: 54.0}}}
    short = evaluate_claims([Claim("nanogpt", "target/time_s", ">= 5x")], low, "speedrun", {}, {}, Plan())[0]
    assert short.censored == 1 and short.high < 5 and short.outcome == "inconclusive"
    exact = {"speedrun": low["speedrun"], "nanogpt": {"target/time_s": {0: 51.0, 1: 53.0, 2: 54.0}}}
    assert evaluate_claims([Claim("nanogpt", "target/time_s", ">= 5x")], exact, "speedrun", {}, {},
                           Plan())[0].outcome == "fails"
