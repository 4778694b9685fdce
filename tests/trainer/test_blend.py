"""`chorus blend`: per-domain weights by EM and per-token sharpness, fitted from cached statistics only,
recorded in the store and used by `chorus train` by default."""

from __future__ import annotations

import pytest
import torch
import yaml

from chorus.commands import blend, train
from chorus.config import BlendConfig, TrainConfig
from chorus.distill.blend import compare, fit_domain_weights, pooled_nll
from chorus.errors import ChorusError
from chorus.store import Store
from tests.trainer.conftest import bigram_teacher, copy_store, student_yaml, write_teacher


def _specialists(n: int = 6000, seed: int = 0):
    """Gold log-probs of two teachers over two domains: teacher 0 knows domain 0 (p(g) ~ 0.5, the other
    ~ 0.01), teacher 1 domain 1, and each is right on the other's domain 20 % of the time."""
    g = torch.Generator().manual_seed(seed)
    domain = torch.randint(0, 2, (n,), generator=g)
    good = torch.full((n,), 0.5)
    bad = torch.where(torch.rand(n, generator=g) < 0.2, 0.5, 0.01)
    p0 = torch.where(domain == 0, good, bad)
    p1 = torch.where(domain == 1, good, bad)
    return torch.stack([p0, p1], -1).log(), domain


def test_em_routes_each_domain_to_its_specialist_and_never_loses_likelihood():
    lp, domain = _specialists()
    w = fit_domain_weights(lp, domain, 2)
    assert w[0, 0] > 0.7 and w[1, 1] > 0.7
    uniform = torch.full((len(domain), 2), 0.5)
    assert pooled_nll(lp, w[domain]).mean() < pooled_nll(lp, uniform).mean()
    # the fitted weights are a maximum: nudging them either way costs likelihood
    for delta in (-0.05, 0.05):
        moved = (w + torch.tensor([[delta, -delta], [0.0, 0.0]])).clamp(1e-6, 1)
        assert pooled_nll(lp, moved[domain]).mean() >= pooled_nll(lp, w[domain]).mean() - 1e-6


def test_candidates_are_scored_on_positions_they_were_not_fitted_on():
    lp, domain = _specialists()
    signals = {"confidence": -torch.rand(len(domain), 2)}
    fit = torch.arange(len(domain)) % 2 == 0
    cands = compare(lp, signals, domain, 2, fit)
    assert set(cands) == {"uniform", "per_domain", "confidence", "per_domain_confidence"}
    assert cands["per_domain"]["heldout_nll"] < cands["uniform"]["heldout_nll"]
    for d in (0, 1):
        assert cands["per_domain"]["heldout_nll_per_domain"][d] < cands["uniform"]["heldout_nll_per_domain"][d]
    with pytest.raises(ChorusError, match="held-out positions"):
        compare(lp, signals, domain, 2, torch.ones(len(domain), dtype=torch.bool))


def test_context_weights_read_only_the_document_so_far():
    """Position j's weight uses the gold log-probs of positions i < j in its own segment, nothing else."""
    from chorus.distill.targets import context_loglik

    seg = torch.tensor([[1, 1, 1, 2, 2, 0]])
    lp = torch.tensor([[-1.0, -2.0, -3.0, -4.0, -5.0, -9.0]])
    batch = {"segment_ids": seg, "teachers": {"a": {"gold_logprob": lp}, "b": {"gold_logprob": 2 * lp}}}
    ctx = context_loglik(batch, ["a", "b"], torch.arange(5))
    torch.testing.assert_close(ctx[:, 0], torch.tensor([0.0, -1.0, -3.0, 0.0, -4.0]))
    torch.testing.assert_close(ctx[:, 1], 2 * ctx[:, 0])


def test_context_routing_beats_uniform_without_domain_labels():
    """Documents of two kinds, one domain label: the context posterior finds each document's specialist."""
    g = torch.Generator().manual_seed(0)
    docs, length = 200, 30
    kind = torch.randint(0, 2, (docs,), generator=g)
    good = torch.log(torch.full((docs, length), 0.5))
    bad = torch.log(torch.where(torch.rand(docs, length, generator=g) < 0.2, 0.5, 0.02))
    lp = torch.stack([torch.where(kind[:, None] == 0, good, bad), torch.where(kind[:, None] == 1, good, bad)], -1)
    ctx = torch.cat([torch.zeros(docs, 1, 2), lp.cumsum(1)[:, :-1]], 1)  # Σ over earlier positions
    flat_lp, flat_ctx = lp.reshape(-1, 2), ctx.reshape(-1, 2)
    domain = torch.zeros(len(flat_lp), dtype=torch.long)
    fit = torch.arange(len(flat_lp)) % 2 == 0
    cands = compare(flat_lp, {"context": flat_ctx}, domain, 1, fit)
    assert cands["context"]["heldout_nll"] < cands["uniform"]["heldout_nll"] - 0.5
    assert cands["context"]["beta"] > 0


