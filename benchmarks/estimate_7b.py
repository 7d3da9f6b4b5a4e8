"""Predicted memory of fine-tuning Llama-3-8B and Mistral-7B on one GPU: full / LoRA r=16 / QLoRA
r=16, bf16, batch 1 and 4, sequence 512 and 2048, with and without gradient checkpointing.

    python benchmarks/estimate_7b.py [--out estimate_7b.md]

Offline: the architectures are the shipped configs/finetune/arch/*/config.json. Full is bf16-true
(bf16 weights, gradients and AdamW state, as configs/finetune/*_full.yaml); LoRA is a bf16 base
with fp32 adapters under bf16-mixed; QLoRA an NF4 base (bitsandbytes layout) under bf16-mixed.
"""

import argparse
from pathlib import Path

from modules.finetune.memory import GiB, estimate
from modules.finetune.module import FinetuneModule
from pipelines.estimate import ARCH_DIR, SHIPPED_ARCH

SETUPS = {"full": ("full", "bf16-true"), "LoRA r=16": ("lora", "bf16-mixed"), "QLoRA r=16": ("qlora", "bf16-mixed")}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="estimate_7b.md")
    out = Path(p.parse_args().out)
    rows = ["| model | method | batch | seq | ckpt | params | grads | optimizer | activations | recompute | total GiB |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    for hub_id, model in SHIPPED_ARCH.items():
        arch = str(ARCH_DIR / model / "config.json")
        for name, (method, precision) in SETUPS.items():
            for batch in (1, 4):
                for seq in (512, 2048):
                    for ckpt in (False, True):
                        module = FinetuneModule(hub_id, method, r=16, dtype="bfloat16", gradient_checkpointing=ckpt)
                        e = estimate(module, arch, precision, batch_size=batch, seq_len=seq)
                        g = [f"{getattr(e, k) / GiB:.2f}" for k in ("params", "grads", "optimizer", "activations", "recompute")]
                        rows.append(f"| {model} | {name} | {batch} | {seq} | {'yes' if ckpt else 'no'} | "
                                    + " | ".join(g) + f" | **{e.total / GiB:.1f}** |")
    text = "\n".join(rows) + "\n"
    out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
