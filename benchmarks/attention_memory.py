"""What FlashAttention saves: explicit softmax(QK^T)V against F.scaled_dot_product_attention.

Run from the repository root (by hand, not part of the tests):

    python benchmarks/attention_memory.py                       # CPU sweep, T = 64 .. 4096
    python benchmarks/attention_memory.py --device cuda         # CUDA: explicit vs mem-efficient vs flash (bf16)

The mini-GPT's own attention functions (`modules.gpt.attention`: `attention_reference`, the explicit
path, and `attention_sdpa`) on q, k, v of its CPU preset's shape (n_head 4, head size 32; batch 1 so
that T = 4096 fits a shared machine: every figure is linear in the batch) at causal context lengths
64 .. 4096. Per length and kind:

- ledger: the bytes autograd saves for backward, read from the tensors themselves by the pipeline's
  `ActivationMeter` (exact, device-independent), beside the closed forms `reference_saved_bytes`
  (4 B nh T^2 + T^2 + 12 B nh T hs: quadratic) and `flash_saved_bytes` (16 B nh T hs + 4 B nh T: linear);
- peak memory of one forward + backward above what the inputs already hold: on CPU the peak RSS of a
  forked child (`ru_maxrss`) for each (kind, T), on CUDA `torch.cuda.max_memory_allocated`;
- time per forward + backward step: the median of `--reps` steps after one warm-up;
- the kernel that ran: the name of the output's autograd node (on CPU the fused path is
  `ScaledDotProductFlashAttentionForCpuBackward0`, PyTorch's CPU FlashAttention).

The slopes of log(bytes) against log(T) are fitted over T >= --fit_from (where the quadratic term
dominates) and over every length; the figure goes to docs/images/attention_memory.png (CPU) or
attention_memory_cuda.png, the table to stdout (and --json).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from modules.gpt.attention import attention_reference, attention_sdpa, flash_saved_bytes, reference_saved_bytes
from pipelines.resources import ActivationMeter

ROOT = Path(__file__).resolve().parents[1]

LENGTHS = [64, 128, 256, 512, 1024, 2048, 4096]


def attend(kind: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """One causal attention of the given kind. CUDA kinds pin SDPA to one backend, so a kernel that
    cannot run is an error instead of a silent fallback to another."""
    if kind == "explicit":
        return attention_reference(q, k, v)
    if kind == "sdpa":
        return attention_sdpa(q, k, v)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION}[kind]
    with sdpa_kernel([backend]):
        return attention_sdpa(q, k, v)


def inputs(t: int, args, device: str, dtype: torch.dtype) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)
    return [torch.randn(args.batch, args.n_head, t, args.head_size, device=device, dtype=dtype, generator=g)
            .requires_grad_() for _ in range(3)]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(kind: str, t: int, args, device: str = "cpu") -> dict:
    """Ledger, peak memory above the inputs, kernel and median step time of one (kind, T)."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q, k, v = inputs(t, args, device, dtype)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _rss_bytes()
    with ActivationMeter() as meter:  # the first step: its saved tensors are the ledger
        y = attend(kind, q, k, v)
    kernel = y.grad_fn.name() if y.grad_fn is not None else "none"
    y.backward(torch.ones_like(y))
    sync(device)
    peak = (torch.cuda.max_memory_allocated() if device == "cuda" else _max_rss_bytes()) - base
    del y
    times = []
    for _ in range(args.reps):
        q.grad = k.grad = v.grad = None
        sync(device)
        t0 = time.perf_counter()
        attend(kind, q, k, v).backward(torch.ones(1, device=device, dtype=dtype).expand(q.shape))
        sync(device)
        times.append(time.perf_counter() - t0)
    el = torch.empty((), dtype=dtype).element_size()
    formula = (reference_saved_bytes if kind == "explicit" else flash_saved_bytes)(
        args.batch, args.n_head, t, args.head_size, el)
    return {"kind": kind, "T": t, "ledger_bytes": meter.bytes, "formula_bytes": formula, "peak_bytes": peak,
            "step_s": statistics.median(times), "kernel": kernel, "device": device, "dtype": str(dtype)}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_sweep(args) -> list[dict]:
    """Each (kind, T) in a forked process: ru_maxrss only ever grows, and a forked child's starts at
    its RSS when forked, so a child per measurement reads each one's own peak (without re-importing)."""
    ctx = multiprocessing.get_context("fork")
    rows = []
    for t in args.lengths:
        for kind in ("explicit", "sdpa"):
            with ctx.Pool(1) as pool:
                rows.append(pool.apply(measure, (kind, t, args)))
            r = rows[-1]
            print(f"  {kind:8s} T={t:5d} ledger {r['ledger_bytes']:>12,d} peak {r['peak_bytes']:>12,d} "
                  f"{r['step_s'] * 1e3:9.2f} ms  {r['kernel']}", file=sys.stderr, flush=True)
    return rows


