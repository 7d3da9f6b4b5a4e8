"""Shared by the team-server tests: settings as .env holds them, and where PostgreSQL's copies go."""

from __future__ import annotations

import secrets
import shutil
import tempfile
from pathlib import Path

import pytest


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
