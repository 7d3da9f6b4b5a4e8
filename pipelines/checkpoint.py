"""The pipeline's checkpoint: what it records, where it is fetched from, and how it is read.

A Practicum checkpoint is Lightning's own dict plus two entries written by `CheckpointInfo`
(which also masks URL passwords in them and in the saved hyperparameters, `tracking.redact`):
``practicum`` (the LightningModule and DataModule class paths and the run it came from, so the
file alone can be rebuilt for sampling) and ``practicum_rng`` (the global random states, so a
resumed run draws the numbers an uninterrupted one would). Both hold plain types and tensors only.

Every read goes through `read_checkpoint` (``torch.load(weights_only=True)``): files come from a
shared tracking server where any teammate can create runs, and unpickling one must never run
code. Files come from MLflow through `fetch_run_file` alone: for ``--resume``, ``practicum
generate RUN_ID`` and ``runs:/RUN_ID`` inputs of a config.
"""

from __future__ import annotations

import json
import pydoc
import random
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Callback
from mlflow.tracking import MlflowClient

from pipelines import tracking as trk
from pipelines.tracking import ConfigError

RUN_REF = re.compile(r"^runs:/([0-9a-f]{32})(?:/(.+))?$")
PREFERRED = ("checkpoints/best.ckpt", "checkpoints/last.ckpt")


class CheckpointInfo(Callback):
    """Writes the ``practicum`` and ``practicum_rng`` entries into every checkpoint, and puts the
    random states back when a run resumes from one."""

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["practicum"] = trk.redact(dict(self.info))
        # The module's and datamodule's init arguments (save_hyperparameters) are config values too:
        # a URL password among them must not travel with the file.
        for key in ("hyper_parameters", "datamodule_hyper_parameters"):
            if isinstance(checkpoint.get(key), dict):
                checkpoint[key] = trk.redact(checkpoint[key])
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["practicum_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        if rng := checkpoint.get("practicum_rng"):
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])


def read_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents, memory-mapped and loaded without running code.

    A truncated file, or one whose pickle asks for anything but tensors and plain types (a crafted
    payload), is a `ConfigError` naming the file.
    """
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:
        msg = str(e).strip().splitlines()
        why = msg[0] if msg else type(e).__name__
        if "weights_only" in str(e) or "Unsupported global" in str(e):
            raise ConfigError(f"checkpoint {path} holds objects other than tensors and plain types ({why}); it was "
                              "refused because loading it could run code. Load only checkpoints you trust.") from None
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {why}); use an earlier "
                          "checkpoint of the run (last.ckpt / best.ckpt) or start a new run") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} holds no Lightning state_dict")
    return ckpt


def locate(path: str) -> Any:
    """The class or function at a dotted import path; a path that names none is a `ConfigError`."""
    obj = pydoc.locate(path)
    if not callable(obj):
        raise ConfigError(f"'{path}' is not an importable class or function path")
    return obj


# ---- files of earlier runs ---------------------------------------------------------------------


def fetch_run_file(run_id: str, uri: str, candidates: tuple[str, ...] = PREFERRED) -> Path:
    """The first of `candidates` (artifact paths) that run `run_id` holds, as a local path.

    Checkpoints written beside a local store are used in place; anything else is downloaded once
    into ``<store>/inputs/<run_id>/``.
    """
    client = MlflowClient(uri)
    try:
        client.get_run(run_id)
    except Exception:
        raise ConfigError(f"no run {run_id} in {uri}; check the id, or --tracking_uri / MLFLOW_TRACKING_URI") from None
    for want in candidates:
        local = trk.checkpoint_dir(uri, run_id) / want.removeprefix("checkpoints/")
        if want.startswith("checkpoints/") and local.exists():
            return local
    listed = {a.path for d in {str(Path(c).parent) for c in candidates} for a in _list(client, run_id, d)}
    for want in candidates:
        if want in listed:
            dst = trk.local_dir(uri) / "inputs" / run_id
            target = dst / want
            if not target.exists():
                import mlflow

                dst.mkdir(parents=True, exist_ok=True)
                return Path(mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=want, dst_path=str(dst),
                                                                tracking_uri=uri))
            return target
    raise ConfigError(f"run {run_id} has none of {', '.join(candidates)} (neither in {trk.checkpoint_dir(uri, run_id)} "
                      "nor among its artifacts)")


def _list(client: MlflowClient, run_id: str, folder: str) -> list:
    try:
        return client.list_artifacts(run_id, None if folder in ("", ".") else folder)
    except Exception:
        return []


def resolve_run_inputs(config, uri: str) -> dict[str, str]:
    """Replace every ``runs:/RUN_ID[/artifact]`` value under ``model`` and ``data`` by a local file.

    A config names an earlier run as its input this way (a fine-tune names the run that pretrained
    its base): the file comes from that run in this run's tracking store. Without an artifact path
    the run's best (else last) checkpoint is taken. Returns {config key: run reference} for the
    run's tags.
    """
    found: dict[str, str] = {}
    for key, value in list(config.items()):
        if key.startswith(("model.", "data.")) and isinstance(value, str) and (m := RUN_REF.match(value)):
            config[key] = str(fetch_run_file(m.group(1), uri, (m.group(2),) if m.group(2) else PREFERRED))
            found[key] = value
    return found


def inputs_tag(found: dict[str, str]) -> dict[str, str]:
    return {"practicum.inputs": json.dumps(found)} if found else {}


def find_resume_point(resume: str, uri: str, config_path: str | None) -> tuple[str, str]:
    """(run id, checkpoint path) to continue: a run id, or 'last' = the latest unfinished run of this config."""
    client = MlflowClient(uri)
    if resume == "last":
        if not config_path:
            raise ConfigError("--resume last needs the config file the run was started with")
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            exp_ids, f"tags.`practicum.config` = '{Path(config_path).resolve()}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1) if exp_ids else []
        if not runs:
            raise ConfigError(f"--resume last: no unfinished run of {config_path} in {uri}")
        run_id = runs[0].info.run_id
    else:
        run_id = resume
    sharded = trk.checkpoint_dir(uri, run_id) / "last.ckpt"
    if sharded.is_dir():  # a sharded (FSDP) checkpoint: Lightning's strategy reads the folder itself
        if not any(sharded.iterdir()):
            raise ConfigError(f"--resume {resume}: the sharded checkpoint {sharded} is empty")
        return run_id, str(sharded)
    try:
        local = fetch_run_file(run_id, uri, ("checkpoints/last.ckpt",))
    except ConfigError as e:
        raise ConfigError(f"--resume {resume}: {e}") from None
    read_checkpoint(local)
    return run_id, str(local)
