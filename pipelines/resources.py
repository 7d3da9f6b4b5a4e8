"""Resource accounting: one callback, used by every project.

The ledger is read from the tensors themselves, so it is exact and device-independent: LoRA vs
full fine-tuning or dense vs MoE compare byte for byte on a CPU. Device peaks (CUDA allocator) and
host RSS are measurements on top of it.

Host RSS is the process's, and a study's runs share one process (a worker's, with ``--workers``), whose
RSS only grows. So each run reports ``mem/host_peak_rss_increase_bytes``: its peak above a baseline
taken at the start of its fit, after a garbage collection and glibc's ``malloc_trim`` hand back what
earlier runs freed; the process's own peak stays ``mem/host_peak_rss_bytes``.

Where glibc's heap serves a run, how far its RSS rises depends on the holes earlier frees left (and on
whether glibc's adaptive thresholds had already moved): two identical runs differed by up to half their
peak. So the run's peak is taken over its first ``max(2, warmup_steps)`` steps (the warm-up that timing
leaves out; the optimizer's state and a full step included) with every block of 128 KiB or more freshly
mapped and the heap's free pages handed back at each sample, so that RSS follows the bytes alive; then
the heap serves the rest of the fit as glibc's thresholds would (mapping every block for a whole fit
costs 1.35-1.44x step time on a small GPT). `benchmarks/host_peak_order.py` measures both.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import statistics
import time
from typing import Any, Iterable

from pathlib import Path

import psutil
import torch
from lightning import Callback, LightningModule, Trainer
from lightning.pytorch.utilities.data import extract_batch_size

from contract import CountsSamples, CountsTokens, MemoryLedger, ParamCount


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


_LIBC = _libc()  # glibc, else None (macOS, musl): nothing to trim or tune there
M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def _malloc_trim() -> None:
    """Hand the heap's free pages back to the OS (glibc); elsewhere nothing to do."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def map_large_blocks(exact: bool) -> None:
    """glibc: `exact`, every block of 128 KiB or more gets fresh pages and returns them when freed, so
    RSS follows what is alive; else blocks under 32 MiB come from the heap, trimmed past 64 MiB free
    (where glibc's own adaptive thresholds settle, fixed so that one run's frees do not move them)."""
    if _LIBC is not None:
        _LIBC.mallopt(M_MMAP_THRESHOLD, 128 * 2**10 if exact else 32 * 2**20)
        _LIBC.mallopt(M_TRIM_THRESHOLD, 128 * 2**10 if exact else 64 * 2**20)


def rss_baseline() -> int:
    """This process's RSS once what earlier runs freed is handed back: where a run's own memory starts.
    On Linux the kernel's high-water mark (VmHWM) is reset to it, so `rss_peak` sees this run's peak only."""
    gc.collect()
    _malloc_trim()
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: `rss_peak` falls back to the sampled RSS
        pass
    return psutil.Process().memory_info().rss


