"""Distill a student from cached teachers with TRL's SFTTrainer (pip install 'chorus[trl]').

    python examples/trl_sft.py --store store.zarr --student path/to/model --tokenizer path/to/tokenizer \
        --teachers code,prose --out run
"""

import argparse

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig

from chorus import CacheDataset, DistillLoss
from chorus.hf import DistillSFTTrainer


def main(argv=None) -> dict:
    p = argparse.ArgumentParser()
    p.add_argument("--store", required=True)
    p.add_argument("--student", required=True)
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--teachers", default="")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    teachers = [t for t in args.teachers.split(",") if t]

    trainer = DistillSFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(args.student),
        processing_class=AutoTokenizer.from_pretrained(args.tokenizer),
        args=SFTConfig(args.out, per_device_train_batch_size=8, max_steps=args.steps, learning_rate=1e-3,
                       logging_steps=50, save_strategy="no", report_to=[], max_length=None,
                       use_cpu=not torch.cuda.is_available()),
        train_dataset=CacheDataset(args.store, teachers=teachers, batch_size=8),
        distill_loss=DistillLoss(args.store, teachers, kd_weight=0.9),
    )
    result = trainer.train()
    trainer.save_model(args.out)
    return result.metrics


if __name__ == "__main__":
    main()
