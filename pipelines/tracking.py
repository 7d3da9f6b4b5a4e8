"""MLflow tracking: where runs go and what every run records about its environment.

The default store is ``sqlite:///mlruns/mlflow.db`` with artifacts under ``mlruns/artifacts/``,
relative to the working directory. ``MLFLOW_TRACKING_URI`` or ``--tracking_uri`` points elsewhere
(a team server). Lightning's ``MLFlowLogger`` would default to ``file:./mlruns``, which MLflow
3.13+ refuses, so the pipeline always hands it an explicit URI.
"""

from __future__ import annotations

import os
import platform
import re
import subprocess
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import mlflow
from mlflow.entities import Param
from mlflow.tracking import MlflowClient

STORE_DIR = Path("mlruns")
TAG_PROJECT, TAG_STUDY, TAG_VARIANT, TAG_ROLE = (
    "practicum.project",
    "practicum.study",
    "practicum.variant",
    "practicum.role",
)
_VERSIONED = ("torch", "lightning", "mlflow", "transformers", "peft", "diffusers", "torchmetrics", "numpy")


class ConfigError(ValueError):
    """A config or override the schema rejects; the message names the key and the valid choices.

    Defined here, beside TrackingError, so commands that only read MLflow (compare, ui) can catch
    it without importing Lightning."""


class StageFailed(RuntimeError):
    """A stage of a study did not finish, so the study's variants cannot run."""


class TrackingError(RuntimeError):
    """The tracking store cannot be used (unwritable folder, unreachable server)."""


def resolve_tracking_uri(uri: str | None = None) -> str:
    """The URI to use: explicit argument, else ``MLFLOW_TRACKING_URI``, else the local SQLite store.

    The local store's folder is created on first use; an unwritable one is a ``TrackingError``
    that names the folder and how to point elsewhere.
    """
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{STORE_DIR / 'mlflow.db'}"
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        _ensure_writable(db.parent)
    elif uri.startswith("file:") or "://" not in uri:
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3.13+ refuses file stores without it
        _ensure_writable(Path(uri.removeprefix("file://").removeprefix("file:")))
    return uri


def _ensure_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise TrackingError(
            f"tracking folder '{folder}' is not writable ({e.strerror}). Fix its permissions, run from another "
            "folder, or point --tracking_uri / MLFLOW_TRACKING_URI at a writable store or a tracking server."
        ) from None


def local_dir(uri: str) -> Path:
    """Where a run's local files (checkpoints) live: beside a SQLite store, else ./mlruns."""
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :]).resolve().parent
    return STORE_DIR.resolve()


def checkpoint_dir(uri: str, run_id: str) -> Path:
    """Where a run writes its checkpoints before uploading them (and where a resume looks first)."""
    return local_dir(uri) / "checkpoints" / run_id


def default_artifact_location(uri: str) -> str | None:
    """Artifacts of the local SQLite store live beside it in ``<store>/artifacts``; servers decide their own."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "artifacts").resolve().as_uri()
    return None


def check_reachable(client: MlflowClient, uri: str, attempts: int = 3) -> None:
    """Fail before any training when the tracking store cannot be reached or refuses us.

    For a server it also bounds MLflow's own HTTP retries for the rest of the run (unless the user set
    them): during an outage a metric call must fail fast so training goes on; the pipeline's buffer
    retries it later.
    """
    remote = uri.startswith(("http://", "https://"))
    if remote:
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
    for attempt in range(attempts if remote else 1):
        try:
            client.search_experiments(max_results=1)
            return
        except Exception as e:  # MlflowException, requests errors: the message is what matters
            error = e
            if "401" in str(e) or "403" in str(e):
                break
            time.sleep(1.0 if attempt < attempts - 1 else 0)
    first = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    raise TrackingError(
        f"tracking store at '{redact(uri)}' is not usable: {redact(first)}. Start the server (make server, or docker compose up), "
        "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, or use --tracking_uri."
    ) from None


# MLflow 3 opens an experiment in its GenAI view unless told it holds model training.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def get_or_create_experiment(client: MlflowClient, name: str, uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        if "mlflow.experimentKind" not in exp.tags:  # made before Practicum tagged its experiments
            client.set_experiment_tag(exp.experiment_id, *next(iter(EXPERIMENT_KIND.items())))
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=default_artifact_location(uri), tags=EXPERIMENT_KIND)
    except mlflow.exceptions.MlflowException:  # created by a concurrent process meanwhile
        return client.get_experiment_by_name(name).experiment_id


def ui_base(uri: str, host: str = "127.0.0.1", port: int = 5000) -> str:
    """Where the UI of this store is: the server itself (credentials left out), or `practicum ui`'s address."""
    if uri.startswith(("http://", "https://")):
        parts = urlsplit(uri)
        return urlunsplit((parts.scheme, parts.hostname + (f":{parts.port}" if parts.port else ""), parts.path, "", ""))
    return f"http://{host}:{port}"


