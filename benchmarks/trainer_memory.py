"""Peak memory of Hugging Face's Trainer distilling from a chorus cache: the fused loss against the same loss from
the model's full logits, and against the model's own cross-entropy (HF's usual path, no teacher at all).

One student (Llama-shaped, untied LM head), one synthetic store (``benchmarks/train.py``'s: random rows, a
well-formed top-k cache), the same Trainer settings; each mode runs in a fresh process so no allocator cache is
shared. Peak: CUDA max_memory_allocated, on CPU the resident-set high-water mark (VmHWM) — both above the
memory held right before ``trainer.train()`` (model, dataset), and in total.

    python benchmarks/trainer_memory.py [--vocab 32000] [--seq-len 512] [--batch-size 8] [--hidden 256]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write  # noqa: E402
from train import Peak, build_store, llama  # noqa: E402

from chorus import CacheDataset, DistillLoss, collate  # noqa: E402
from chorus.hf import DistillTrainer  # noqa: E402

MODES = {"fused": "DistillTrainer, DistillLoss (hidden states + LM head, chunked)",
         "logits": "DistillTrainer, DistillLoss(fused=False) (the model's full logits)",
         "hf-ce": "transformers.Trainer, the model's own loss (labels; CE only, no teacher)"}


def child(args: argparse.Namespace) -> dict:
    from transformers import Trainer, TrainingArguments

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = llama(args.vocab, args.hidden, args.layers, args.seq_len, seed=0).to(device)
    rows = CacheDataset(args.store, teachers=["t0"], batch_size=args.batch_size)
    targs = TrainingArguments(args.out, per_device_train_batch_size=args.batch_size, max_steps=args.steps,
                              save_strategy="no", report_to=[], use_cpu=device.type == "cpu", disable_tqdm=True,
                              logging_steps=args.steps, remove_unused_columns=False)
    if args.mode == "hf-ce":
        def plain(batch_rows):
            b = collate(batch_rows)
            return {"input_ids": b["input_ids"], "attention_mask": (b["segment_ids"] > 0).long(), "labels": b["labels"]}
        trainer = Trainer(model=model, args=targs, train_dataset=rows, data_collator=plain)
    else:
        loss = DistillLoss(args.store, ["t0"], kd_weight=0.5, fused=args.mode == "fused")
        trainer = DistillTrainer(model=model, args=targs, train_dataset=rows, distill_loss=loss)
    peak = Peak(device)
    peak.start()
    base = peak.base
    t0 = time.perf_counter()
    trainer.train()
    seconds = (time.perf_counter() - t0) / args.steps
    above = peak.stop()
    return {"mode": args.mode, "peak_above_start_mb": above / 2**20, "peak_total_mb": (above + base) / 2**20,
            "s_per_step": seconds}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--mode", choices=tuple(MODES))
    p.add_argument("--store")
    p.add_argument("--out")
    args = p.parse_args()
    if args.mode:  # one measurement, in this fresh process
        print(json.dumps(child(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        store = os.path.join(tmp, "store.zarr")
        build_store(store, vocab=args.vocab, seq_len=args.seq_len, rows=4 * args.batch_size * args.steps, rps=16,
                    teachers=1)
        results = []
        for mode in MODES:
            cmd = [sys.executable, __file__, "--mode", mode, "--store", store, "--out", os.path.join(tmp, mode),
                   *(f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                     if k not in ("mode", "store", "out") and v is not None)]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results.append(json.loads(out.strip().splitlines()[-1]))
    fused = next(r for r in results if r["mode"] == "fused")
    rows = [[r["mode"], r["peak_above_start_mb"], r["peak_total_mb"],
             fused["peak_above_start_mb"] / r["peak_above_start_mb"], fused["peak_total_mb"] / r["peak_total_mb"],
             r["s_per_step"]] for r in results]
    print(f"Trainer peak memory, V={args.vocab}, {args.batch_size}×{args.seq_len} tokens per step, hidden {args.hidden}, "
          f"{args.layers} layers, {args.steps} steps ({'CUDA' if torch.cuda.is_available() else 'CPU RSS'})")
    print(table(["mode", "peak above start MB", "peak total MB", "fused / this (above)", "fused / this (total)",
                 "s/step"], rows))
    path = write("trainer_memory", {"settings": {k: v for k, v in vars(args).items() if k not in ("mode", "store", "out")},
                                    "modes": MODES, "results": results})
    print(f"→ {path}")


if __name__ == "__main__":
    main()
