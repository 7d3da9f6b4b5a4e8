"""The s3 profile against a real S3 server: SeaweedFS on loopback in MinIO's place, the tracking server's
artifacts in its bucket, MLflow's key held to that bucket as minio-init's policy holds it.

SeaweedFS's IAM API refuses minio-init's policy document (it knows no s3:ListBucketMultipartUploads), so
the policy minio-init writes is translated, action by action, into SeaweedFS's per-bucket identity actions
(`SEAWEED_ACTION`); an action minio-init adds later fails here until it is mapped.
"""

from __future__ import annotations

import secrets

import matplotlib.image
import mlflow
import pytest
import torch
import yaml
from botocore.exceptions import ClientError
from mlflow import MlflowClient

from server.tracking import TrackingServer
from tests.pipelines.toy import ToyModule

BUCKET, OTHER = "mlflow-artifacts", "team-private"
# S3 action -> SeaweedFS's action class, as its S3 gateway files each request
# (weed/s3api/s3api_server.go: object GETs and parts under Read, listings under List, changes under Write).
SEAWEED_ACTION = {
    "s3:GetBucketLocation": "Read", "s3:GetObject": "Read", "s3:ListMultipartUploadParts": "Read",
    "s3:ListBucket": "List", "s3:ListBucketMultipartUploads": "List",
    "s3:PutObject": "Write", "s3:DeleteObject": "Write", "s3:AbortMultipartUpload": "Write",
}


class ServedToy(ToyModule):
    """The toy model with a forward, so the pipeline logs it as an MLflow Model that predicts."""

    def forward(self, x):
        return self.net(x)


def seaweed_actions(policy: dict) -> list[str]:
    """minio-init's IAM policy as SeaweedFS identity actions (``Read:bucket``, ...)."""
    out = set()
    for st in policy["Statement"]:
        assert st["Effect"] == "Allow"
        for resource in st["Resource"]:
            bucket = resource.removeprefix("arn:aws:s3:::").split("/")[0]
            out |= {f"{SEAWEED_ACTION[a]}:{bucket}" for a in st["Action"]}
    return sorted(out)


def _all_artifacts(client, run_id, path=None) -> list[str]:
    files = []
    for a in client.list_artifacts(run_id, path):
        files += _all_artifacts(client, run_id, a.path) if a.is_dir else [a.path]
    return files


