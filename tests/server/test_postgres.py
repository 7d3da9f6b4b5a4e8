"""PostgreSQL from a checkout in a private folder: as root (the default user of most containers) it runs as
the postgres user, who cannot pass through a 0700 folder (``mktemp -d``, /root) to the wheel in .venv."""

from __future__ import annotations

import os
import shutil

import psycopg2
import pytest

from server import postgres
from server.process import LOOPBACK, free_port

ROOT = os.geteuid() == 0


@pytest.fixture
def private_checkout(tmp_path, monkeypatch):
    """A clone's layout inside a 0700 folder: the PostgreSQL wheel's install in its .venv, the state folder beside."""
    wheel = postgres.wheel_bindir()
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    site = private / "p" / ".venv" / "site-packages"
    install = site / wheel.parent.parent.name / "pginstall"
    for part in ("bin", "lib", "share"):
        shutil.copytree(wheel.parent / part, install / part, symlinks=True)
    libs = wheel.parent.parent.with_name(wheel.parent.parent.name + ".libs")  # the wheel's rpath target
    if libs.is_dir():
        shutil.copytree(libs, site / libs.name, symlinks=True)
    monkeypatch.setenv("PRACTICUM_PG_BINDIR", str(install / "bin"))
    return private / "p"


def _login(pg, password):
    psycopg2.connect(host=LOOPBACK, port=pg.port, user="probe", password=password, dbname="probe").close()


def test_a_checkout_in_a_0700_folder_serves_and_keeps_its_cluster(private_checkout, pg_home):
    venv_bin = private_checkout / ".venv" / "site-packages" / "pgserver" / "pginstall" / "bin"
    state = private_checkout / "mlruns" / "server" / "postgres"
    pg = postgres.PostgresCluster(state, free_port(), 15)
    try:
        pg.init()
        pg.start()
        pg.ensure_database("probe", "probe-password-1", "probe")
        _login(pg, "probe-password-1")
    finally:
        pg.stop()
    if ROOT:  # the binaries and the cluster moved where the postgres user can reach them
        copy = pg.bindir.parents[2]
        assert copy.parent == pg_home and copy.name.startswith("postgresql-16.") and (pg.bindir.parent / "share").is_dir()
        assert pg.root.parent == pg_home / "clusters" and state.is_symlink() and state.resolve() == pg.root
        assert postgres.can_enter("postgres", pg.root) and not postgres.can_enter("postgres", venv_bin / "initdb")
    else:  # the current user runs PostgreSQL itself: nothing to move
        assert pg.bindir == venv_bin and pg.root == state
    again = postgres.PostgresCluster(state, free_port(), 15)  # the next start: the same binaries and data
    assert (again.bindir, again.root) == (pg.bindir, pg.root)
    try:
        again.init()
        again.start()
        _login(again, "probe-password-1")  # the role made by the first start: the same cluster
    finally:
        again.stop()


@pytest.mark.skipif(not ROOT, reason="only root runs PostgreSQL as another user (the postgres user)")
def test_where_the_postgres_user_cannot_run_it_the_error_comes_before_anything_starts(private_checkout, monkeypatch):
    inside = private_checkout / "pg-home"  # a home for the copies that is itself behind the 0700 folder
    inside.mkdir(mode=0o755)
    monkeypatch.setenv("PRACTICUM_PG_HOME", str(inside))
    with pytest.raises(RuntimeError, match="cannot run .*initdb.*set PRACTICUM_PG_HOME"):
        postgres.PostgresCluster(private_checkout / "state" / "postgres", free_port(), 15)
    assert not (private_checkout / "state").exists()  # nothing made, nothing started
    inside.chmod(0o777)  # another user could plant binaries that root then runs
    with pytest.raises(RuntimeError, match="owned by root and writable by root only"):
        postgres.shared_home()
