"""`chorus blend`: per-domain weights by EM and per-token sharpness, fitted from cached statistics only,
recorded in the store and used by `chorus train` by default."""

from __future__ import annotations

import pytest
import torch
import yaml

from chorus.config import BlendConfig, TrainConfig
from chorus.errors import ChorusError
from chorus.trainer import blend, train
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
    w = blend.fit_domain_weights(lp, domain, 2)
    assert w[0, 0] > 0.7 and w[1, 1] > 0.7
    uniform = torch.full((len(domain), 2), 0.5)
    assert blend.pooled_nll(lp, w[domain]).mean() < blend.pooled_nll(lp, uniform).mean()
    # the fitted weights are a maximum: nudging them either way costs likelihood
    for delta in (-0.05, 0.05):
        moved = (w + torch.tensor([[delta, -delta], [0.0, 0.0]])).clamp(1e-6, 1)
        assert blend.pooled_nll(lp, moved[domain]).mean() >= blend.pooled_nll(lp, w[domain]).mean() - 1e-6


def test_candidates_are_scored_on_positions_they_were_not_fitted_on():
    lp, domain = _specialists()
    ent = torch.rand(len(domain), 2)
    fit = torch.arange(len(domain)) % 2 == 0
    cands = blend.compare(lp, ent, domain, 2, fit)
    assert set(cands) == {"uniform", "per_domain", "confidence", "per_domain_confidence"}
    assert cands["per_domain"]["heldout_nll"] < cands["uniform"]["heldout_nll"]
    for d in (0, 1):
        assert cands["per_domain"]["heldout_nll_per_domain"][d] < cands["uniform"]["heldout_nll_per_domain"][d]
    with pytest.raises(ChorusError, match="held-out positions"):
        blend.compare(lp, ent, domain, 2, torch.ones(len(domain), dtype=torch.bool))


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