@pytest.mark.slow(seconds=124)  # a fresh clone's `make test`: the longest test, so it starts first
def test_study_artifacts_go_to_s3_and_mlflows_key_reaches_only_its_bucket(tmp_path, stack_env, run_minio_init,
                                                                         seaweedfs, monkeypatch):
    from pipelines.checkpoint import read_checkpoint
    from pipelines.study import run_study

    env = stack_env(MINIO_ROOT_USER="root-user", MINIO_ROOT_PASSWORD="root-" + secrets.token_hex(8),
                    MLFLOW_S3_BUCKET=BUCKET, MLFLOW_S3_ACCESS_KEY="mlflow", MLFLOW_S3_SECRET_KEY="s3-" + secrets.token_hex(8),
                    MLFLOW_ARTIFACTS_DESTINATION=f"s3://{BUCKET}")
    (tmp_path / "init").mkdir()
    r, calls, policy = run_minio_init(tmp_path / "init", env)
    assert r.returncode == 0, r.stderr
    identities = [
        {"name": "root", "credentials": [{"accessKey": env["MINIO_ROOT_USER"], "secretKey": env["MINIO_ROOT_PASSWORD"]}],
         "actions": ["Admin", "Read", "Write", "List", "Tagging"]},
        {"name": "mlflow", "credentials": [{"accessKey": "mlflow", "secretKey": env["MLFLOW_S3_SECRET_KEY"]}],
         "actions": seaweed_actions(policy)},
    ]
    assert identities[1]["actions"] == [f"List:{BUCKET}", f"Read:{BUCKET}", f"Write:{BUCKET}"]
    with seaweedfs(tmp_path / "seaweed", identities) as s3:
        root = s3.client(env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
        for bucket in (BUCKET, OTHER):  # minio-init's `mc mb`, and a bucket that is not MLflow's
            root.create_bucket(Bucket=bucket)
        root.put_object(Bucket=OTHER, Key="payroll.csv", Body=b"secret")

        # 1. MLflow's key: its bucket only, as the policy says; the other bucket and bucket changes are refused.
        key = s3.client("mlflow", env["MLFLOW_S3_SECRET_KEY"])
        key.put_object(Bucket=BUCKET, Key="probe", Body=b"x")
        assert key.get_object(Bucket=BUCKET, Key="probe")["Body"].read() == b"x"
        key.delete_object(Bucket=BUCKET, Key="probe")
        for refused in (lambda: key.get_object(Bucket=OTHER, Key="payroll.csv"),
                        lambda: key.put_object(Bucket=OTHER, Key="planted", Body=b"x"),
                        lambda: key.list_objects_v2(Bucket=OTHER),
                        lambda: key.delete_object(Bucket=OTHER, Key="payroll.csv"),
                        lambda: key.create_bucket(Bucket="new-bucket"),
                        lambda: key.delete_bucket(Bucket=BUCKET)):
            with pytest.raises(ClientError, match="AccessDenied"):
                refused()
        assert [b["Name"] for b in root.list_buckets()["Buckets"]] == sorted([BUCKET, OTHER])
        assert root.get_object(Bucket=OTHER, Key="payroll.csv")["Body"].read() == b"secret"

        # 2. A study through the tracking server, whose artifact root is the bucket (the s3 profile's settings).
        env["MLFLOW_S3_ENDPOINT_URL"] = s3.endpoint
        with TrackingServer(tmp_path / "state", env) as server:
            assert server.remote_artifacts
            for k, v in server.client_env().items():  # the client holds no S3 key: artifacts go through MLflow
                monkeypatch.setenv(k, v)
            monkeypatch.chdir(tmp_path)
            (tmp_path / "toy.yaml").write_text(yaml.safe_dump({
                "seed_everything": 3,
                "trainer": {"max_steps": 4, "val_check_interval": 2, "log_every_n_steps": 1, "limit_val_batches": 1,
                            "limit_test_batches": 1, "enable_progress_bar": False, "enable_model_summary": False},
                "model": {"class_path": f"{__name__}.ServedToy", "init_args": {"hidden": 4}},
                "data": {"class_path": "tests.pipelines.toy.ToyDataModule", "init_args": {"n": 32, "batch_size": 8}}}))
            (tmp_path / "study.yaml").write_text(yaml.safe_dump({
                "name": "s3-study", "base": "toy.yaml", "primary_metric": "val/loss",
                # One MLflow Model is enough to follow (each carries Practicum's code: hundreds of files).
                "variants": {"narrow": {}, "wide": {"model.init_args.hidden": 8, "log_model": True}}}))
            parent, table = run_study(tmp_path / "study.yaml", ["--system_metrics=false"], server.uri,
                                      system_metrics=False)
            assert list(table.runs["status"]) == ["FINISHED", "FINISHED"]

            # 3. Every artifact MLflow lists is an object in the bucket, and none landed on local disk.
            client = MlflowClient(server.uri)
            exp = client.get_run(parent).info.experiment_id
            kids = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent}'")
            keys = {o["Key"] for page in root.get_paginator("list_objects_v2").paginate(Bucket=BUCKET)
                    for o in page.get("Contents", [])}
            listed = {run_id: _all_artifacts(client, run_id) for run_id in [parent, *(k.info.run_id for k in kids)]}
            for run_id, paths in listed.items():
                assert {f"{exp}/{run_id}/artifacts/{p}" for p in paths} <= keys, run_id
            plots = [p for p in listed[parent] if p.startswith("plots/") and p.endswith(".png")]
            assert "comparison.csv" in listed[parent] and plots
            # MLflow 3 keeps a logged model apart from its run's artifacts: <experiment>/models/<model id>/artifacts/.
            models = {m.source_run_id: m for m in client.search_logged_models(experiment_ids=[exp])}
            wide = next(k for k in kids if k.data.tags["practicum.variant"] == "wide")
            assert set(models) == {wide.info.run_id}
            model_keys = {k for k in keys if k.startswith(f"{exp}/models/{models[wide.info.run_id].model_id}/artifacts/")}
            assert any(k.endswith("/MLmodel") for k in model_keys) and any(k.endswith(".ckpt") for k in model_keys)
            assert not [p for p in (tmp_path / "state" / "artifacts").rglob("*") if p.is_file()]

            # 4. They load back: the plot, the checkpoint, and the model, which predicts as the checkpoint does.
            for plot in plots:
                assert matplotlib.image.imread(client.download_artifacts(parent, plot, str(tmp_path / "dl"))).ndim == 3
            x, modules = torch.randn(3, 4), {}
            for kid in kids:
                paths = listed[kid.info.run_id]
                assert "config.yaml" in paths
                ckpt = "checkpoints/best.ckpt"  # the one the MLflow Model wraps
                assert ckpt in paths
                local = client.download_artifacts(kid.info.run_id, ckpt, str(tmp_path / "dl" / kid.info.run_id))
                assert read_checkpoint(local)["practicum"]["class_path"].endswith("ServedToy")
                module = ServedToy.load_from_checkpoint(local, map_location="cpu", weights_only=True).eval()
                assert module.hparams.hidden == int(kid.data.params["model.init_args.hidden"])
                modules[kid.info.run_id] = module
            mlflow.set_tracking_uri(server.uri)  # runs:/ URIs resolve in the fluent store, as a user's would
            served = mlflow.pyfunc.load_model(wide.data.tags["practicum.model_uri"]).predict(x.numpy())
            with torch.no_grad():
                assert torch.allclose(torch.as_tensor(served), modules[wide.info.run_id](x), atol=1e-6)
