"""One experiment: parse a config, open an MLflow run, fit, test, close the run with the right status.

Every project takes this path. The typed signatures of a project's LightningModule and
LightningDataModule are the schema (LightningCLI/jsonargparse, ``class_path``/``init_args``); this
module adds what every run needs and no project has to know about: the MLflow run, the resource
callback, checkpoints and their upload, the status (FINISHED, FAILED, KILLED).
"""

from __future__ import annotations

import difflib
import inspect
import re
import sys
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from lightning import Callback, LightningDataModule, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.cli import LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities.model_helpers import is_overridden

from pipelines import tracking as trk
from pipelines.resources import ResourceMonitor

# OnExceptionCheckpoint makes a fresh fit look for a "last" checkpoint; in a new run there is none by design.
warnings.filterwarnings("ignore", message=r".*(called without a model|there is no last checkpoint).*")
HEADLINE = re.compile(r"^(train|val|test)/|^perf/(tokens|samples)_per_s$|^time/fit_s$|^params/total$")


class ConfigError(ValueError):
    """A config or override the schema rejects; the message names the key and the valid choices."""


@dataclass
class RunResult:
    run_id: str | None
    status: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    checkpoint: str | None = None

    def headline(self) -> dict[str, float]:
        return {k: v for k, v in sorted(self.metrics.items()) if HEADLINE.search(k)}


class PracticumLogger(MLFlowLogger):
    """MLFlowLogger on a run the pipeline opened; hyperparameters are logged once, as the resolved config."""

    def log_hyperparams(self, params: Any) -> None:
        pass


class CheckpointInfo(Callback):
    """Records in each checkpoint which classes to rebuild it with, so a checkpoint alone can be sampled from."""

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        checkpoint["practicum"] = dict(self.info)


class BestCheckpoint(ModelCheckpoint):
    """Best by ``monitor`` when the module logs it, else simply the latest: no project has to declare one."""

    def on_validation_end(self, trainer, pl_module) -> None:
        if self.monitor and self.monitor not in trainer.callback_metrics:
            self.monitor = None
        super().on_validation_end(trainer, pl_module)


class Session:
    """The MLflow run of one experiment: opened before training, closed with its status at the end."""

    def __init__(
        self,
        uri: str,
        experiment: str,
        run_name: str | None,
        tags: dict[str, str],
        system_metrics: bool,
        log_checkpoint: bool,
    ):
        self.uri = trk.resolve_tracking_uri(uri)
        self.client = trk.MlflowClient(self.uri)
        trk.check_reachable(self.client, self.uri)
        self.experiment_id = trk.get_or_create_experiment(self.client, experiment, self.uri)
        tags = {**trk.environment_tags(), **tags}
        if run_name:
            tags["mlflow.runName"] = run_name
        self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name).info.run_id
        self.log_checkpoint = log_checkpoint
        self.ckpt_dir = trk.STORE_DIR.resolve() / "checkpoints" / self.run_id
        self.logger = PracticumLogger(tracking_uri=self.uri, run_id=self.run_id)
        self._monitor = None
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=self.uri)
                self._monitor.start()
            except Exception as e:  # missing psutil/pynvml parts must not stop training
                print(f"warning: system metrics off ({e})", file=sys.stderr)

    def end(self, status: str, trainer: Trainer | None = None, error: BaseException | None = None) -> None:
        if self._monitor is not None:
            self._monitor.finish()
        if error is not None:
            tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
            self.client.log_text(self.run_id, tb, "error.txt")
            self.client.set_tag(self.run_id, "practicum.error", _one_line(error))
        if self.log_checkpoint and self.ckpt_dir.is_dir():
            for ckpt in sorted(self.ckpt_dir.glob("*.ckpt")):
                self.client.log_artifact(self.run_id, str(ckpt), "checkpoints")
        self.client.set_terminated(self.run_id, status)


class PracticumCLI(LightningCLI):
    """LightningCLI that opens an MLflow run between instantiating the project and the trainer."""

    def __init__(self, args: Sequence[str], context: dict[str, Any]):
        self.context = context
        self.session: Session | None = None
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
        parser.add_argument("--checkpoint_monitor", type=Optional[str], default="val/loss")
        parser.add_argument("--checkpoint_mode", type=str, default="min")

    def parse_arguments(self, parser, args) -> None:
        try:
            self.config = parser.parse_args(args)
        except SystemExit:
            raise
        except Exception as e:
            raise ConfigError(explain_config_error(e, args)) from None

    def instantiate_classes(self) -> None:
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except Exception as e:
            raise ConfigError(explain_config_error(e, [])) from None
        self.datamodule = self.config_init.get("data")
        self.model = self.config_init["model"]
        if self.context.get("dry_run"):  # parse and build the project only: no run, no trainer
            return
        cfg = self.config
        model_path = cfg.model.class_path
        project = _project_of(model_path)
        tags = {
            trk.TAG_PROJECT: project,
            "practicum.model": model_path,
            "practicum.data": cfg.data.class_path if cfg.get("data") else "",
            "practicum.seed": str(cfg.seed_everything),
            **self.context.get("tags", {}),
        }
        if self.context.get("config_path"):
            tags["practicum.config"] = str(self.context["config_path"])
        if self.context.get("parent_run_id"):
            tags["mlflow.parentRunId"] = self.context["parent_run_id"]
        uri = self.context.get("tracking_uri") or cfg.tracking_uri
        self.session = Session(
            uri,
            cfg.experiment or self.context.get("experiment") or project,
            cfg.run_name or self.context.get("run_name"),
            tags,
            cfg.system_metrics and self.context.get("system_metrics", True),
            cfg.log_checkpoint,
        )
        try:
            dump = self.parser.dump(cfg, skip_none=False)
            s = self.session
            s.client.log_text(s.run_id, dump, "config.yaml")
            params = trk.flatten(yaml.safe_load(dump))
            params["seed"] = cfg.seed_everything
            trk.log_params(s.client, s.run_id, params)
            self.trainer = self.instantiate_trainer()
        except BaseException as e:
            self.session.end("FAILED", error=e)
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        s = self.session
        cfg = self.config
        config["logger"] = s.logger
        config.setdefault("default_root_dir", str(trk.STORE_DIR.resolve()))
        info = {"class_path": cfg.model.class_path, "run_id": s.run_id, "tracking_uri": s.uri}
        if cfg.get("data"):
            info["datamodule_class_path"] = cfg.data.class_path
        ckpt = BestCheckpoint(
            dirpath=s.ckpt_dir, filename="best", monitor=cfg.checkpoint_monitor, mode=cfg.checkpoint_mode,
            save_last=True, auto_insert_metric_name=False,
        )
        ours = [ResourceMonitor(), ckpt, OnExceptionCheckpoint(s.ckpt_dir, filename="on_exception"),
                CheckpointInfo(info)]
        config["callbacks"] = list(config.get("callbacks") or []) + list(callbacks) + ours
        if config.get("enable_checkpointing") is False:
            config["callbacks"] = [c for c in config["callbacks"] if not isinstance(c, ModelCheckpoint)]
        return self.trainer_class(**config)


