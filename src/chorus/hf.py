"""chorus caches in Hugging Face ``Trainer`` and TRL's ``SFTTrainer``: the dataset, the collator, the loss.

    from chorus import CacheDataset, DistillLoss
    from chorus.hf import DistillTrainer

    rows = CacheDataset("store.zarr", teachers=["code", "prose"], batch_size=8)
    loss = DistillLoss("store.zarr", teachers=["code", "prose"])      # `chorus train`'s loss and its stored blend
    args = TrainingArguments("out", per_device_train_batch_size=8, max_steps=1000)
    DistillTrainer(model=model, args=args, train_dataset=rows, distill_loss=loss).train()

The trainer reads the rows in :class:`~chorus.student.dataset.CacheDataset`'s order (each rank its own slice: the
loader does not split them again), batches them with :func:`~chorus.student.dataset.collate`, and replaces the
model's own loss by :class:`~chorus.student.loss.DistillLoss`: the fused chunked path (no (N, V) logits) whenever the
model's logits are exactly its LM head's. The loss is the token mean over the whole optimizer step (every
micro-batch of a gradient-accumulation step weighs what its tokens weigh), as in `chorus train`.
:func:`train_optimizers` gives `chorus train`'s AdamW and warmup + cosine schedule, for runs that must match it.
``DistillSFTTrainer`` (``pip install chorus[trl]``) is the same over TRL's ``SFTTrainer``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader
from transformers import Trainer

from chorus.config import TrainConfig
from chorus.errors import ChorusError
from chorus.student.dataset import CacheDataset, collate
from chorus.student.loss import DistillLoss
from chorus.student.training import lr_lambda, make_optimizer

__all__ = ["DistillTrainer", "DistillSFTTrainer", "train_optimizers"]


def train_optimizers(model: torch.nn.Module, *, steps: int, lr: float = 3e-4, warmup_steps: int = 50,
                     min_lr_ratio: float = 0.1, weight_decay: float = 0.1):
    """(optimizer, scheduler) exactly as `chorus train` builds them: AdamW (0.9, 0.95) with weight decay on
    matrices only, linear warmup then cosine decay to ``min_lr_ratio`` of the peak. Pass as ``optimizers=``."""
    cfg = TrainConfig(store="-", student="-", out="-", steps=steps, lr=lr, warmup_steps=warmup_steps,
                      min_lr_ratio=min_lr_ratio, weight_decay=weight_decay)
    optimizer = make_optimizer(model, cfg)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))


class _Distill:
    """What both trainers share: chorus's rows, batches and loss in place of the model's own."""

    def _chorus_init(self, distill_loss: DistillLoss | None) -> None:
        if not isinstance(distill_loss, DistillLoss):
            raise ChorusError("distill_loss: pass a chorus.DistillLoss (the store, its teachers and the loss "
                              "settings), e.g. DistillLoss('store.zarr', teachers=['a', 'b'])")
        self.distill_loss = distill_loss
        self.model_accepts_loss_kwargs = True  # the Trainer counts the step's tokens (shift_labels) for the loss
        ds = self.train_dataset
        if isinstance(ds, CacheDataset) and ds.batch_size != self.args.per_device_train_batch_size:
            raise ChorusError(f"the CacheDataset was made with batch_size {ds.batch_size} but the trainer's "
                              f"per_device_train_batch_size is {self.args.per_device_train_batch_size}; make them equal "
                              "(the dataset's order is defined batch by batch)")

    def get_train_dataloader(self) -> DataLoader:
        ds = self.train_dataset
        if not isinstance(ds, CacheDataset):
            return super().get_train_dataloader()  # type: ignore[misc]
        # not through accelerate: under torchrun the dataset already yields this rank's rows only
        return DataLoader(ds, batch_size=ds.batch_size, collate_fn=collate, num_workers=0,
                          pin_memory=self.args.dataloader_pin_memory and torch.cuda.is_available())

    def compute_loss(self, model: torch.nn.Module, inputs: dict, return_outputs: bool = False,
                     num_items_in_batch: Any = None):
        loss, parts = self.distill_loss(model, inputs)
        if num_items_in_batch is not None:  # the micro-batch's token mean → its share of the step's token mean
            mine = (inputs["shift_labels"] != -100).sum()
            total = num_items_in_batch.clamp_min(1) if torch.is_tensor(num_items_in_batch) else max(num_items_in_batch, 1)
            loss = loss * mine / total
        return (loss, parts) if return_outputs else loss


class DistillTrainer(_Distill, Trainer):
    """``transformers.Trainer`` distilling from cached teachers: ``train_dataset`` a
    :class:`~chorus.student.dataset.CacheDataset`, ``distill_loss`` a :class:`~chorus.student.loss.DistillLoss`."""

    def __init__(self, *args: Any, distill_loss: DistillLoss | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("data_collator", collate)
        super().__init__(*args, **kwargs)
        self._chorus_init(distill_loss)


def __getattr__(name: str) -> Any:
    if name == "DistillSFTTrainer":  # built on first use: trl is an optional extra
        global DistillSFTTrainer
        DistillSFTTrainer = _sft_trainer()
        return DistillSFTTrainer
    raise AttributeError(name)


def _sft_trainer() -> type:
    try:
        from datasets import Dataset
        from trl import SFTTrainer
    except ImportError:
        raise ChorusError("DistillSFTTrainer needs TRL: pip install 'chorus[trl]'") from None

    class DistillSFTTrainer(_Distill, SFTTrainer):
        """TRL's ``SFTTrainer`` distilling from cached teachers (``train_dataset`` a CacheDataset, already
        tokenized and packed by `chorus prepare`, so TRL's own dataset preparation is skipped)."""

        def __init__(self, *args: Any, train_dataset: CacheDataset, distill_loss: DistillLoss | None = None,
                     **kwargs: Any) -> None:
            if not isinstance(train_dataset, CacheDataset):
                raise ChorusError("DistillSFTTrainer: train_dataset must be a chorus.CacheDataset")
            sft_args = kwargs.get("args")
            if sft_args is not None:
                sft_args.dataset_kwargs = {**(sft_args.dataset_kwargs or {}), "skip_prepare_dataset": True}
                sft_args.remove_unused_columns = False
            kwargs.setdefault("data_collator", collate)
            # TRL checks its dataset's type and columns at construction: a one-row stand-in, replaced at once
            super().__init__(*args, train_dataset=Dataset.from_dict({"input_ids": [[0]]}), **kwargs)
            self.train_dataset = train_dataset
            self._chorus_init(distill_loss)

    return DistillSFTTrainer
