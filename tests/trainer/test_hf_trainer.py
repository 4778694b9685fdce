"""The public API in Hugging Face's Trainer reproduces `chorus train` step for step: same rows, same loss, same
optimizer → the same per-step losses (CE only, KD from one teacher, KD from three pooled by a stored blend)."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from chorus import CacheDataset, DistillLoss
from chorus.commands import train
from chorus.config import TrainConfig
from chorus.errors import ChorusError
from chorus.hf import DistillTrainer, train_optimizers
from chorus.store import BLEND_KEY, Store
from tests.conftest import build_tiny_llama
from tests.trainer.conftest import copy_store

STEPS = 20


@pytest.fixture(scope="module")
def blend_store(tmp_path_factory, teacher_store) -> str:
    """The three synthetic teachers with a fitted blend that weighs them differently in every domain."""
    url = copy_store(teacher_store, tmp_path_factory.mktemp("blend") / "store.zarr")
    store = Store.open(url, "a")
    domains = store.manifest.domains
    store.group.attrs[BLEND_KEY] = {
        "teachers": ["a", "b", "c"], "operator": "mixture", "choice": "test", "weighting": "confidence", "beta": 2.0,
        "domain_weights": {d: {"a": 1.0 + i, "b": 0.5, "c": 3.0 - i} for i, d in enumerate(domains)}}
    return url


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory, vocab_size) -> str:
    return build_tiny_llama(str(tmp_path_factory.mktemp("student")), vocab_size, seed=11)


def _chorus_losses(run: Path) -> list[float]:
    with open(run / "metrics.csv", newline="") as f:
        return [float(r["loss"]) for r in csv.DictReader(f) if r["loss"]]


class _Recording(DistillTrainer):
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        self.losses.append(float(loss.detach()))
        return loss


def _hf_losses(cfg: TrainConfig, student_dir: str, out: Path, **loss_settings) -> list[float]:
    from transformers import AutoModelForCausalLM, TrainingArguments

    model = AutoModelForCausalLM.from_pretrained(student_dir)
    args = TrainingArguments(str(out), per_device_train_batch_size=cfg.batch_size, max_steps=cfg.steps,
                             gradient_accumulation_steps=cfg.grad_accum,
                             max_grad_norm=cfg.clip, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             seed=cfg.seed, disable_tqdm=True)
    trainer = _Recording(model=model, args=args, train_dataset=CacheDataset.from_config(cfg),
                         distill_loss=DistillLoss(cfg.store, cfg.teachers, **loss_settings),
                         optimizers=train_optimizers(model, steps=cfg.steps, lr=cfg.lr, warmup_steps=cfg.warmup_steps,
                                                     min_lr_ratio=cfg.min_lr_ratio, weight_decay=cfg.weight_decay))
    trainer.losses = []
    trainer.train()
    # each micro-batch's share of its step's token mean: a step's loss is the sum over its micro-batches
    return [sum(trainer.losses[i: i + cfg.grad_accum]) for i in range(0, len(trainer.losses), cfg.grad_accum)]


@pytest.mark.parametrize("teachers, accum", [([], 1), (["a"], 1), (["a", "b", "c"], 1), (["a", "b", "c"], 2)],
                         ids=["ce", "kd-one", "kd-three-blend", "kd-three-blend-accum2"])
def test_hf_trainer_reproduces_chorus_train_step_for_step(blend_store, student_dir, tmp_path, teachers, accum):
    cfg = TrainConfig(store=blend_store, student=student_dir, out=str(tmp_path / "chorus"), teachers=teachers,
                      steps=STEPS, grad_accum=accum, batch_size=4, lr=3e-3, warmup_steps=3, eval_rows=0, save_every=0, log_every=1,
                      kd_weight=0.7, temperature=1.5 if teachers else 1.0)
    train.run(cfg)
    ref = _chorus_losses(tmp_path / "chorus")
    kw = {"kd_weight": cfg.kd_weight, "temperature": cfg.temperature}
    got = _hf_losses(cfg, student_dir, tmp_path / "hf", **kw)
    assert len(ref) == len(got) == STEPS
    assert got == pytest.approx(ref, rel=1e-5, abs=0)
    assert ref[-1] < ref[0]  # it learned something, so the steps differ from one another


def test_the_loss_refuses_what_chorus_train_refuses(blend_store):
    with pytest.raises(ChorusError, match="unbiased only for forward KL"):
        DistillLoss(blend_store, ["b"], target="samples", loss="reverse_kl")
    with pytest.raises(ChorusError, match="unknown loss setting 'kd_wieght'"):
        DistillLoss(blend_store, ["a"], kd_wieght=0.5)
    with pytest.raises(ChorusError, match="no teacher 'zz'"):
        DistillLoss(blend_store, ["zz"])


def test_hidden_state_and_logit_paths_agree(blend_store, student_dir):
    """The fused path (hidden states + LM head, chunked) and the logits path give the same loss and gradients."""
    from transformers import AutoModelForCausalLM

    from chorus import collate

    loss_fn = DistillLoss(blend_store, ["a", "b", "c"], kd_weight=0.5, chunk_size=7)
    rows = CacheDataset(blend_store, batch_size=4, teachers=["a", "b", "c"])
    batch = collate([r for _, r in zip(range(4), rows)])
    model = AutoModelForCausalLM.from_pretrained(student_dir)
    assert loss_fn._splits(model)
    fused, _ = loss_fn(model, batch)
    fused.backward()
    g_fused = model.lm_head.weight.grad.clone()
    model.zero_grad()
    plain, _ = loss_fn.from_logits(model(input_ids=batch["input_ids"],
                                         attention_mask=(batch["segment_ids"] > 0).long()).logits, batch)
    plain.backward()
    assert float(fused.detach()) == pytest.approx(float(plain.detach()), rel=1e-6)
    torch.testing.assert_close(g_fused, model.lm_head.weight.grad, rtol=1e-5, atol=1e-7)


def test_collated_rows_are_chorus_train_batches(blend_store):
    """Rows re-batched by the collator are the loader's batches, bit for bit, in order."""
    from chorus import collate

    rows = CacheDataset(blend_store, batch_size=3, teachers=["a", "b"], seed=5)
    ref = CacheDataset(blend_store, batch_size=3, teachers=["a", "b"], seed=5).batches()
    it = iter(rows)
    for _ in range(6):
        got, want = collate([next(it) for _ in range(3)]), next(ref)
        for k in ("input_ids", "segment_ids", "domain", "row"):
            assert torch.equal(got[k], want[k]), k
        for t in ("a", "b"):
            for k, v in want["teachers"][t].items():
                assert torch.equal(got["teachers"][t][k], v), (t, k)