def _scalars(d: dict) -> dict[str, float]:
    return {k: float(v) for k, v in d.items() if getattr(v, "numel", lambda: 1)() == 1}


def _project_of(class_path: str) -> str:
    parts = class_path.split(".")
    return parts[1] if parts[0] == "modules" and len(parts) > 2 else parts[0]


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:500]


_NOISE = ("Does not validate against any of the Union subtypes", "Subtypes:", "Expected a <class 'NoneType'>",
          "Given value type:", "Given value:", "Errors:")


def explain_config_error(e: BaseException, args: Sequence[str]) -> str:
    """Turn a jsonargparse error into one that names the key, the valid choices and a likely fix."""
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
            hints.append(_suggest(key, _known_keys(key), "keys"))
    return "invalid configuration: " + text + ("\n" + "\n".join(h for h in hints if h) if hints else "")


def _init_params(class_path: str) -> list[str]:
    import importlib

    mod, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except Exception:
        return []


def _known_keys(key: str) -> list[str]:
    section = key.split(".")[0]
    if section == "trainer":
        return ["trainer." + p for p in inspect.signature(Trainer.__init__).parameters if p != "self"]
    return ["trainer", "model", "data", "seed_everything", "tracking_uri", "experiment", "run_name",
            "log_checkpoint", "system_metrics", "checkpoint_monitor", "checkpoint_mode", "config", "print_config"]


def _suggest(bad: str, choices: list[str], what: str) -> str:
    if not choices:
        return ""
    close = difflib.get_close_matches(bad.split(".")[-1] if what != "keys" else bad, choices, n=3, cutoff=0.6)
    hint = f"unknown key '{bad}'" + (f"; did you mean {', '.join(close)}?" if close else "")
    return f"{hint}\nvalid {what}: {', '.join(choices)}"


def load_experiment(config: str | Path | None, args: Sequence[str] = ()) -> PracticumCLI:
    """Parse and instantiate a config's model and datamodule without opening a run (``.model``, ``.datamodule``)."""
    return PracticumCLI((["--config", str(config)] if config else []) + list(args), {"dry_run": True})


def run_experiment(
    config: str | Path | None,
    args: Sequence[str] = (),
    tracking_uri: str | None = None,
    *,
    experiment: str | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    system_metrics: bool = True,
) -> RunResult:
    """Fit (then test, where the datamodule has a test split) one config into one MLflow run.

    Raises ``ConfigError`` for a config the schema rejects (before any run is opened) and
    ``TrackingError`` when the store cannot be used. Any error after the run is opened ends the run
    FAILED (Ctrl-C or SIGTERM: KILLED) with what it logged kept, and is returned, not raised.
    """
    argv = (["--config", str(config)] if config else []) + list(args)
    context = dict(tracking_uri=tracking_uri, experiment=experiment, run_name=run_name, parent_run_id=parent_run_id,
                   tags=tags or {}, system_metrics=system_metrics, config_path=config)
    cli = PracticumCLI(argv, context)  # ConfigError/TrackingError propagate: nothing was opened, or it is FAILED
    s, trainer, model, dm = cli.session, cli.trainer, cli.model, cli.datamodule
    status, error = "FINISHED", None
    metrics: dict[str, float] = {}
    try:
        trainer.fit(model, datamodule=dm)
        metrics.update(_scalars(trainer.callback_metrics))
        if dm is not None and hasattr(dm, "fingerprint") and trainer.is_global_zero:
            s.client.log_param(s.run_id, "data.fingerprint", dm.fingerprint())
        if dm is not None and is_overridden("test_dataloader", dm) and is_overridden("test_step", model):
            best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
            trainer.test(model, datamodule=dm, ckpt_path=best or None, verbose=False)
        if trainer.interrupted:
            status = "KILLED"
    except (KeyboardInterrupt, SystemExit) as e:  # Ctrl-C, or Lightning's SIGTERMException
        status, error = "KILLED", e
    except Exception as e:
        status, error = "FAILED", e
    finally:
        if trainer.is_global_zero:
            s.end(status, trainer, error)
    metrics.update(_scalars(trainer.callback_metrics))
    for cb in trainer.callbacks:
        if isinstance(cb, ResourceMonitor):
            metrics.update(cb.summary)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    return RunResult(s.run_id, status, metrics, _one_line(error) if error else None, best or None)
