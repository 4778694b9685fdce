"""Distill a student from cached teachers in a plain PyTorch loop.

    python examples/plain_loop.py --store store.zarr --student path/to/model --teachers code,prose --steps 200
"""

import argparse

import torch
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from chorus import CacheDataset, DistillLoss, collate


def main(argv=None) -> list[float]:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--teachers", default="")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    args = p.parse_args(argv)
    teachers = [t for t in args.teachers.split(",") if t]

    model = AutoModelForCausalLM.from_pretrained(args.student)
    rows = CacheDataset(args.store, teachers=teachers, batch_size=args.batch_size)  # chorus train's order
    loss_fn = DistillLoss(args.store, teachers, kd_weight=0.9)  # chorus train's loss (and the store's blend)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    losses = []
    for step, batch in zip(range(args.steps), DataLoader(rows, batch_size=args.batch_size, collate_fn=collate)):
        loss, parts = loss_fn(model, batch)  # fused: no (tokens × vocabulary) logits are kept
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.4f} (ce {parts['ce'].item():.4f}, kd {parts['kd'].item():.4f})")
    return losses


if __name__ == "__main__":
    main()
