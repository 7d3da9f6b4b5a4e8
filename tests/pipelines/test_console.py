"""What lands in a log file: plain lines, never a bar's redrawn frames (carriage returns)."""

import io

import pytest

from pipelines import console
from pipelines.console import PlainProgress


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plain_progress_prints_a_line_per_run_start_and_at_most_one_a_minute_during_it():
    out, clock = io.StringIO(), Clock()
    bar = PlainProgress(2, "toy", stream=out, clock=clock)
    console.started(bar, "narrow seed=0")
    for t in (1, 10, 59):  # a run's step updates inside the first minute: silent
        clock.t = t
        bar.set_postfix_str(f"narrow seed=0 step {t}/100 train/loss 0.5")
    clock.t = 61
    bar.set_postfix_str("narrow seed=0 step 61/100 train/loss 0.4")
    clock.t = 62
    bar.set_postfix_str("narrow seed=0 step 62/100 train/loss 0.4")
    bar.update(1)
    bar.write("[toy] narrow seed=0: FINISHED")
    console.started(bar, "wide seed=0")
    lines = out.getvalue().splitlines()
    assert lines == ["[toy] narrow seed=0: started (1 of 2)",
                     "[toy] 0/2 done; narrow seed=0 step 61/100 train/loss 0.4",
                     "[toy] narrow seed=0: FINISHED",
                     "[toy] wide seed=0: started (2 of 2)"]
    assert "\r" not in out.getvalue()


def test_runs_started_together_by_workers_get_their_own_numbers():
    """Two workers start two runs before either ends: they are runs 1 and 2, not 1 and 1; a resumed
    study with 2 runs done starts at run 3."""
    out = io.StringIO()
    bar = PlainProgress(4, "toy", stream=out)
    console.started(bar, "a seed=0")
    console.started(bar, "a seed=1")
    bar.update(1)
    console.started(bar, "b seed=0")
    resumed = PlainProgress(4, "toy", stream=out)
    resumed.update(2)
    console.started(resumed, "b seed=1")
    assert [ln.rsplit("(", 1)[1] for ln in out.getvalue().splitlines()] == ["1 of 4)", "2 of 4)", "3 of 4)", "3 of 4)"]


@pytest.mark.slow
def test_a_study_written_to_a_file_has_no_carriage_return(tmp_path, tracking_uri, practicum_cli):
    """The real path: `practicum study FILE > log`, as CI and tee see it."""
    import yaml

    from tests.pipelines.toy import TOY

    (tmp_path / "toy.yaml").write_text(yaml.safe_dump(TOY))
    study = {"name": "toy-log", "base": "toy.yaml", "primary_metric": "train/loss", "seeds": [0, 1],
             "overrides": {"trainer.max_steps": 4}, "variants": {"narrow": {"model.init_args.hidden": 4}}}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(study))
    out = practicum_cli("study", str(tmp_path / "study.yaml"), "--tracking_uri", tracking_uri)
    assert out.returncode == 0, out.stderr
    assert "\r" not in out.stdout and "\r" not in out.stderr
    lines = out.stdout.splitlines()
    assert "[toy-log] narrow seed=0: started (1 of 2)" in lines and "[toy-log] narrow seed=1: started (2 of 2)" in lines
    assert sum(": FINISHED" in ln for ln in lines) == 2


def test_a_file_gets_plain_lines_and_no_lightning_bar(monkeypatch):
    monkeypatch.setattr("sys.stdout", io.StringIO())  # not a terminal
    assert isinstance(console.progress(3, "toy"), PlainProgress)
    assert console.trainer_overrides({}, progress_bar=True)["enable_progress_bar"] is False
    assert console.trainer_overrides({"enable_progress_bar": True}, progress_bar=True).get("enable_progress_bar") is None


def test_a_terminal_gets_the_redrawn_bar(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr("sys.stdout", Tty())
    assert not isinstance(console.progress(3, "toy"), PlainProgress)
    assert "enable_progress_bar" not in console.trainer_overrides({}, progress_bar=True)
