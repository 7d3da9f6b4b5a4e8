"""Load any trained model for sampling, from a checkpoint, an exported folder or an MLflow run.

No project is named here: a checkpoint records its LightningModule class (``checkpoint["practicum"]``),
an exported folder names its loader in ``practicum.json``; both give an object with ``generate_text``.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

from pipelines.run import ConfigError, check_checkpoint


def _import(path: str):
    mod, _, name = path.rpartition(".")
    return getattr(importlib.import_module(mod), name)


def load_generator(source: str, tracking_uri: str | None = None):
    p = Path(source)
    if p.is_dir():
        meta = p / "practicum.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{p} is a folder without practicum.json: export it with Practicum, or pass a .ckpt")
        return _import(json.loads(meta.read_text())["loader"])(p)
    if p.suffix == ".ckpt" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        return load_checkpoint(p)
    return load_checkpoint(download_checkpoint(source, tracking_uri))


def load_checkpoint(path: str | Path):
    """Rebuild the LightningModule recorded in a Practicum checkpoint; a damaged file is a clear error."""
    info = check_checkpoint(path).get("practicum")
    if not info:
        raise ConfigError(f"{path} is not a Practicum checkpoint (no 'practicum' entry naming its module class)")
    cls = _import(info["class_path"])
    model = cls.load_from_checkpoint(path, map_location="cpu")
    model.eval()
    if not hasattr(model, "generate_text"):
        raise ConfigError(f"{info['class_path']} cannot generate text (it has no generate_text method)")
    return model


def download_checkpoint(run_id: str, tracking_uri: str | None = None) -> Path:
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipelines.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(tracking_uri)
    client = MlflowClient(uri)
    try:
        names = [a.path for a in client.list_artifacts(run_id, "checkpoints")]
    except Exception as e:
        raise FileNotFoundError(f"'{run_id}' is neither a file nor a run in {uri} ({e})") from None
    for want in ("checkpoints/best.ckpt", "checkpoints/last.ckpt"):
        if want in names:
            return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=want, tracking_uri=uri))
    raise FileNotFoundError(f"run {run_id} has no checkpoints/best.ckpt or last.ckpt artifact")
