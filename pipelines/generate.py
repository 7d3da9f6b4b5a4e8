"""Load any trained model for sampling, from a checkpoint, an exported folder or an MLflow run.

No project is named here: a checkpoint records its LightningModule class (``checkpoint["practicum"]``),
an exported folder names its loader in ``practicum.json``; both give a `contract.TextGenerator`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from contract import TextGenerator
from pipelines import tracking as trk
from pipelines.checkpoint import fetch_run_file, locate, read_checkpoint
from pipelines.tracking import ConfigError

RUN_ID = re.compile(r"^(?:runs:/)?([0-9a-f]{32})$")


def load_generator(source: str, tracking_uri: str | None = None):
    """A `contract.TextGenerator` from a .ckpt, an exported folder, or a run id (``runs:/ID`` too)."""
    p = Path(source)
    if p.is_dir():
        meta = p / "practicum.json"
        if not meta.is_file():
            raise FileNotFoundError(f"{p} is a folder without practicum.json: export it with Practicum, or pass a .ckpt")
        return locate(json.loads(meta.read_text())["loader"])(p)
    if p.suffix == ".ckpt" or p.exists():
        if not p.is_file():
            raise FileNotFoundError(f"checkpoint {p} does not exist")
        return load_checkpoint(p)
    if not (m := RUN_ID.match(source)):
        raise FileNotFoundError(f"'{source}' is neither a file, a folder nor an MLflow run id")
    return load_checkpoint(fetch_run_file(m.group(1), trk.resolve_tracking_uri(tracking_uri)))


def load_checkpoint(path: str | Path):
    """Rebuild the LightningModule recorded in a Practicum checkpoint; a damaged file is a clear error."""
    info = read_checkpoint(path).get("practicum")
    if not info:
        raise ConfigError(f"{path} is not a Practicum checkpoint (no 'practicum' entry naming its module class)")
    cls = locate(info["class_path"])
    model = cls.load_from_checkpoint(path, map_location="cpu", weights_only=True)
    model.eval()
    if not isinstance(model, TextGenerator):
        raise ConfigError(f"{info['class_path']} cannot generate text (it is no contract.TextGenerator: "
                          "it has no generate_text method)")
    return model

