"""Distill a student from cached teachers with Hugging Face's Trainer.

    python examples/hf_trainer.py --store store.zarr --student path/to/model --teachers code,prose --out run
"""

import argparse

from transformers import AutoModelForCausalLM, TrainingArguments

from chorus import CacheDataset, DistillLoss
from chorus.hf import DistillTrainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--teachers", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    teachers = [t for t in args.teachers.split(",") if t]

    model = AutoModelForCausalLM.from_pretrained(args.student)
    trainer = DistillTrainer(
        model=model,
        args=TrainingArguments(args.out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=1e-3,
                               logging_steps=50, save_strategy="no", report_to=[]),
        train_dataset=CacheDataset(args.store, teachers=teachers, batch_size=8),
        distill_loss=DistillLoss(args.store, teachers, kd_weight=0.9),
    )
    result = trainer.train()
    trainer.save_model(args.out)
    return result.metrics


if __name__ == "__main__":
    main()
