"""``python -m server`` (make server): the team tracking server on loopback until Ctrl-C or SIGTERM.

It prints the URI and the path of ``client.env`` (owner-only: the admin's credentials as
``export`` lines). Settings come from ``.env`` overridden by the shell, as compose reads them;
secrets left empty are generated once and kept in the state folder.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shlex
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

from server.compose import COMPOSE_FILE, GENERATED_SECRETS, REPO, read_dotenv
from server.process import LOOPBACK
from server.tracking import TrackingServer


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
    p = argparse.ArgumentParser(prog="python -m server", description=__doc__.split("\n\n")[0].replace("``", ""))
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
