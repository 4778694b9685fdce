"""The GPU pass's target math (``logit_targets``, straight from the logits) against the float64 truth of realistic
full distributions and against the log-prob reference (``position_targets``), ties and masked logits included."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from chorus.store import TAIL_BETAS
from chorus.teacher.model import chunked_targets
from chorus.teacher.position import (
    chain_powers,
    chain_statistics,
    exp_sums,
    logit_statistics,
    logit_targets,
    position_targets,
    power_plan,
)
from chorus.teacher.sampler import row_uniforms
from tests.store.test_targets import dense_statistics

K, M = 16, 32


def _logits(kind: str, n: int = 256, vocab: int = 5003, seed: int = 0) -> torch.Tensor:
    """Logits over a vocabulary of 78 full blocks of 64 and a short one: the block top-k's path (block_topk)."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gaussian":  # N(0, σ²) logits, σ from flat to peaked across positions
        return torch.randn(n, vocab, generator=g) * torch.linspace(0.5, 6.0, n)[:, None]
    if kind == "zipf":  # log-probs of a Zipf law over a random permutation, as a trained LM's tail falls
        ranks = torch.stack([torch.randperm(vocab, generator=g) for _ in range(n)]).double() + 1.0
        return (-1.1 * ranks.log()).float() + torch.randn(n, 1, generator=g)
    # few distinct values: ties at the k-th logit on most positions
    return torch.randint(0, 6, (n, vocab), generator=g).float()


def _call(fn, x: torch.Tensor, next_ids: torch.Tensor, samples: bool = True) -> dict[str, torch.Tensor]:
    n = x.shape[0]
    last = torch.arange(n) % 64 == 63
    u = row_uniforms(7, 0, 1, n, M) if samples else None
    return fn(x, next_ids, last, u, top_k=K, tail_betas=TAIL_BETAS)


