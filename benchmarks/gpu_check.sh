#!/usr/bin/env bash
# GPU check, under 8 minutes on one modern GPU; writes every figure to one Markdown file.
#   bash benchmarks/gpu_check.sh [OUT.md]            (TINY=/path/to/tinyshakespeare.txt to skip its download)
# 1. mini-GPT GPU preset throughput: fp32 vs bf16 vs bf16 + torch.compile (300 steps each)
# 2. device peak memory of full vs LoRA vs QLoRA fine-tuning on the embedded mini-GPT base
# 3. FSDP on one GPU (the fsdp preset), with a sharded checkpoint and a resume from it
# 4. what FlashAttention saves: the mini-GPT's attention at T = 64..4096 written out (explicit) vs the
#    memory-efficient vs the flash SDPA kernel, bf16 (benchmarks/attention_memory.py --device cuda:
#    ledger, device peak, ms per forward + backward, fitted log-log slopes; figure attention_memory_cuda.png beside OUT)
# FULL=1 also trains the GPU preset for its 5000 steps (val loss target <= 1.48).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check.md}
PRACTICUM=${PRACTICUM:-.venv/bin/practicum}
[ -x "$PRACTICUM" ] || PRACTICUM=practicum
STORE=$(mktemp -d)
URI="sqlite:///$STORE/mlflow.db"
COMMON=(--tracking_uri="$URI" --system_metrics=false --log_checkpoint=false --experiment=gpu-check)
DATA=()
[ -n "${TINY:-}" ] && DATA=(--data.init_args.path="$TINY")
GPT=configs/gpt/shakespeare_char.yaml
SHORT=(--trainer.max_steps=300 --trainer.val_check_interval=300 --data.init_args.val_windows=512)

step() { echo "== $1"; shift; timeout "${LIMIT:-240}" "$PRACTICUM" "$@" "${COMMON[@]}" || echo "   (failed: $?)"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$STORE/gpu.txt"
step gpt-fp32 run $GPT "${SHORT[@]}" "${DATA[@]}" --run_name=gpt-fp32 --trainer.precision=32-true --model.init_args.compile=false
step gpt-bf16 run $GPT "${SHORT[@]}" "${DATA[@]}" --run_name=gpt-bf16 --model.init_args.compile=false
step gpt-bf16-compile run $GPT "${SHORT[@]}" "${DATA[@]}" --run_name=gpt-bf16-compile
FT=configs/finetune/minigpt_lora.yaml
step ft-full run $FT --run_name=ft-full --trainer.accelerator=gpu --model.init_args.method=full --model.init_args.lr=3e-4
step ft-lora-r64 run $FT --run_name=ft-lora-r64 --trainer.accelerator=gpu --model.init_args.method=lora --model.init_args.r=64
step ft-qlora-r64 run $FT --run_name=ft-qlora-r64 --trainer.accelerator=gpu --model.init_args.method=qlora --model.init_args.r=64
step fsdp-1gpu run $GPT --config configs/trainer/fsdp.yaml --trainer.devices=1 "${SHORT[@]}" "${DATA[@]}" \
  --run_name=fsdp-1gpu --model.init_args.compile=false --checkpoint_every_n_steps=100
if [ "${FULL:-0}" = 1 ]; then LIMIT=420 step gpt-preset-5000 run $GPT "${DATA[@]}" --run_name=gpt-preset-5000; fi

PYBIN=${PYTHON:-$(dirname "$(command -v "$PRACTICUM")")/python}
[ -x "$PYBIN" ] || PYBIN=python3
echo "== attention-memory"
timeout "${LIMIT:-240}" "$PYBIN" benchmarks/attention_memory.py --device cuda \
  --plot "$(dirname "$OUT")/attention_memory_cuda.png" > "$STORE/attention.md" || echo "   (failed: $?)"

# One table from the store: the figures are read back from MLflow, not from the console.
"$PYBIN" - "$URI" "$OUT" "$STORE/gpu.txt" <<'PY'
import os
import sys
from mlflow import MlflowClient
uri, out, gpu = sys.argv[1:]
c = MlflowClient(uri)
runs = c.search_runs([e.experiment_id for e in c.search_experiments()], order_by=["attributes.start_time ASC"])
keys = ["perf/tokens_per_s", "perf/step_time_s", "val/loss", "mem/device_peak_allocated_bytes",
        "mem/device_peak_reserved_bytes", "params/trainable", "time/fit_s"]
lines = [f"# GPU check\n\nGPU: {open(gpu).read().strip()}\n", "| run | status | " + " | ".join(keys) + " |",
         "|---|---|" + "---|" * len(keys)]
for r in runs:
    vals = [r.data.metrics.get(k) for k in keys]
    lines.append(f"| {r.info.run_name} | {r.info.status} | " + " | ".join("" if v is None else f"{v:.6g}" for v in vals) + " |")
open(out, "w").write("\n".join(lines) + "\n")
att = os.path.join(os.path.dirname(gpu), "attention.md")
if os.path.isfile(att) and os.path.getsize(att):
    open(out, "a").write("\n## Attention memory: explicit vs memory-efficient vs flash (bf16)\n\n" + open(att).read())
print("\n".join(lines))
PY
