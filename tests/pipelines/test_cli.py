"""Bad input through the real command line: a clear message, a non-zero exit, no traceback wall."""

import pytest
import yaml

from pipelines.cli import main
from tests.helpers import free_port
from tests.pipelines.toy import TOY


@pytest.fixture
def cfg(tmp_path):
    p = tmp_path / "toy.yaml"
    p.write_text(yaml.safe_dump({**TOY, "trainer": {**TOY["trainer"], "max_steps": 2}}))
    return p


def test_unknown_key_names_key_and_choices(cfg, tracking_uri, practicum_cli):
    r = practicum_cli("run", str(cfg), "--trainer.max_stepz=3", "--tracking_uri", tracking_uri)
    assert r.returncode == 2
    assert "trainer.max_stepz" in r.stderr and "did you mean trainer.max_steps" in r.stderr
    assert "Traceback" not in r.stderr + r.stdout


def test_wrong_type_and_unknown_init_arg(cfg, tracking_uri, capsys):
    assert main(["run", str(cfg), "--model.init_args.hidden=abc", f"--tracking_uri={tracking_uri}"]) == 2
    err = capsys.readouterr().err
    assert '"hidden"' in err and "Expected a <class 'int'>" in err
    assert main(["run", str(cfg), "--model.init_args.hiden=4", f"--tracking_uri={tracking_uri}"]) == 2
    err = capsys.readouterr().err
    assert "did you mean hidden" in err and "valid init_args" in err and "lr" in err


def test_missing_config_and_missing_data_file(cfg, tracking_uri, tmp_path, capsys):
    assert main(["run", str(tmp_path / "nope.yaml")]) == 2
    assert "nope.yaml' does not exist" in capsys.readouterr().err
    code = main(["run", str(cfg), f"--data.init_args.path={tmp_path}/absent.csv", f"--tracking_uri={tracking_uri}",
                 "--system_metrics=false"])
    captured = capsys.readouterr()
    assert code == 1 and "absent.csv" in captured.err and "FAILED" in captured.out


def test_unwritable_tracking_folder(cfg, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    assert main(["run", str(cfg), f"--tracking_uri=sqlite:///{blocker}/sub/mlflow.db"]) == 2
    err = capsys.readouterr().err
    assert "not writable" in err and "--tracking_uri" in err


def test_unknown_command():
    assert main(["trian"]) == 2


def test_print_config_shows_the_resolved_config(cfg, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(cfg), "--print_config", "--model.init_args.hidden=5"])
    assert exit_.value.code in (0, None)
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["init_args"] == {"hidden": 5, "lr": 0.01, "fail_at_step": -1, "nan_at_step": -1,
                                             "init_shift": 0}
    assert printed["checkpoint_every_n_steps"] is None and printed["trainer"]["max_steps"] == 2
