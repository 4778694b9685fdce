"""LoRA students: `chorus train lora=...` trains adapters only on a pretrained checkpoint; the adapters load with
peft onto the untouched base and give the merged model's logits; the merged model evaluates with `chorus eval`;
DistillTrainer trains a PeftModel through the same loss."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("peft")

from chorus import CacheDataset, DistillLoss  # noqa: E402
from chorus.commands import eval as eval_command  # noqa: E402
from chorus.commands import train  # noqa: E402
from chorus.config import EvalConfig, TrainConfig  # noqa: E402
from chorus.errors import ChorusError  # noqa: E402
from tests.conftest import build_tiny_llama  # noqa: E402


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, vocab_size) -> str:
    return build_tiny_llama(str(tmp_path_factory.mktemp("base")), vocab_size, seed=4)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_chorus_train_lora_adapters_load_with_peft_and_merge(teacher_store, pretrained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    cfg = TrainConfig(store=teacher_store, student=pretrained, out=str(out), teachers=["a"], steps=12, batch_size=4,
                      lr=1e-2, warmup_steps=2, eval_rows=16, eval_every=0, save_every=0, log_every=1,
                      lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "up_proj"]})
    res = train.run(cfg)
    final = out / "model"
    assert (final / "adapter" / "adapter_config.json").is_file()
    base = AutoModelForCausalLM.from_pretrained(pretrained)
    ref = {k: v.clone() for k, v in base.state_dict().items()}
    adapted = PeftModel.from_pretrained(base, str(final / "adapter"))
    merged = AutoModelForCausalLM.from_pretrained(final)
    ids = torch.randint(0, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(adapted, ids), _logits(merged, ids), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(_logits(merged, ids), _logits(AutoModelForCausalLM.from_pretrained(pretrained), ids))
    changed = {k for k, v in merged.state_dict().items() if not torch.equal(v, ref[k])}
    assert changed and all(any(m in k for m in ("q_proj", "v_proj", "up_proj")) for k in changed), sorted(changed)[:5]
    evaluated = eval_command.run(EvalConfig(store=teacher_store, model=str(out), teachers=[], max_rows=16))
    assert evaluated["mean"] == pytest.approx(res["eval"]["mean"], rel=1e-5)
    info = json.loads((final / "chorus.json").read_text())
    assert info["config"]["lora"]["r"] == 4


def test_lora_settings_are_checked(teacher_store, pretrained, tmp_path):
    cfg = TrainConfig(store=teacher_store, student=pretrained, out=str(tmp_path / "x"), steps=2, lora={"rank": 4})
    with pytest.raises(ChorusError, match="lora': unknown setting 'rank'"):
        train.run(cfg)
    assert not (tmp_path / "x").exists()


def test_distill_trainer_trains_a_peft_model(teacher_store, pretrained, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, TrainingArguments

    from chorus.hf import DistillTrainer

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(pretrained),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    loss_fn = DistillLoss(teacher_store, ["a", "b"])
    assert loss_fn._splits(model)  # the fused path through a PeftModel
    losses = []

    class Recording(DistillTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss = super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
            losses.append(float(loss.detach()))
            return loss

    args = TrainingArguments(str(tmp_path / "hf"), per_device_train_batch_size=4, max_steps=16, learning_rate=2e-2,
                             save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True)
    trainer = Recording(model=model, args=args, train_dataset=CacheDataset(teacher_store, batch_size=4, teachers=["a", "b"]),
                        distill_loss=loss_fn)
    trainer.train()
    assert sum(losses[-4:]) < sum(losses[:4])
    trainer.save_model(str(tmp_path / "adapter"))
    back = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(pretrained), str(tmp_path / "adapter"))
    ids = torch.randint(0, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(_logits(back, ids), _logits(model, ids), rtol=1e-5, atol=1e-6)