def rss_peak(sampled: int) -> int:
    """The kernel's high-water mark of RSS since `rss_baseline` (Linux), else the highest RSS sampled."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return sampled
    kib = [int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")]
    return max(sampled, kib[0] * 1024) if kib else sampled


def _storage_key(t: torch.Tensor) -> tuple[str, int]:
    return (str(t.device), t.untyped_storage().data_ptr())


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of the distinct storages behind ``tensors`` (tied weights and views count once)."""
    seen: dict[tuple[str, int], int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            seen.setdefault(_storage_key(t), t.untyped_storage().nbytes())
    return sum(seen.values())


def parameter_ledger(module: torch.nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    trainable = [p for p in params if p.requires_grad]
    frozen = [p for p in params if not p.requires_grad]
    return {
        "params/total": sum(p.numel() for p in params),
        "params/trainable": sum(p.numel() for p in trainable),
        "mem/params_bytes": unique_bytes(params),
        "mem/params_trainable_bytes": unique_bytes(trainable),
        "mem/params_frozen_bytes": unique_bytes(frozen),
    }


def grad_bytes(module: torch.nn.Module) -> int:
    return unique_bytes(p.grad for p in module.parameters() if p.grad is not None)


def optimizer_bytes(optimizers: Iterable[torch.optim.Optimizer]) -> int:
    """Every tensor an optimizer keeps per parameter (Adam: exp_avg, exp_avg_sq and step)."""
    return unique_bytes(v for opt in optimizers for state in opt.state.values() for v in state.values())


class ActivationMeter:
    """Bytes of the tensors autograd saves for backward while active, each storage once.

    Parameters saved by autograd (a Linear saves its weight) are not activations and are excluded.
    Built on ``torch.autograd.graph.saved_tensors_hooks``: the pack hook sees every saved tensor.
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._exclude = {_storage_key(p) for p in exclude}
        self._seen: dict[tuple[str, int], int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        try:
            key = _storage_key(t)
            if key not in self._exclude:
                self._seen.setdefault(key, t.untyped_storage().nbytes())
        except (RuntimeError, NotImplementedError):  # tensors without a storage (e.g. sparse or fake)
            pass
        return t

    @property
    def bytes(self) -> int:
        return sum(self._seen.values())

    def __enter__(self) -> "ActivationMeter":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


class ResourceMonitor(Callback):
    """Memory ledger, device and host peaks, step time and throughput for every run.

    What a module may add is in `contract`: `CountsTokens` (then ``perf/tokens_per_s`` is logged),
    `CountsSamples`; a module whose core is not torch (the NumPy classics) is a `MemoryLedger` with the
    byte counts of its own arrays and a `ParamCount`.
    ``perf/predict_time_s`` is the wall time of the last validation's batches (sanity check excluded).

    Args:
        warmup_steps: leading steps left out of timing (allocator warm-up, lazy init, compile).
        ledger_step: the step of each fit, counted from its first (0), whose saved activations and
            gradients are counted: a resumed fit measures its own, as a fresh one does.
    """

    def __init__(self, warmup_steps: int = 3, ledger_step: int = 1):
        self.warmup_steps, self.ledger_step = warmup_steps, ledger_step
        self.summary: dict[str, float] = {}
        # samples and tokens of the fits before a resume: the budget counts the whole run
        self._prior = self._restored = None

    # -- fit boundaries -------------------------------------------------------------------------
    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._proc = psutil.Process()
        map_large_blocks(exact=True)  # for the first steps: this run's own peak (module docstring)
        self._rss_base = rss_baseline()
        self._rss_peak = self._proc.memory_info().rss
        self._run_peak: int | None = None  # the peak over the first steps, when they are done
        self._records: list[tuple[float, int, int | None]] = []  # (seconds, samples, tokens) per step
        self._meter: ActivationMeter | None = None
        self._ledger: dict[str, int] = {}
        self._at: int | None = None  # the global step measured: this fit's first step + ledger_step
        self._prior, self._restored = self._restored or {"samples": 0, "tokens": 0}, None
        self._fit_t0 = time.perf_counter()
        # asked once per fit, not per batch (a runtime Protocol check walks the protocol's members)
        self._tokens = isinstance(pl_module, CountsTokens)
        self._samples = isinstance(pl_module, CountsSamples)
        self._predict_s: float | None = None  # validation batches of the last (non-sanity) validation
        self._cuda = trainer.strategy.root_device.type == "cuda"
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(trainer.strategy.root_device)

    def _sample(self) -> None:
        self._rss_peak = max(self._rss_peak, self._proc.memory_info().rss)
        if self._run_peak is None:
            _malloc_trim()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        map_large_blocks(exact=False)  # a run that fails in its first steps leaves the heap as others do

    def state_dict(self) -> dict[str, int]:
        recs = getattr(self, "_records", [])
        return {"samples": self._prior_count("samples") + sum(r[1] for r in recs),
                "tokens": self._prior_count("tokens") + sum(r[2] or 0 for r in recs)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        # before on_fit_start for most strategies, after it for those that restore after setup
        self._prior = self._restored = {"samples": int(state["samples"]), "tokens": int(state["tokens"])}

    def _prior_count(self, key: str) -> int:
        return (self._prior or {}).get(key, 0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._at is None:
            self._at = trainer.global_step + self.ledger_step
        if trainer.global_step == self._at and self._meter is None and not self._ledger.get("done"):
            self._meter = ActivationMeter(exclude=list(pl_module.parameters())).__enter__()
        self._t0 = time.perf_counter()

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._close_meter()
        self._sample()  # the forward's activations alive

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step == self._at:
            self._ledger["mem/grads_bytes"] = grad_bytes(pl_module)
        self._sample()  # and the gradients

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self._cuda:
            torch.cuda.synchronize(trainer.strategy.root_device)
        dt = time.perf_counter() - self._t0
        self._close_meter()
        tokens = int(pl_module.tokens_per_batch(batch)) if self._tokens else None
        self._records.append((dt, int(pl_module.samples_per_batch(batch)) if self._samples else _batch_size(batch),
                              tokens))
        step = trainer.global_step  # already incremented by this batch's optimizer step
        if step > self._at and "mem/optimizer_bytes" not in self._ledger:
            self._ledger["mem/optimizer_bytes"] = optimizer_bytes(trainer.optimizers)
        self._sample()
        if self._run_peak is None and len(self._records) >= max(2, self.warmup_steps):
            self._run_peak = rss_peak(self._rss_peak)
            map_large_blocks(exact=False)

    # -- prediction time: the validation batches of the last validation, one prediction each -----
    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        self._val_s = 0.0

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0) -> None:
        self._vt0 = time.perf_counter()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:
        if getattr(self, "_cuda", False):  # set by on_fit_start; a bare trainer.validate() has none
            torch.cuda.synchronize(trainer.strategy.root_device)
        self._val_s += time.perf_counter() - self._vt0

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._predict_s = self._val_s

    def _close_meter(self) -> None:
        if self._meter is not None:
            self._meter.__exit__(None, None, None)
            self._ledger["mem/activations_bytes"] = self._meter.bytes
            self._ledger["done"] = 1
            self._meter = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._rss_peak = max(self._rss_peak, self._proc.memory_info().rss)
        m: dict[str, float] = dict(parameter_ledger(pl_module))
        m.update({k: v for k, v in self._ledger.items() if k != "done"})
        m.setdefault("mem/grads_bytes", 0)
        m.setdefault("mem/optimizer_bytes", optimizer_bytes(trainer.optimizers))
        m.setdefault("mem/activations_bytes", 0)
        if isinstance(pl_module, MemoryLedger):  # non-torch cores report their own arrays
            for k, v in pl_module.memory_ledger().items():
                m[f"mem/{k}"] = m.get(f"mem/{k}", 0) + int(v)
        if isinstance(pl_module, ParamCount):
            m["params/total"] = m["params/trainable"] = int(pl_module.param_count())
        self._rss_peak = rss_peak(self._rss_peak)
        if self._run_peak is None:  # a fit shorter than its warm-up: measured throughout
            self._run_peak = self._rss_peak
            map_large_blocks(exact=False)
        m["mem/host_peak_rss_bytes"] = self._rss_peak
        m["mem/host_peak_rss_increase_bytes"] = max(0, self._run_peak - self._rss_base)
        if self._cuda:
            dev = trainer.strategy.root_device
            m["mem/device_peak_allocated_bytes"] = torch.cuda.max_memory_allocated(dev)
            m["mem/device_peak_reserved_bytes"] = torch.cuda.max_memory_reserved(dev)
        else:
            m["mem/device_peak_allocated_bytes"] = m["mem/device_peak_reserved_bytes"] = 0
        m["time/fit_s"] = time.perf_counter() - self._fit_t0
        if self._predict_s is not None:
            m["perf/predict_time_s"] = self._predict_s
        # What the run was given: optimizer steps and the samples (tokens) its steps saw, a resumed run's
        # earlier fits included, summed over ranks, so a study can check its variants had equal budgets.
        m["budget/steps"] = trainer.global_step
        m["budget/samples"] = self._prior_count("samples") + sum(r[1] for r in self._records)
        if self._records and self._records[0][2] is not None:
            m["budget/tokens"] = self._prior_count("tokens") + sum(r[2] for r in self._records)
        # Warm-up steps are left out; a run too short for that still drops its first step.
        recs = self._records[self.warmup_steps :] if len(self._records) > self.warmup_steps else self._records[1:]
        recs = recs or self._records
        if recs:
            total_t = sum(r[0] for r in recs)
            m["perf/step_time_s"] = statistics.median(r[0] for r in recs)
            m["perf/samples_per_s"] = sum(r[1] for r in recs) / total_t
            if recs[0][2] is not None:
                m["perf/tokens_per_s"] = sum(r[2] for r in recs) / total_t
        m = self._reduce(trainer, m)
        self.summary = m
        self._restored = None
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(m, step=trainer.global_step)

    @staticmethod
    def _reduce(trainer: Trainer, m: dict[str, float]) -> dict[str, float]:
        """Under several processes: the max of memory and of times, the sum of throughput and of the
        samples and tokens seen."""
        if trainer.world_size <= 1:
            return m
        keys = sorted(m)  # every rank logs the same keys in the same order
        vals = torch.tensor([float(m[k]) for k in keys], dtype=torch.float64, device=trainer.strategy.root_device)
        gathered = trainer.strategy.all_gather(vals)  # (world, n): one collective gives both
        summed, peak = gathered.sum(dim=0), gathered.max(dim=0).values
        out = {}
        for i, k in enumerate(keys):
            # throughputs add up over ranks; times (a step, a validation pass) are the slowest rank's
            summed_key = k.startswith("perf/") and not k.endswith("_time_s") or k in ("budget/samples", "budget/tokens")
            out[k] = float(summed[i] if summed_key else peak[i])
        return out


def _batch_size(batch: Any) -> int:
    try:
        return int(extract_batch_size(batch))
    except Exception:  # a batch Lightning cannot size: count it as one sample
        return 1
