"""docker-compose.yml read as compose reads it: ``.env``, ``${VAR}`` interpolation, the two services.

``.env`` is parsed by python-dotenv. Compose's interpolation (``${VAR:?error}``, ``${VAR:+alt}``
and the rest) has no maintained Python implementation outside docker-compose v1, so the few
rules are written here, each checked against the compose reference in tests/server.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping
from urllib.parse import urlsplit, urlunsplit

import yaml
from dotenv import dotenv_values

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
# Left empty in .env.example; `python -m server` generates and keeps them.
GENERATED_SECRETS = ("POSTGRES_PASSWORD", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY")

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


def read_dotenv(path: Path) -> dict[str, str]:
    """``KEY=value`` lines of ``path`` (python-dotenv: quotes, comments, ``export``); {} if it is absent."""
    if not Path(path).is_file():
        return {}
    return {k: v for k, v in dotenv_values(path).items() if v is not None}  # a bare `KEY` line sets nothing


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
    """Read and interpolate the two services that `server.tracking.TrackingServer` runs."""
    doc = yaml.safe_load(Path(compose_file).read_text())
    services = doc.get("services", {})
    for name in ("postgres", "mlflow"):
        if name not in services:
            raise ValueError(f"{compose_file} has no '{name}' service; python -m server runs postgres and mlflow")
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


# ---- from the container's view to loopback ------------------------------------------------------


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