@pytest.mark.parametrize("kind", ["gaussian", "zipf", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chain", [False, True])
def test_logit_targets_equal_the_dense_float64_truth(kind, dtype, chain):
    z = _logits(kind).to(dtype)
    next_ids = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(1))
    got = _call(functools.partial(logit_targets, statistics=chain_statistics if chain else logit_statistics), z, next_ids)
    logp = torch.log_softmax(z.double(), -1).numpy()
    ids = got["topk_ids"].numpy()
    # the top-k: the k largest log-probs (any of tied ones), in descending order, and their values
    want = -np.sort(-logp, axis=-1)[:, :K]
    np.testing.assert_allclose(np.take_along_axis(logp, ids, -1), want, rtol=0, atol=0)
    np.testing.assert_allclose(got["topk_logprobs"].numpy(), want, rtol=2e-6, atol=2e-6)
    assert (np.sort(ids, -1)[:, 1:] != np.sort(ids, -1)[:, :-1]).all()  # no id twice
    truth = dense_statistics(logp, ids, next_ids.numpy(), TAIL_BETAS)
    last = (torch.arange(z.shape[0]) % 64 == 63).numpy()
    truth["gold_logprob"][last] = 0.0
    for f in ("log_tail", "entropy", "gold_logprob", "tail_logz"):
        np.testing.assert_allclose(got[f].numpy(), truth[f], rtol=2e-5, atol=2e-5, err_msg=f)


def test_the_power_chain_covers_the_default_grid_and_leaves_other_betas_their_own_exp():
    assert power_plan(tuple(sorted({1.0, *TAIL_BETAS}))) == (84, {0.25: 21, 1 / 3: 28, 0.5: 42, 2 / 3: 56, 1.0: 84,
                                                                  1 / 0.7: 120, 2.0: 168})
    d, plan = power_plan((0.123456, 0.5, 1.0, 2.0))
    assert (d, plan) == (2, {0.5: 1, 1.0: 2, 2.0: 4})  # 0.123456 is no n/d with n ≤ 192: its own exp


@pytest.mark.parametrize("betas", [tuple(TAIL_BETAS) + (1.0,), (0.123456, 0.5, 1.0, 2.0)])
def test_the_power_chain_equals_float64_exps(betas):
    """exp(β·y) as powers of one exp, against float64 exps, over y from 0 down to where every term underflows and the
    masked value (the lowest float): within 2e-5 relative where the term is a normal float, 0 where it underflows."""
    g = torch.Generator().manual_seed(8)
    y = torch.cat([-torch.rand(4, 4000, generator=g) * torch.tensor([[1.0], [20.0], [100.0], [400.0]]),
                   torch.full((4, 1), torch.finfo(torch.float32).min), torch.zeros(4, 1)], -1).reshape(2, -1)
    got = chain_powers(y, betas)
    sums, moment = exp_sums(y, betas, chain=True)
    np.testing.assert_allclose(moment.double().numpy(), (np.exp(y.double().numpy()) * y.double().numpy()).sum(-1),
                               rtol=2e-6)
    for b in betas:
        want = np.exp(b * y.double().numpy())
        normal = want > 2 * np.finfo(np.float32).tiny
        np.testing.assert_allclose(got[b].double().numpy()[normal], want[normal], rtol=2e-5, atol=0, err_msg=str(b))
        assert (got[b].numpy()[~normal] <= 4 * np.finfo(np.float32).tiny).all() and (got[b] >= 0).all()
        np.testing.assert_allclose(sums[b].double().numpy(), want.sum(-1), rtol=2e-6)  # as the statistics take them


@pytest.mark.parametrize("kind", ["gaussian", "zipf", "ties"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logit_targets_match_the_log_prob_reference(kind, dtype):
    """Same ids but among exact ties, values and statistics within fp32 rounding, and the same draws except where a
    uniform falls within rounding of a CDF boundary."""
    z = _logits(kind, seed=2).to(dtype)
    next_ids = torch.randint(0, z.shape[1], (z.shape[0],), generator=torch.Generator().manual_seed(3))
    got = _call(logit_targets, z, next_ids)
    ref = _call(position_targets, torch.log_softmax(z.float(), -1), next_ids)
    assert sorted(got) == sorted(ref)
    logp = torch.log_softmax(z.double(), -1)
    differ = got["topk_ids"] != ref["topk_ids"]
    assert torch.equal(logp.gather(-1, got["topk_ids"])[differ], logp.gather(-1, ref["topk_ids"])[differ])
    for f in ("topk_logprobs", "log_tail", "entropy", "gold_logprob", "tail_logz"):
        torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-5, msg=f)
    assert (got["draws"] == ref["draws"]).float().mean() > 0.999


@pytest.mark.parametrize("vocab", [300, 5003])
def test_masked_logits_and_an_empty_tail_give_no_nan(vocab):
    z = _logits("gaussian", n=64, vocab=vocab)
    z[:, 100:] = float("-inf")  # a vocabulary the model never scores
    z[:8, K + 1:] = float("-inf")  # only the k+1-th survives
    got = _call(logit_targets, z, torch.zeros(64, dtype=torch.long))
    ref = _call(position_targets, torch.log_softmax(z, -1), torch.zeros(64, dtype=torch.long))
    for f in ("topk_logprobs", "log_tail", "entropy", "tail_logz"):
        assert not got[f].isnan().any(), f
        torch.testing.assert_close(got[f], ref[f], rtol=1e-5, atol=1e-5, msg=f)
    assert (got["draws"] < 100).all()
    z = _logits("gaussian", n=8, vocab=K)  # V = k: nothing left for a tail
    torch.testing.assert_close(_call(logit_targets, z, torch.zeros(8, dtype=torch.long)),
                               _call(position_targets, torch.log_softmax(z, -1), torch.zeros(8, dtype=torch.long)))


@pytest.mark.parametrize("kind", ["gaussian", "zipf", "ties"])
@pytest.mark.parametrize("vocab,k", [(5003, 17), (4160, 9), (20000, 65), (1000, 65)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_topk_is_topk(kind, vocab, k, dtype):
    """The top-k among the blocks with the largest maxima: torch.topk's values, bit for bit, and its ids but among
    exact ties — with a short last block, without one, with rows that hold fewer finite logits than k (masked
    vocabulary) and with few blocks (then torch.topk itself)."""
    from chorus.teacher.position import block_topk
    from chorus.teacher.sampler import block_stats

    z = _logits(kind, n=64, vocab=vocab, seed=8).to(dtype)
    z[:4, 10:] = float("-inf")  # fewer than k finite logits
    z[4:8, :-3] = float("-inf")  # only the last block's
    z[8:12, 64 * 5: 64 * 7] += 50.0  # the top-k all in two blocks
    v, i = block_topk(z, block_stats(z, sums=False)[0], k)
    want_v, want_i = torch.topk(z, k, dim=-1)
    assert torch.equal(v, want_v)
    assert i.dtype == torch.int64 and ((i >= 0) & (i < vocab)).all()
    assert (i.sort(-1).values.diff(dim=-1) > 0).all()  # no id twice
    assert torch.equal(z.gather(-1, i), want_v)  # the ids hold those values: any of tied ones
    unique = (z[:, None, :] == want_v[:, :, None]).sum(-1) == 1  # a value no other logit of the row holds
    assert unique.float().mean() > (0 if kind == "ties" else 0.1 if dtype == torch.bfloat16 else 0.75)  # the masked rows: ties at −inf
    assert torch.equal(i[unique], want_i[unique])


def _assert_same_targets(got: dict, want: dict, what) -> None:
    """Ids and draws the same bits; values and statistics within fp32 rounding (a reduction over V may be split
    another way for another number of rows: seen on a 16-core CPU, for 1 row against 3)."""
    for k in want:
        if k in ("topk_ids", "draws"):
            assert torch.equal(got[k], want[k]), (what, k)
        else:
            torch.testing.assert_close(got[k], want[k], rtol=2e-6, atol=2e-6, msg=f"{what} {k}")


def test_chunked_targets_from_logits_do_not_depend_on_the_chunk():
    """The GPU pass's property, on a CPU: a position's targets are the same whatever chunk it shares with which
    positions (its sampled ids the same bits)."""
    g = torch.Generator().manual_seed(4)
    hidden, weight = torch.randn(3, 100, 32, generator=g), torch.randn(900, 32, generator=g) * 0.5
    ids = torch.randint(0, 900, (3, 100), generator=g)
    kw = dict(top_k=K, num_samples=M, seed=1, row_start=4, tail_betas=TAIL_BETAS, from_logits=True)
    whole = chunked_targets(hidden, weight, None, ids, chunk_size=512, **kw)
    for chunk in (64, 128):
        _assert_same_targets(chunked_targets(hidden, weight, None, ids, chunk_size=chunk, **kw), whole, chunk)
    rows = [chunked_targets(hidden[r:r + 1], weight, None, ids[r:r + 1], chunk_size=64,
                            **{**kw, "row_start": 4 + r}) for r in range(3)]
    _assert_same_targets({k: torch.cat([r[k] for r in rows]) for k in whole}, whole, "rows one by one")


def test_compiled_logit_statistics_give_the_same_targets():
    """What a GPU runs by default (the statistics through torch.compile), here on a CPU: same ids, top-k and draws
    within fp32 rounding of the eager function (the compiler reorders the sums)."""
    from chorus.teacher.position import compiled_targets, logit_statistics

    z = _logits("zipf", n=128, vocab=3000, seed=5)
    next_ids = torch.randint(0, 3000, (128,), generator=torch.Generator().manual_seed(6))
    eager = _call(logit_targets, z, next_ids)
    compiled = compiled_targets(logit_statistics)
    got = _call(lambda *a, **kw: logit_targets(*a, statistics=compiled, **kw), z, next_ids)
    assert not compiled.failed  # else this machine has no working compiler (the fallback is tested elsewhere)
    assert torch.equal(got["topk_ids"], eager["topk_ids"]) and torch.equal(got["draws"], eager["draws"])
    for f in ("topk_logprobs", "log_tail", "entropy", "gold_logprob", "tail_logz"):
        torch.testing.assert_close(got[f], eager[f], rtol=1e-5, atol=1e-5, msg=f)


@pytest.mark.parametrize("block", [64, 1024])
def test_two_level_draws_are_the_inverse_cdf_of_the_full_distribution(block):
    """Against a float64 inverse CDF of a Zipf-like distribution over 5000 tokens (a short last block; masked ids
    never drawn): the same token for every draw whose uniform is not within rounding of a boundary, and counts that
    fit the probabilities (chi-square)."""
    from chorus.teacher.sampler import block_stats, draw_ids_blocked, scale_block_sums

    v, n, m = 5000, 512, 64
    rng = np.random.default_rng(1)
    p = 1.0 / (np.arange(v) + 2.7) ** 1.1
    p[rng.choice(v, 500, replace=False)] = 0.0  # a vocabulary the model never scores: −inf logits
    p = rng.permutation(p / p.sum())
    with np.errstate(divide="ignore"):
        z = torch.from_numpy(np.log(p) + 3.0).float().expand(n, v).contiguous()
    u = row_uniforms(5, 0, 1, n, m)
    mx = z.amax(-1, keepdim=True)
    got = draw_ids_blocked(z, mx, u, scale_block_sums(*block_stats(z, block), mx), block).numpy().reshape(-1)
    assert (p[got] > 0).all()
    cdf = np.cumsum(p)
    uu = u.double().numpy().reshape(-1)
    want = np.minimum(np.searchsorted(cdf, uu * cdf[-1], side="right"), v - 1)
    differ = got != want
    assert differ.mean() < 1e-3
    assert (np.abs(cdf[np.minimum(got, want)[differ]] - uu[differ]) < 1e-5).all()  # only at a boundary
    counts = np.bincount(got, minlength=v)
    top = np.argsort(-p)[:200]
    expected = p[top] * got.size
    chi2 = ((counts[top] - expected) ** 2 / expected).sum()
    assert chi2 < 200 + 6 * (2 * 200) ** 0.5, chi2
