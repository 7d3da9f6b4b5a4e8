"""A run's config: LightningCLI parses it against the project's typed signatures and builds the
model and data; errors name the key, the valid choices and a likely fix.

Parsing and building are two steps, so the pipeline can fetch a config's ``runs:/`` inputs from
the right tracking store in between (`pipelines.run.run_experiment`).
"""

from __future__ import annotations

import os
import difflib
import json
import importlib.util
import inspect
import re
from typing import Any, Optional, Sequence

import torch
from lightning import LightningDataModule, LightningModule, Trainer
from lightning.pytorch.cli import LightningCLI

from pipelines.checkpoint import locate
from pipelines.tracking import ConfigError

class PracticumCLI(LightningCLI):
    """LightningCLI that parses (in the constructor) and builds model and data (in `build`), no trainer."""

    def __init__(self, args: Sequence[str]):
        super().__init__(
            LightningModule,
            LightningDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            save_config_callback=None,
            seed_everything_default=1337,
            args=list(args),
            run=False,
            auto_configure_optimizers=False,
            parser_kwargs={"exit_on_error": False, "prog": "practicum run"},
        )

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--tracking_uri", type=Optional[str], default=None,
                            help="MLflow store or server; default $MLFLOW_TRACKING_URI, else sqlite:///mlruns/mlflow.db")
        parser.add_argument("--experiment", type=Optional[str], default=None,
                            help="MLflow experiment; default: the project's name")
        parser.add_argument("--run_name", type=Optional[str], default=None)
        parser.add_argument("--log_checkpoint", type=bool, default=True, help="upload checkpoints to the run")
        parser.add_argument("--system_metrics", type=bool, default=True, help="MLflow CPU/RAM/GPU sampling")
        parser.add_argument("--log_model", type=bool, default=os.environ.get("PRACTICUM_LOG_MODEL", "1") != "0",
                            help="also log the best checkpoint as an MLflow Model (pyfunc); "
                                 "default on, off with $PRACTICUM_LOG_MODEL=0")
        parser.add_argument("--register", type=Optional[str], default=None,
                            help="register the logged model under this name in the MLflow Model Registry")
        parser.add_argument("--checkpoint_monitor", type=Optional[str], default="val/loss")
        parser.add_argument("--checkpoint_mode", type=str, default="min")
        parser.add_argument("--checkpoint_every_n_steps", type=Optional[int], default=None,
                            help="also save last.ckpt every N training steps (default: at each validation)")
        parser.add_argument("--checkpoint_every_n_minutes", type=Optional[float], default=10.0,
                            help="also save last.ckpt when N minutes passed since the last save (null: off)")
        parser.add_argument("--resume", type=Optional[str], default=None,
                            help="RUN_ID, or 'last' for the latest unfinished run of this config: continue that run")

    def parse_arguments(self, parser, args) -> None:
        try:
            self.config = parser.parse_args(args)
        except SystemExit:
            raise
        except Exception as e:
            raise ConfigError(explain_config_error(e, parser)) from None

    def instantiate_classes(self) -> None:
        self.model = self.datamodule = self.trainer = None  # `build` does it, once the inputs are local

    def build(self) -> tuple[LightningModule, LightningDataModule | None]:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except Exception as e:
            raise ConfigError(explain_config_error(e, self.parser)) from None
        self.model, self.datamodule = self.config_init["model"], self.config_init.get("data")
        return self.model, self.datamodule

    def dump(self) -> str:
        return self.parser.dump(self.config, skip_none=False)


def to_cli_args(overrides: dict[str, Any]) -> list[str]:
    """Dotted overrides as command-line arguments, so a study variant or a tuning trial is parsed and
    checked exactly like the same overrides typed after `practicum run`."""
    return [f"--{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]


def project_of(class_path: str) -> str:
    parts = class_path.split(".")
    return parts[1] if parts[0] == "modules" and len(parts) > 2 else parts[0]


def check_strategy(trainer_cfg) -> None:
    """Strategies that cannot run here fail before a run opens, with the fix in the message."""
    strategy = trainer_cfg.get("strategy")
    shown = strategy if isinstance(strategy, str) else getattr(strategy, "class_path", "") or ""
    name = shown.lower()
    accel = str(trainer_cfg.get("accelerator") or "auto").lower()
    cuda = torch.cuda.is_available() and accel in ("auto", "gpu", "cuda")
    if "deepspeed" in name:
        if importlib.util.find_spec("deepspeed") is None:
            raise ConfigError(f"trainer.strategy={shown} needs DeepSpeed, an optional extra: "
                              "pip install -e '.[deepspeed]' (CUDA only)")
        if not cuda:
            raise ConfigError(f"trainer.strategy={shown} runs on CUDA GPUs only; use trainer.strategy=ddp on CPU")
    if "fsdp" in name and not cuda:
        raise ConfigError(f"trainer.strategy={shown}: Lightning's FSDP needs CUDA GPUs (this machine: "
                          f"accelerator={accel}, CUDA {'available' if torch.cuda.is_available() else 'absent'}); "
                          "use trainer.strategy=ddp on CPU")
    if accel in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ConfigError(f"trainer.accelerator={accel}, but this machine has no CUDA GPU; "
                          "use --trainer.accelerator=cpu (or auto), and a CPU preset where the project has one")


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Expected a <class 'NoneType'>",
          "Given value type:", "Given value:", "Errors:")


def explain_config_error(e: BaseException, parser) -> str:
    """Turn a jsonargparse error into one that names the key, the valid choices (read from
    `parser`) and a likely fix."""
    msg = str(e)
    lines = [ln.strip(" -") for ln in msg.splitlines() if ln.strip() and not any(n in ln for n in _NOISE)]
    text = "\n".join(lines)
    hints: list[str] = []
    for bad in re.findall(r"Option '([^']+)' is not accepted", text):
        cls_path = re.search(r"given class_path '([^']+)'", text)
        choices = _init_params(cls_path.group(1)) if cls_path else []
        hints.append(_suggest(bad, choices, f"init_args of {cls_path.group(1) if cls_path else 'the class'}"))
    for bad in re.findall(r"unrecognized arguments: (.+)", text):
        for arg in bad.split():
            key = arg.lstrip("-").split("=")[0]
            hints.append(_suggest(key, _known_keys(key, parser), "keys"))
    return "invalid configuration: " + text + ("\n" + "\n".join(h for h in hints if h) if hints else "")


def _init_params(class_path: str) -> list[str]:
    try:
        cls = locate(class_path)
    except ConfigError:
        return []
    return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]


def _known_keys(key: str, parser) -> list[str]:
    section = key.split(".")[0]
    if section == "trainer":
        return ["trainer." + p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    # the parser's own top-level options, in declaration order (trainer.*, model.* ... by section)
    return list(dict.fromkeys(a.dest.split(".")[0] for a in parser._actions if a.dest != "help"))


def _suggest(bad: str, choices: list[str], what: str) -> str:
    if not choices:
        return ""
    close = difflib.get_close_matches(bad.split(".")[-1] if what != "keys" else bad, choices, n=3, cutoff=0.6)
    hint = f"unknown key '{bad}'" + (f"; did you mean {', '.join(close)}?" if close else "")
    return f"{hint}\nvalid {what}: {', '.join(choices)}"