def test_blend_is_recorded_and_train_uses_it_unless_told_otherwise(tmp_path, prepared_store, vocab_size):
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    write_teacher(url, "a", bigram_teacher(vocab_size, seed=1), top_k=8)
    write_teacher(url, "b", bigram_teacher(vocab_size, seed=2, sharpness=1.0), top_k=8)
    record = blend.run(BlendConfig(store=url))
    assert record["teachers"] == ["a", "b"] and record["choice"] in record["report"]["heldout_nll"]
    best = record["report"]["heldout_nll"][record["choice"]]
    assert best <= record["report"]["heldout_nll"]["uniform"]
    student = student_yaml(tmp_path / "student.yaml")
    base = dict(store=url, student=student, teachers=["a", "b"], steps=1, batch_size=4, eval_every=0, eval_rows=8)
    train.run(TrainConfig(out=str(tmp_path / "run"), **base))
    used = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert used["domain_weights"] == record["domain_weights"]
    train.run(TrainConfig(out=str(tmp_path / "raw"), blend=False, **base))
    assert yaml.safe_load((tmp_path / "raw" / "config.yaml").read_text())["domain_weights"] == {}
    with pytest.raises(ChorusError, match="at least two complete teachers"):
        blend.run(BlendConfig(store=url, teachers=["a"]))


def test_two_specialists_beat_plain_training_on_a_corpus_without_domains(tmp_path, documents, tokenizer_dir,
                                                                        prepared_store):
    """Two tiny specialists (code, prose), trained by `chorus train` on their domain of the labelled store,
    are cached into a store of the same text with no domain field; `chorus blend` + `chorus train --teachers
    a,b` (defaults otherwise) gives a better held-out student than CE alone on the same rows and steps."""
    import json

    from chorus.commands import eval as evaluate
    from chorus.commands import prepare
    from chorus.config import EvalConfig, PrepareConfig
    from tests.trainer.conftest import cache_teacher

    corpus = tmp_path / "plain.jsonl"
    corpus.write_text("".join(json.dumps({"text": d["text"]}) + "\n" for d in documents if d["domain"] != "names"))
    plain = str(tmp_path / "plain.zarr")
    prepare.run(PrepareConfig(dataset=str(corpus), tokenizer=tokenizer_dir, out=plain, seq_len=32, valid_fraction=0.2,
                              rows_per_shard=16))
    assert len(Store.open(plain, "r").manifest.domains) == 1
    teacher_yaml = student_yaml(tmp_path / "teacher.yaml", hidden=64, layers=2)
    small = student_yaml(tmp_path / "student.yaml", hidden=32, layers=1)
    for name, domain in (("a", "code"), ("b", "prose")):
        train.run(TrainConfig(store=prepared_store, student=teacher_yaml, out=str(tmp_path / name), steps=120,
                              batch_size=8, lr=1e-2, warmup_steps=10, eval_every=0, eval_rows=8, train_domains=[domain]))
        cache_teacher(plain, name, str(tmp_path / name / "model"), tokenizer_dir, top_k=16)
    record = blend.run(BlendConfig(store=plain))
    assert record["weighting"] != "none"  # one domain: only per-token routing can tell the documents apart
    base = dict(store=plain, student=small, steps=60, batch_size=8, lr=1e-2, warmup_steps=5, eval_every=0,
                eval_rows=8, train_rows=24, seed=0)
    train.run(TrainConfig(out=str(tmp_path / "ce"), **base))
    train.run(TrainConfig(out=str(tmp_path / "kd"), teachers=["a", "b"], kd_weight=0.8, **base))
    ce, kd = (evaluate.run(EvalConfig(store=plain, model=str(tmp_path / r), teachers=[]))["mean"] for r in ("ce", "kd"))
    print(f"blend {record['choice']}: KD {kd:.4f} vs CE {ce:.4f}")
    assert kd < ce, (kd, ce)