def test_batch_size_mismatch_is_refused(blend_store, student_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    args = TrainingArguments(str(tmp_path), per_device_train_batch_size=8, max_steps=1, report_to=[], use_cpu=True)
    with pytest.raises(ChorusError, match="batch_size 4 but the trainer's per_device_train_batch_size is 8"):
        DistillTrainer(model=AutoModelForCausalLM.from_pretrained(student_dir), args=args,
                       train_dataset=CacheDataset(blend_store, batch_size=4), distill_loss=DistillLoss(blend_store))


def test_dataset_resumes_from_its_state_and_ranks_split_each_global_batch(blend_store):
    """A dataset restored from its state after n batches yields what an uninterrupted one yields next; two ranks'
    batches j, side by side, are the one-rank batch j of twice the size."""
    def batches(ds, n):
        it = ds.batches()
        return [next(it) for _ in range(n)]

    whole = batches(CacheDataset(blend_store, batch_size=2, teachers=["a"], seed=3), 7)
    first = CacheDataset(blend_store, batch_size=2, teachers=["a"], seed=3)
    batches(first, 4)
    again = CacheDataset(blend_store, batch_size=2, teachers=["a"], seed=3)
    again.load_state_dict(first.state_dict())
    for got, want in zip(batches(again, 3), whole[4:]):
        assert torch.equal(got["row"], want["row"]) and torch.equal(got["input_ids"], want["input_ids"])
    one = batches(CacheDataset(blend_store, batch_size=4, teachers=["a"], seed=3, world_size=1, rank=0), 3)
    ranks = [batches(CacheDataset(blend_store, batch_size=2, teachers=["a"], seed=3, world_size=2, rank=r), 3)
             for r in (0, 1)]
    for j in range(3):
        assert torch.equal(torch.cat([ranks[0][j]["row"], ranks[1][j]["row"]]), one[j]["row"])
