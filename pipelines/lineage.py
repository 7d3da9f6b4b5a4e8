"""The data a run used, as MLflow datasets: the runs table's Dataset column and its filters.

One dataset per split the run touched (training, validation, test), named after the datamodule and
its source, with a digest from the datamodule's own fingerprint of the exact examples served (the
``data.fingerprint`` parameter), its size and, for map-style data, the schema of one example.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sized
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback
from mlflow.entities import Dataset, DatasetInput, InputTag

from pipelines.tracking import redact

SOURCE_KEYS = ("path", "dataset", "name", "source", "backbone", "tokenizer")


class DataLineage(Callback):
    """Notes each split's dataset when its loop starts (Lightning drops the fit loaders after testing)."""

    def __init__(self):
        self.used: dict[str, Any] = {}

    def on_train_start(self, trainer, pl_module) -> None:
        self._note("training", trainer.train_dataloader)

    def on_validation_start(self, trainer, pl_module) -> None:
        self._note("validation", trainer.val_dataloaders)

    def on_test_start(self, trainer, pl_module) -> None:
        self._note("test", trainer.test_dataloaders)

    def _note(self, context: str, loader) -> None:
        loader = loader[0] if isinstance(loader, (list, tuple)) and loader else loader
        data = getattr(loader, "dataset", None)
        if data is not None:
            self.used.setdefault(context, data)


def log_datasets(client, run_id: str, dm, used: dict[str, Any], fingerprint: str | None = None) -> list[Dataset]:
    """Log the splits a run used (`DataLineage.used`) from `dm`, their digests derived from `fingerprint`
    (the datamodule's, as the run logged it); returns the datasets logged."""
    if dm is None or not used:
        return []
    name, source_type, source = describe(dm)
    inputs = []
    for context, data in used.items():
        digest = hashlib.sha256(f"{fingerprint or name}|{context}".encode()).hexdigest()[:16]
        profile = {"num_examples": len(data)} if isinstance(data, Sized) else {"num_examples": "stream"}
        ds = Dataset(name=name, digest=digest, source_type=source_type, source=source,
                     schema=_schema(data), profile=json.dumps(profile))
        inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", context)]))
    client.log_inputs(run_id, datasets=inputs)
    return [i.dataset for i in inputs]


def describe(dm) -> tuple[str, str, str]:
    """(name, source type, source) from the datamodule's class and its init arguments."""
    args = dict(getattr(dm, "hparams", {}) or {})
    cls = type(dm).__name__.removesuffix("DataModule").lower() or "data"
    what = next((str(args[k]) for k in SOURCE_KEYS if args.get(k)), None)
    name = f"{cls}:{Path(what).name if what and Path(what).exists() else what}" if what else cls
    if what and Path(what).exists():
        return name, "local", Path(what).resolve().as_uri()
    source = {"datamodule": f"{type(dm).__module__}.{type(dm).__qualname__}",
              **{k: v for k, v in args.items() if isinstance(v, (str, int, float, bool)) or v is None}}
    return name, "code", redact(json.dumps(source, default=str))


def _schema(data) -> str | None:
    """MLflow tensor specs of one example of a map-style dataset (an iterable stream is not touched)."""
    import numpy as np
    import torch

    if isinstance(data, torch.utils.data.IterableDataset) or not isinstance(data, Sized) or len(data) == 0:
        return None
    from mlflow.types.schema import Schema, TensorSpec

    example = data[0]
    items = example.items() if isinstance(example, dict) else (
        zip(("x", "y", "z"), example) if isinstance(example, (tuple, list)) else [("x", example)])
    specs = []
    for key, value in items:
        if isinstance(value, torch.Tensor):
            value = value.numpy()
        value = np.asarray(value)
        if value.dtype == object:
            continue
        specs.append(TensorSpec(value.dtype, (-1, *value.shape), str(key)))
    return json.dumps({"mlflow_tensorspec": Schema(specs).to_json()}) if specs else None
