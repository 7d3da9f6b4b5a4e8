"""Bars: a stage's proportion against a declared bar, by the exact binomial bound (`pipelines.bars`)."""
import pytest
from scipy import stats

from pipelines.bars import Bar, evaluate_bars, parse_bars
from pipelines.verdicts import ClaimError


def test_a_stage_bar_is_an_exact_binomial_bound_holm_across_the_bars():
    bar = Bar("reward", "test/accuracy", 0.6, "test/pairs")
    judged = {"reward": {"test/accuracy": 120 / 171, "test/pairs": 171.0}}
    res = evaluate_bars([bar], judged)[0]
    exact = stats.binomtest(120, 171).proportion_ci(0.90, method="exact")  # its ends: one-sided 95% bounds
    assert (res.low, res.high) == (pytest.approx(exact.low), pytest.approx(exact.high))
    assert res.outcome == "holds" and res.n == 171 and "120" not in res.line() and "of 171" in res.line()
    assert evaluate_bars([bar], {"reward": {"test/accuracy": 0.5, "test/pairs": 171.0}})[0].outcome == "fails"
    assert evaluate_bars([bar], {"reward": {"test/accuracy": 0.62, "test/pairs": 171.0}})[0].outcome == "inconclusive"
    missing = evaluate_bars([bar], {"reward": {"test/accuracy": 0.9}})[0]  # no count: nothing to bound
    assert missing.outcome == "inconclusive" and "logged no" in missing.line()
    # Holm: 114 of 171 (0.667) clears 0.6 alone (one-sided 5%), not at 2.5% beside a second, undecided bar
    alone = {"reward": {"test/accuracy": 114 / 171, "test/pairs": 171.0}}
    lo_5, lo_25 = (stats.binomtest(114, 171).proportion_ci(c, method="exact").low for c in (0.90, 0.95))
    assert lo_25 < 0.6 <= lo_5
    assert evaluate_bars([bar], alone)[0].outcome == "holds"
    other = Bar("reward", "val/accuracy", 0.6, "val/pairs")
    both = {"reward": {**alone["reward"], "val/accuracy": 0.6, "val/pairs": 181.0}}
    assert [r.outcome for r in evaluate_bars([bar, other], both)] == ["inconclusive", "inconclusive"]


def test_bars_are_checked():
    good = {"stage": "reward", "metric": "test/accuracy", "at_least": 0.6, "count": "test/pairs"}
    assert parse_bars([good], ["sft", "reward"]) == [Bar("reward", "test/accuracy", 0.6, "test/pairs")]
    for bad, match in [([{**good, "stage": "rm"}], "not one of the study's stages"),
                       ([{**good, "at_least": 60}], "strictly between 0 and 1"),
                       ([{k: v for k, v in good.items() if k != "count"}], "give {stage, metric, at_least, count}"),
                       (good, "is a list")]:
        with pytest.raises(ClaimError, match=match):
            parse_bars(bad, ["sft", "reward"])