UI_LAND = "/practicum/land"  # `practicum ui`'s page that keeps the model-training view (pipelines.ui_app)


# The saved chart view a study writes (pipelines.chart_view): MLflow's UI loads the experiment tag
# SHARED_VIEW_TAG + key when the runs page's URL says ?viewStateShareKey=key.
CHART_VIEW, SHARED_VIEW_TAG = "practicum-charts", "mlflow.sharedViewState."


def runs_url(base: str, experiment_id: str, client: MlflowClient | None = None) -> str:
    """The experiment's runs table in the UI's model-training view (MLflow 3 reads ``workflowType``),
    with the study's chart view (training curves first) where `client` finds one for the experiment."""
    url = f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
    if client is not None and SHARED_VIEW_TAG + CHART_VIEW in client.get_experiment(experiment_id).tags:
        url += f"&viewStateShareKey={CHART_VIEW}"  # without the tag the UI would show an error and drop the view
    return url


def flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    """Nested config → ``{"model.init_args.lr": 0.001, ...}``."""
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


# scheme://NETLOC, NETLOC ending at the path, query, fragment, whitespace or a quote; then its userinfo
_URL_NETLOC = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<netloc>[^\s/?#'\"]*)")
# Query parameters that carry a secret: database drivers' password=, tokens, S3/Azure signatures.
_SECRET_QUERY = re.compile(
    r"(?P<key>[?&](?:password|passwd|pwd|secret|token|access_token|api_key|apikey|sig|signature"
    r"|x-amz-signature|x-amz-credential|x-amz-security-token)=)[^&\s'\"#]+",
    re.IGNORECASE,
)
REDACTED = "***"


def redact(value: Any) -> Any:
    """``value`` with the secrets of every URL in it masked: ``scheme://user:PASSWORD@host`` becomes
    ``scheme://user:***@host`` and ``?password=...``/``token``/signature query values become ``***``.

    Strings are searched anywhere (a URL inside a YAML dump or an error message); dicts, lists and
    tuples are walked. Everything the pipeline logs or writes into a checkpoint goes through it, so
    ``--tracking_uri=http://user:secret@host`` or a database URL in a config reaches no parameter,
    tag, artifact or checkpoint.
    """
    if isinstance(value, str):
        def netloc(m: re.Match) -> str:
            userinfo, at, host = m["netloc"].rpartition("@")  # the password may itself hold an unescaped '@'
            if not at or ":" not in userinfo:
                return m[0]
            return f"{m['scheme']}{userinfo.split(':', 1)[0]}:{REDACTED}@{host}"

        return _SECRET_QUERY.sub(rf"\g<key>{REDACTED}", _URL_NETLOC.sub(netloc, value))
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(redact(v) for v in value)
    return value


def log_params(client: MlflowClient, run_id: str, params: dict[str, Any]) -> None:
    items = [Param(k, redact(str(v))[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):  # MLflow caps a batch at 100 params
        client.log_batch(run_id, params=items[i : i + 100])


def environment_tags() -> dict[str, str]:
    """Git commit and dirty flag, library versions and hardware: what a reader needs to reproduce a run."""
    tags: dict[str, str] = {}
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if commit.returncode == 0:
            tags["mlflow.source.git.commit"] = commit.stdout.strip()
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True
            )
            tags["practicum.git_dirty"] = str(bool(dirty.stdout.strip())).lower()
    except (OSError, subprocess.TimeoutExpired):
        pass
    for pkg in _VERSIONED:
        try:
            tags[f"version.{pkg}"] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    tags.update(hardware_tags())
    return tags


def hardware_tags() -> dict[str, str]:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    tags = {"hw.cpu": cpu, "hw.cpu_count": str(os.cpu_count()), "hw.gpu_count": str(torch.cuda.device_count())}
    if torch.cuda.is_available():
        tags["hw.gpu"] = torch.cuda.get_device_name(0)
    return tags
