"""A study's figures from what its runs logged: one uncertainty everywhere (the 95% t-interval over
seeds, as in the tables), and the report metric beside the validation curve."""

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from mlflow.tracking import MlflowClient
from scipy import stats

from pipelines.plots import study_plots
from tests.helpers import logged_study

VAL = [[3.0, 2.0, 1.5, 1.2], [3.2, 2.4, 1.9, 1.3], [2.9, 2.1, 1.4, 1.0]]  # three seeds, four validations


def _t_half(x) -> float:
    lo, hi = stats.ttest_1samp(x, 0.0).confidence_interval(0.95)
    return (hi - lo) / 2


def test_curves_band_and_bars_are_95_percent_t_intervals_and_the_report_metric_is_drawn(tracking_uri):
    tests = [1.25, 1.31, 1.05]
    peaks = [30 * 2**20, 34 * 2**20, 29 * 2**20]
    runs = {"base": [{"test/loss": t, "mem/host_peak_rss_increase_bytes": p, "perf/samples_per_s": 100.0 + i}
                     for i, (t, p) in enumerate(zip(tests, peaks))]}
    parent = logged_study(tracking_uri, "curvy", runs, {"val/loss": VAL}, report="test")
    figs = study_plots(MlflowClient(tracking_uri), parent, "val/loss")
    ax = figs["val_loss.png"].axes[0]
    assert "95% t-interval" in ax.get_title() and "test/loss" in ax.get_title()
    band = next(c for c in ax.collections if isinstance(c, PolyCollection)).get_paths()[0].vertices
    vals = np.array(VAL)
    for step in range(4):  # the band at each step: mean ± the t half-width, not min..max
        ys = band[np.isclose(band[:, 0], step), 1]
        half = _t_half(vals[:, step])
        assert ys.max() == pytest.approx(vals[:, step].mean() + half)
        assert ys.min() == pytest.approx(vals[:, step].mean() - half)
    star = next(c for c in ax.containers if "test/loss" in c.get_label())  # the verdict's metric at the end
    (seg,) = star.lines[2][0].get_segments()
    assert seg[0][0] >= 3 and seg[1][1] - np.mean(tests) == pytest.approx(_t_half(tests))

    _, peaks_ax, throughput_ax = figs["memory_throughput.png"].axes
    assert "95% t-interval" in peaks_ax.get_title() and "95% t-interval" in throughput_ax.get_title()
    (bar,) = [c for c in peaks_ax.containers if hasattr(c, "errorbar")]
    (seg,) = bar.errorbar.lines[2][0].get_segments()
    assert (seg[1][1] - seg[0][1]) / 2 == pytest.approx(_t_half(np.array(peaks) / 2**20))
    plt.close("all")
