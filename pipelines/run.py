"""One experiment: parse a config, open an MLflow run, fit, test, close the run with the right status.

Every project takes this path. The typed signatures of a project's LightningModule and
LightningDataModule are the schema (LightningCLI/jsonargparse, ``class_path``/``init_args``); this
module adds what every run needs and no project has to know about: the MLflow run, the resource
callback, checkpoints and their upload, the status (FINISHED, FAILED, KILLED).
"""

from __future__ import annotations

import difflib
import inspect
import os
import re
import sys
import time
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
from lightning.pytorch.utilities.rank_zero import rank_zero_only

from pipelines import tracking as trk
from pipelines.resources import ResourceMonitor
from pipelines.tracking import ConfigError  # noqa: F401  (re-exported: pipelines.run.ConfigError)

# OnExceptionCheckpoint makes a fresh fit look for a "last" checkpoint; in a new run there is none by design.
warnings.filterwarnings("ignore", message=r".*(called without a model|there is no last checkpoint).*")
HEADLINE = re.compile(r"^(train|val|test)/|^perf/(tokens|samples)_per_s$|^time/fit_s$|^params/total$")


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
    """MLFlowLogger on a run the pipeline opened.

    Hyperparameters are logged once, as the resolved config. Metrics survive a tracking outage: a
    batch that cannot be sent stays in a buffer and is retried with the next one and at the end.
    A resumed run skips (key, step) pairs the run already holds, so every step is logged exactly once.
    """

    def __init__(self, *args, logged: set[tuple[str, int]] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self._pending: list = []
        self._logged = frozenset(logged or ())  # only what the run held before; new steps need no record

    def log_hyperparams(self, params: Any) -> None:
        pass

    @rank_zero_only
    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        for k, v in metrics.items():
            if (k, step or 0) in self._logged:  # already in the run before a resume
                continue
            self._pending.append(Metric(k, float(v), now, step or 0))
        self.flush(raise_on_error=False)

    def flush(self, raise_on_error: bool = True, attempts: int = 1, wait_s: float = 2.0) -> None:
        for attempt in range(attempts):
            try:
                while self._pending:
                    self.experiment.log_batch(self.run_id, metrics=self._pending[:1000])
                    del self._pending[:1000]
                return
            except Exception:
                if attempt == attempts - 1:
                    if raise_on_error:
                        raise
                    return
                time.sleep(wait_s)

    @rank_zero_only
    def finalize(self, status: str = "success") -> None:
        pass  # the pipeline closes the run itself, after testing and artifact upload


class CheckpointInfo(Callback):
    """Records in each checkpoint which classes to rebuild it with, so a checkpoint alone can be sampled from."""

    def __init__(self, info: dict[str, Any]):
        self.info = info

    def on_save_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        import random

        import numpy as np
        import torch

        checkpoint["practicum"] = dict(self.info)
        # Plain types and tensors only, so the checkpoint stays loadable with torch.load(weights_only=True).
        name, keys, pos, has_gauss, gauss = np.random.get_state()
        checkpoint["practicum_rng"] = {
            "torch": torch.get_rng_state(),
            "numpy": [name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
            "python": random.getstate(),
        }

    def on_load_checkpoint(self, trainer, pl_module, checkpoint) -> None:
        import random

        import numpy as np
        import torch

        if rng := checkpoint.get("practicum_rng"):
            torch.set_rng_state(rng["torch"])
            name, keys, pos, has_gauss, gauss = rng["numpy"]
            np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
            random.setstate(rng["python"])


class NaNGuard(Callback):
    """Stops at the first non-finite loss, before backward can write NaN into the weights or a checkpoint."""

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        import torch

        if not torch.isfinite(loss.detach()).all():
            raise FloatingPointError(
                f"loss is {loss.item()} at step {trainer.global_step}: training stopped before the update; the last "
                "good checkpoint is kept. Lower the learning rate, clip gradients, or check the data."
            )


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
        resume_run_id: str | None = None,
    ):
        self.uri = trk.resolve_tracking_uri(uri)
        self.log_checkpoint = log_checkpoint
        self.is_zero = is_rank_zero()
        self._monitor = None
        self.resumed = resume_run_id is not None
        if not self.is_zero:
            # Other ranks never touch MLflow (not even to open the store: under torchrun every rank
            # starts at once, and two processes creating one SQLite schema collide): one run, not N.
            # Lightning's own launcher hands rank 0's run id down through the environment; under
            # torchrun ModelCheckpoint broadcasts rank 0's folder.
            self.run_id = os.environ.get("PRACTICUM_RUN_ID", "rank-local")
            self.ckpt_dir = trk.local_dir(self.uri) / "checkpoints" / self.run_id
            self.client, self.logger = None, None
            return
        self.client = trk.MlflowClient(self.uri)
        trk.check_reachable(self.client, self.uri)
        logged: set[tuple[str, int]] = set()
        if resume_run_id:
            self.run_id = resume_run_id
            run = self.client.get_run(resume_run_id)
            for key in run.data.metrics:
                logged |= {(key, m.step) for m in self.client.get_metric_history(resume_run_id, key)}
            self.client.update_run(resume_run_id, status="RUNNING")
        else:
            self.experiment_id = trk.get_or_create_experiment(self.client, experiment, self.uri)
            tags = {**trk.environment_tags(), **tags}
            if run_name:
                tags["mlflow.runName"] = run_name
            self.run_id = self.client.create_run(self.experiment_id, tags=tags, run_name=run_name).info.run_id
        os.environ["PRACTICUM_RUN_ID"] = self.run_id
        self.ckpt_dir = trk.local_dir(self.uri) / "checkpoints" / self.run_id
        self.logger = PracticumLogger(tracking_uri=self.uri, run_id=self.run_id, logged=logged)
        if system_metrics:
            try:
                from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

                self._monitor = SystemMetricsMonitor(self.run_id, sampling_interval=5, tracking_uri=self.uri,
                                                     resume_logging=self.resumed)
                self._monitor.start()
            except Exception as e:  # missing psutil/pynvml parts must not stop training
                print(f"warning: system metrics off ({e})", file=sys.stderr)

    def end(self, status: str, error: BaseException | None = None) -> tuple[str, BaseException | None]:
        """Flush metrics, upload checkpoints, set the status; returns the final (status, error).

        A tracking outage at the end is waited out for a while (metrics are never dropped silently);
        an artifact that cannot be written (full disk) turns the run FAILED with that message.
        """
        if not self.is_zero:
            return status, error
        if self._monitor is not None:
            self._monitor.finish()
        self.logger.flush(attempts=30, wait_s=2.0)
        try:
            if error is not None:
                self.client.set_tag(self.run_id, "practicum.error", _one_line(error))
                tb = "".join(traceback.format_exception(type(error), error, error.__traceback__))
                self.client.log_text(self.run_id, tb, "error.txt")
            if self.log_checkpoint and self.ckpt_dir.is_dir():
                for ckpt in sorted(self.ckpt_dir.glob("*.ckpt")):
                    if ckpt.is_dir():  # a sharded (FSDP) checkpoint is a folder of shards
                        self.client.log_artifacts(self.run_id, str(ckpt), f"checkpoints/{ckpt.name}")
                    else:
                        self.client.log_artifact(self.run_id, str(ckpt), "checkpoints")
        except OSError as e:
            error = OSError(e.errno, f"could not write artifacts of run {self.run_id}: {e.strerror or e} "
                                     f"(local checkpoints stay in {self.ckpt_dir}); free space on the artifact store")
            status = "FAILED"
            self.client.set_tag(self.run_id, "practicum.error", _one_line(error))
        self.client.set_terminated(self.run_id, status)
        return status, error


def is_rank_zero() -> bool:
    """Whether this process is global rank 0, read from the launchers' variables (torchrun, Lightning, SLURM)."""
    for var in ("RANK", "LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "SLURM_PROCID"):
        if int(os.environ.get(var, "0") or 0) != 0:
            return False
    return True


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
        parser.add_argument("--checkpoint_every_n_steps", type=Optional[int], default=None,
                            help="also save last.ckpt every N training steps (default: at each validation)")
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
        try:
            self.config_init = self.parser.instantiate_classes(self.config)
        except Exception as e:
            raise ConfigError(explain_config_error(e, self.parser)) from None
        self.datamodule = self.config_init.get("data")
        self.model = self.config_init["model"]
        if self.context.get("dry_run"):  # parse and build the project only: no run, no trainer
            return
        check_strategy(self.config.trainer)
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
        self.resume_ckpt = None
        resume_id = None
        if cfg.resume and is_rank_zero():
            resume_id, self.resume_ckpt = find_resume_point(cfg.resume, uri, self.context.get("config_path"))
        self.session = Session(
            uri,
            cfg.experiment or self.context.get("experiment") or project,
            cfg.run_name or self.context.get("run_name"),
            tags,
            cfg.system_metrics and self.context.get("system_metrics", True),
            cfg.log_checkpoint,
            resume_run_id=resume_id,
        )
        self.context["session"] = self.session
        if cfg.resume and not is_rank_zero():  # rank 0 found it; the same folder holds it for every rank
            self.resume_ckpt = str(self.session.ckpt_dir / "last.ckpt")
        try:
            s = self.session
            if s.is_zero and not s.resumed:
                dump = self.parser.dump(cfg, skip_none=False)
                s.client.log_text(s.run_id, dump, "config.yaml")
                params = trk.flatten(yaml.safe_load(dump))
                params["seed"] = cfg.seed_everything
                trk.log_params(s.client, s.run_id, {k: v for k, v in params.items() if k != "resume"})
            elif s.is_zero:
                s.client.set_tag(s.run_id, "practicum.resumed_from", self.resume_ckpt)
            self.trainer = self.instantiate_trainer()
        except BaseException as e:
            _, self.context["error"] = self.session.end("FAILED", error=e)
            raise

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        s = self.session
        cfg = self.config
        config["logger"] = s.logger if s.logger is not None else False
        config.setdefault("default_root_dir", str(trk.local_dir(s.uri)))
        info = {"class_path": cfg.model.class_path, "run_id": s.run_id, "tracking_uri": s.uri}
        if cfg.get("data"):
            info["datamodule_class_path"] = cfg.data.class_path
        best = BestCheckpoint(dirpath=s.ckpt_dir, filename="best", monitor=cfg.checkpoint_monitor,
                              mode=cfg.checkpoint_mode, auto_insert_metric_name=False, enable_version_counter=False)
        # Lightning writes checkpoints atomically (temporary file, then rename): a kill mid-save
        # leaves the previous last.ckpt intact.
        last = ModelCheckpoint(dirpath=s.ckpt_dir, filename="last", monitor=None, save_top_k=1,
                               enable_version_counter=False, every_n_train_steps=cfg.checkpoint_every_n_steps)
        ours = [NaNGuard(), ResourceMonitor(), best, last,
                OnExceptionCheckpoint(s.ckpt_dir, filename="on_exception"), CheckpointInfo(info)]
        config["callbacks"] = list(config.get("callbacks") or []) + list(callbacks) + ours
        if config.get("enable_checkpointing") is False:
            config["callbacks"] = [c for c in config["callbacks"] if not isinstance(c, ModelCheckpoint)]
        return self.trainer_class(**config)


def check_strategy(trainer_cfg) -> None:
    """Strategies that cannot run here fail before a run opens, with the fix in the message."""
    import importlib.util

    import torch

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


def find_resume_point(resume: str, uri: str | None, config_path) -> tuple[str, str]:
    """(run id, checkpoint path) to continue: a run id, or 'last' = the latest unfinished run of this config."""
    uri = trk.resolve_tracking_uri(uri)
    client = trk.MlflowClient(uri)
    if resume == "last":
        if not config_path:
            raise ConfigError("--resume last needs the config file the run was started with")
        exp_ids = [e.experiment_id for e in client.search_experiments()]
        runs = client.search_runs(
            exp_ids, f"tags.`practicum.config` = '{Path(config_path).resolve()}' and attributes.status != 'FINISHED'",
            order_by=["attributes.start_time DESC"], max_results=1) if exp_ids else []
        if not runs:
            raise ConfigError(f"--resume last: no unfinished run of {config_path} in {client.tracking_uri}")
        run_id = runs[0].info.run_id
    else:
        run_id = resume
        try:
            client.get_run(run_id)
        except Exception:
            raise ConfigError(f"--resume {run_id}: no such run in {client.tracking_uri}") from None
    local = trk.local_dir(uri) / "checkpoints" / run_id / "last.ckpt"
    if local.is_dir():  # a sharded (FSDP) checkpoint: Lightning's strategy reads the folder itself
        if not any(local.iterdir()):
            raise ConfigError(f"--resume {resume}: the sharded checkpoint {local} is empty")
        return run_id, str(local)
    if not local.is_file():
        import mlflow

        try:
            local = Path(mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path="checkpoints/last.ckpt", tracking_uri=client.tracking_uri))
        except Exception:
            raise ConfigError(f"--resume {resume}: run {run_id} has no last.ckpt to resume from "
                              f"(neither in {local.parent} nor among its artifacts)") from None
    check_checkpoint(local)
    return run_id, str(local)


def check_checkpoint(path: str | Path) -> dict:
    """The checkpoint's contents (memory-mapped); a truncated or corrupt file is a clear error, not a
    crash inside torch.load."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception as e:
        raise ConfigError(f"checkpoint {path} is corrupt or truncated ({type(e).__name__}: {e}); "
                          "use an earlier checkpoint of the run (last.ckpt / best.ckpt) or start a new run") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError(f"checkpoint {path} holds no Lightning state_dict")
    return ckpt


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
    import importlib

    mod, _, name = class_path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(mod), name)
        return [p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "args", "kwargs")]
    except Exception:
        return []


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
                   tags=tags or {}, system_metrics=system_metrics,
                   config_path=str(Path(config).resolve()) if config else None)
    try:
        cli = PracticumCLI(argv, context)
    except Exception as e:
        if "session" not in context:  # ConfigError, TrackingError: nothing was opened
            raise
        s = context["session"]  # opened, then failed while building the trainer: it is FAILED already
        return RunResult(s.run_id, "FAILED", error=_one_line(context.get("error") or e))
    s, trainer, model, dm = cli.session, cli.trainer, cli.model, cli.datamodule
    status, error = "FINISHED", None
    metrics: dict[str, float] = {}
    try:
        trainer.fit(model, datamodule=dm, ckpt_path=cli.resume_ckpt)
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
        status, error = s.end(status, error)
    metrics.update(_scalars(trainer.callback_metrics))
    for cb in trainer.callbacks:
        if isinstance(cb, ResourceMonitor):
            metrics.update(cb.summary)
    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else None
    return RunResult(s.run_id, status, metrics, _one_line(error) if error else None, best or None)
