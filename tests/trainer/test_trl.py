"""TRL's SFTTrainer over chorus's rows and loss: it trains from the cache and its loss falls."""

from __future__ import annotations

import pytest

pytest.importorskip("trl")

from chorus import CacheDataset, DistillLoss  # noqa: E402
from chorus.errors import ChorusError  # noqa: E402
from tests.conftest import build_tiny_llama  # noqa: E402


def test_sft_trainer_distills_from_the_cache(teacher_store, vocab_size, tokenizer_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from chorus.hf import DistillSFTTrainer

    model = AutoModelForCausalLM.from_pretrained(build_tiny_llama(str(tmp_path / "m"), vocab_size, seed=2))
    losses = []

    class Recording(DistillSFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            return loss

    args = SFTConfig(str(tmp_path / "out"), per_device_train_batch_size=4, max_steps=24, learning_rate=3e-3,
                     save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True, max_length=None)
    trainer = Recording(model=model, args=args, processing_class=AutoTokenizer.from_pretrained(tokenizer_dir),
                        train_dataset=CacheDataset(teacher_store, batch_size=4, teachers=["a", "c"]),
                        distill_loss=DistillLoss(teacher_store, ["a", "c"], kd_weight=0.8))
    trainer.train()
    assert len(losses) == 24
    assert sum(losses[-6:]) / 6 < sum(losses[:6]) / 6 - 0.1, losses


def test_sft_trainer_wants_a_cache_dataset(teacher_store, tmp_path):
    from chorus.hf import DistillSFTTrainer

    with pytest.raises(ChorusError, match="train_dataset must be a chorus.CacheDataset"):
        DistillSFTTrainer(model=None, train_dataset=[{"input_ids": [1, 2]}], distill_loss=DistillLoss(teacher_store))
