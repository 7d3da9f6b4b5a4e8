"""tracking.redact: URL passwords and secret query values never reach what the pipeline logs.

The end-to-end check (a run with user:password in --tracking_uri against the team server, then
every param, tag, artifact and checkpoint searched) is in tests/server/test_tracking.py.
"""

import pytest
from mlflow.tracking import MlflowClient

from pipelines import tracking as trk


@pytest.mark.parametrize(
    "text, expected",
    [
        ("http://alice:s3cret@127.0.0.1:5000", "http://alice:***@127.0.0.1:5000"),
        ("postgresql+psycopg2://u:pw@db:5432/optuna", "postgresql+psycopg2://u:***@db:5432/optuna"),
        # a password holding an unescaped '@': the host is what follows the last one
        ("mysql://u:p@ss@db/x", "mysql://u:***@db/x"),
        ("tracking_uri: https://bob:tok3n@mlflow.example.org/path?x=1\nother: 2",
         "tracking_uri: https://bob:***@mlflow.example.org/path?x=1\nother: 2"),
        ("postgresql://db/x?sslmode=require&password=hunter2", "postgresql://db/x?sslmode=require&password=***"),
        ("s3://b/k?X-Amz-Credential=AK%2F1&X-Amz-Signature=abc123&X-Amz-Date=1",
         "s3://b/k?X-Amz-Credential=***&X-Amz-Signature=***&X-Amz-Date=1"),
        ("ConnectionError: http://a:b@h:1/api failed; retry http://c:d@h:2", "ConnectionError: http://a:***@h:1/api failed; retry http://c:***@h:2"),
    ],
)
def test_passwords_in_urls_are_masked_wherever_they_sit(text, expected):
    assert trk.redact(text) == expected


@pytest.mark.parametrize("text", ["sqlite:///mlruns/mlflow.db", "file:///tmp/x", "runs:/0123abcd/checkpoints/best.ckpt",
                                  "http://127.0.0.1:5000", "postgresql://mlflow@db/x", "user:pass without a scheme",
                                  "a@b.c", "val/loss"])
def test_text_without_url_secrets_is_left_alone(text):
    assert trk.redact(text) == text


def test_structures_are_walked_and_keep_their_types():
    value = {"a": ["http://u:p@h", ("sqlite:///x", 3)], "b": 1.5, "c": None}
    assert trk.redact(value) == {"a": ["http://u:***@h", ("sqlite:///x", 3)], "b": 1.5, "c": None}
    assert isinstance(trk.redact(value)["a"][1], tuple)


def test_log_params_stores_masked_values(tmp_path):
    client = MlflowClient(f"sqlite:///{tmp_path / 'm.db'}")
    exp = client.create_experiment("e", artifact_location=(tmp_path / "a").as_uri())
    run_id = client.create_run(exp).info.run_id
    trk.log_params(client, run_id, {"tune.storage": "postgresql://u:hunter2@db/optuna", "lr": 0.1})
    assert client.get_run(run_id).data.params == {"tune.storage": "postgresql://u:***@db/optuna", "lr": "0.1"}