def cuda_sweep(args) -> list[dict]:
    rows = []
    for t in args.lengths:
        for kind in ("explicit", "efficient", "flash"):
            try:
                rows.append(measure(kind, t, args, "cuda"))
            except (RuntimeError, torch.OutOfMemoryError) as e:  # a kernel this GPU or shape lacks, or OOM
                rows.append({"kind": kind, "T": t, "error": str(e).splitlines()[0][:120], "device": "cuda"})
            torch.cuda.empty_cache()
    return rows


def slope(rows: list[dict], kind: str, key: str, t_min: int) -> float:
    pts = [(r["T"], r[key]) for r in rows if r["kind"] == kind and r["T"] >= t_min and r.get(key, 0) > 0]
    if len(pts) < 2:
        return float("nan")
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return float(np.polyfit(x, y, 1)[0])


def table(rows: list[dict], args) -> str:
    kinds = list(dict.fromkeys(r["kind"] for r in rows))
    lines = ["| kind | T | ledger bytes | formula bytes | peak bytes | fwd+bwd ms | kernel |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['kind']} | {r['T']} | | | | | failed: {r['error']} |")
            continue
        lines.append(f"| {r['kind']} | {r['T']} | {r['ledger_bytes']:,} | {r['formula_bytes']:,} | {r['peak_bytes']:,} | "
                     f"{r['step_s'] * 1e3:.2f} | {r['kernel']} |")
    lines += ["", f"| kind | ledger slope (T >= {args.fit_from}) | ledger slope (all T) | peak slope (T >= {args.fit_from}) "
              f"| time slope (T >= {args.fit_from}) |", "|---|---|---|---|---|"]
    for k in kinds:
        lines.append(f"| {k} | {slope(rows, k, 'ledger_bytes', args.fit_from):.3f} | {slope(rows, k, 'ledger_bytes', 0):.3f} | "
                     f"{slope(rows, k, 'peak_bytes', args.fit_from):.3f} | {slope(rows, k, 'step_s', args.fit_from):.3f} |")
    return "\n".join(lines)


def plot(rows: list[dict], args, path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(13, 4))
    axes = fig.subplots(1, 3)
    for ax, key, label in zip(axes, ("ledger_bytes", "peak_bytes", "step_s"),
                              ("bytes saved for backward (ledger)", "peak memory above inputs (bytes)",
                               "forward + backward (s)")):
        for kind in dict.fromkeys(r["kind"] for r in rows):
            pts = [(r["T"], r[key]) for r in rows if r["kind"] == kind and r.get(key, 0) > 0]
            if not pts:
                continue
            s = slope(rows, kind, key, args.fit_from)
            ax.loglog(*zip(*pts), marker="o", base=2, label=f"{kind} (slope {s:.2f})")
        ax.set(xlabel="context length T", ylabel=label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    dev = rows[0]["device"]
    fig.suptitle(f"mini-GPT attention, batch {args.batch}, {args.n_head} heads x {args.head_size}, {dev}: "
                 f"slopes fitted over T >= {args.fit_from}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--lengths", type=int, nargs="+", default=LENGTHS)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--n_head", type=int, default=4)
    p.add_argument("--head_size", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--fit_from", type=int, default=512)
    p.add_argument("--plot", type=Path, default=None, help="default docs/images/attention_memory[_cuda].png")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    torch.manual_seed(0)
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch sees no CUDA device")
    rows = cuda_sweep(args) if args.device == "cuda" else cpu_sweep(args)
    print(f"torch {torch.__version__}, {args.device}"
          + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else f", {torch.get_num_threads()} threads"))
    print(table(rows, args))
    suffix = "_cuda" if args.device == "cuda" else ""
    plot(rows, args, args.plot or ROOT / "docs" / "images" / f"attention_memory{suffix}.png")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
