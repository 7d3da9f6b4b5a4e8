"""PostgreSQL and ``mlflow server`` as docker-compose.yml describes them, on loopback, without containers.

Only what belongs to containers is swapped: the bind host (always ``127.0.0.1``) and port, a
container path as artifact destination (an ``s3://`` one stays), and the ``postgres`` hostname
inside URIs. The basic-auth ini is rendered from ``docker/mlflow/basic_auth.ini`` exactly as the
image's entrypoint renders it. So the two ways of starting the server cannot drift.
"""

from __future__ import annotations

import os
import re
import string
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Mapping
from urllib.parse import urlsplit

from server.compose import COMPOSE_FILE, REPO, get_option, load_stack, localize, set_option
from server.postgres import PostgresCluster
from pipelines.supervise import start_group, stop_tree
from server.process import LOOPBACK, free_port, tail

AUTH_TEMPLATE = REPO / "docker" / "mlflow" / "basic_auth.ini"
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


class TrackingServer:
    """PostgreSQL and the MLflow tracking server (basic auth, proxied artifacts) on 127.0.0.1.

    All state lives in ``state_dir``: ``postgres/`` (the cluster; as root, where the postgres user
    cannot reach it, a link to it: `server.postgres`), ``artifacts/`` (unless the compose file's
    destination is an object store), ``auth/`` (the rendered basic-auth ini) and ``mlflow.log``.
    Stopping and starting again on the same folder keeps every run, user and artifact, and the port.

    Args:
        state_dir: folder for the cluster, artifacts and logs; created if missing.
        env: values for the compose file's ``${VAR}``s (what ``.env`` holds); nothing else is read.
        port: port of the MLflow server; ``None`` picks a free one.
        compose_file: the compose file to follow.
        startup_timeout: seconds to wait for ``/health`` before giving up.
    """

    def __init__(
        self,
        state_dir: str | os.PathLike,
        env: Mapping[str, str],
        port: int | None = None,
        compose_file: str | os.PathLike = COMPOSE_FILE,
        startup_timeout: float = 180.0,
    ):
        self.state_dir = Path(state_dir).absolute()
        self.stack = load_stack(env, Path(compose_file))
        pg = self.stack.postgres_env
        self.db_user = pg.get("POSTGRES_USER") or "postgres"
        self.db_password = pg.get("POSTGRES_PASSWORD", "")
        self.db_name = pg.get("POSTGRES_DB") or self.db_user
        for key, val in (("POSTGRES_USER", self.db_user), ("POSTGRES_PASSWORD", self.db_password),
                         ("POSTGRES_DB", self.db_name)):
            if not _URL_SAFE.fullmatch(val):
                raise ValueError(f"{key}='{val}' must be non-empty letters, digits and - . _ ~ only: "
                                 "it is written into a database URI. Change it in .env.")
        self.admin_username = self.stack.mlflow_env.get("MLFLOW_AUTH_ADMIN_USERNAME", "")
        self.admin_password = self.stack.mlflow_env.get("MLFLOW_AUTH_ADMIN_PASSWORD", "")
        if not self.admin_username or len(self.admin_password) < 12:
            raise ValueError("MLFLOW_ADMIN_USERNAME must be set and MLFLOW_ADMIN_PASSWORD must have at least 12 "
                             "characters (MLflow's rule for the admin it creates). Change them in .env.")
        if port is not None and not 0 < port < 65536:
            raise ValueError(f"port must be in 1..65535, got {port}")
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.postgres: PostgresCluster | None = None
        self._proc: subprocess.Popen | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def uri(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    @property
    def remote_artifacts(self) -> bool:
        """Whether the artifact destination is an object store (``s3://...``): kept as the compose file says."""
        return urlsplit(get_option(self.stack.mlflow_args, "--artifacts-destination") or "").scheme not in ("", "file")

    def client_env(self) -> dict[str, str]:
        """What a client (``practicum run``) needs: URI and the admin's credentials."""
        return {"MLFLOW_TRACKING_URI": self.uri, "MLFLOW_TRACKING_USERNAME": self.admin_username,
                "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    def mlflow_command(self, db_port: int) -> tuple[list[str], dict[str, str]]:
        """``mlflow server`` argv and the environment it adds, from the compose ``mlflow`` service."""
        hosts = {"postgres": (LOOPBACK, db_port)}
        args = [localize(a, hosts) for a in self.stack.mlflow_args]
        args = set_option(args, "--host", LOOPBACK)  # loopback only, whatever the container binds
        args = set_option(args, "--port", str(self.port))
        if not self.remote_artifacts:  # a container path (/mlartifacts): the state folder's artifacts/
            args = set_option(args, "--artifacts-destination", str(self.state_dir / "artifacts"))
        env = {k: localize(v, hosts) for k, v in self.stack.mlflow_env.items()}
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(self.state_dir / "auth" / "basic_auth.ini")
        # Any local user reads a process's command line (/proc/PID/cmdline, ps); only its owner reads
        # its environment. Secrets (the database URI holds the password) go through the environment.
        for secret in (self.db_password, self.admin_password, env.get("MLFLOW_FLASK_SERVER_SECRET_KEY", "")):
            if len(secret) >= 8 and any(secret in a for a in args):  # shorter ones could match by chance
                raise ValueError(f"{COMPOSE_FILE.name} puts a secret on the command line of mlflow server, where "
                                 "every local user can read it; pass it in the service's environment instead "
                                 "(e.g. MLFLOW_BACKEND_STORE_URI for --backend-store-uri)")
        mlflow = Path(sys.executable).with_name("mlflow")
        exe = [str(mlflow)] if mlflow.is_file() else [sys.executable, "-m", "mlflow"]
        return [*exe, "server", *args], env

    def start(self) -> "TrackingServer":
        if self._proc is not None:
            raise RuntimeError("the tracking server is already running")
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:  # where the folders above let it, the postgres user keeps the cluster in place
            self.state_dir.chmod(self.state_dir.stat().st_mode | 0o001)
        (self.state_dir / "artifacts").mkdir(exist_ok=True)
        self.postgres = PostgresCluster(self.state_dir / "postgres", free_port(), self.stack.postgres_major,
                                        self.stack.postgres_options)
        try:
            self.postgres.init()
            self.postgres.start()
            self.postgres.ensure_database(self.db_user, self.db_password, self.db_name)
            argv, extra_env = self.mlflow_command(self.postgres.port)
            self._write_auth_config(extra_env)
            # The developer's own MLFLOW_* settings (a tracking URI, a backend store) must not leak in.
            env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
            env.update(extra_env)
            # Its own process group, so stop() ends the uvicorn workers with it.
            self._proc = start_group(argv, env, self.state_dir, self.state_dir / "mlflow.log")
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def _write_auth_config(self, env: Mapping[str, str]) -> None:
        # Same rendering as docker/mlflow/entrypoint.sh: string.Template over the service environment.
        path = Path(env["MLFLOW_AUTH_CONFIG_PATH"])
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        text = string.Template(AUTH_TEMPLATE.read_text()).substitute({**os.environ, **env})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it holds the database password
        with os.fdopen(fd, "w") as f:
            f.write(text)

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited with {self._proc.returncode}; "
                                   f"{self.state_dir / 'mlflow.log'}:\n{tail(self.state_dir / 'mlflow.log')}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"mlflow server not healthy after {self.startup_timeout:.0f}s; "
                           f"{self.state_dir / 'mlflow.log'}:\n{tail(self.state_dir / 'mlflow.log')}")

    def stop(self) -> None:
        """Stop MLflow (its whole process group), then PostgreSQL; the state folder stays."""
        if self._proc is not None:
            stop_tree(self._proc)
            self._proc = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    def __enter__(self) -> "TrackingServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


