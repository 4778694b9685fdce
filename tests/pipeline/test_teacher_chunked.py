"""The chunked teacher pass: the LM head over chunks of positions gives the full-logits targets, bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from chorus.errors import ChorusError
from chorus.teacher.model import (
    Teacher,
    chunked_targets,
    logit_ops,
    sparse_targets,
)
from chorus.teacher.position import compiled_targets
from chorus.teacher.sampler import _mix32, check_sampler, draw_ids, row_keys, row_uniforms

VOCAB = 1000
BETAS = (0.25, 0.5, 1.0, 2.0)
ARGS = {"top_k": 8, "num_samples": 16, "seed": 3, "tail_betas": BETAS}


def _teacher(model: torch.nn.Module, dtype=torch.float32, vocab: int = VOCAB) -> Teacher:
    model = model.to(dtype).eval().requires_grad_(False)
    return Teacher(model, torch.device("cpu"), dtype, vocab, "tiny", "local", "fp", "tokenizer")


def _llama(padded: int = 24, **extra) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB + padded, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=256, **extra)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # peaked distributions: top-k and tail both matter
        model.lm_head.weight[VOCAB:, 0] = 50.0  # padded rows would dominate the softmax if they were kept
    return model


def _reference(t: Teacher, x: torch.Tensor, row_start: int = 0) -> dict[str, torch.Tensor]:
    with torch.inference_mode():
        return sparse_targets(t.logits(x), x, row_start=row_start, **ARGS)


def _chunked(t: Teacher, x: torch.Tensor, chunk: int | None, row_start: int = 0) -> dict[str, torch.Tensor]:
    t.chunk_size = chunk
    with torch.inference_mode():
        return t.targets(x, row_start=row_start, **ARGS)


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert torch.equal(a[k].long() if k in ("topk_ids", "draws") else a[k],
                           b[k].long() if k in ("topk_ids", "draws") else b[k]), k


@pytest.mark.parametrize("chunk", [1, 7, 64, 100, 192, None])
def test_chunked_targets_equal_full_logits_targets_bit_for_bit(chunk):
    t = _teacher(_llama())
    x = torch.randint(0, VOCAB, (3, 100), generator=torch.Generator().manual_seed(1))
    got = _chunked(t, x, chunk, row_start=5)
    assert got["topk_ids"].dtype == torch.int32 and got["draws"].dtype == torch.int32  # downcast on the device
    assert int(got["topk_ids"].max()) < VOCAB and int(got["draws"].max()) < VOCAB
    _assert_equal(got, _reference(t, x, row_start=5))


def test_the_reused_head_buffer_changes_no_bit_and_leaves_other_modes_alone():
    """On a CPU the head's output goes into a buffer the teacher keeps (inference mode only: it is an inference
    tensor): a second batch, another chunk size and a call under no_grad give the same targets as fresh buffers."""
    t = _teacher(_llama())
    x = torch.randint(0, VOCAB, (2, 100), generator=torch.Generator().manual_seed(3))
    first = _chunked(t, x, 64)
    assert t.scratch  # kept for the next call
    _chunked(t, torch.randint(0, VOCAB, (3, 90), generator=torch.Generator().manual_seed(4)), 64)  # other data
    _assert_equal(_chunked(t, x, 64), first)  # through the reused buffer
    _assert_equal(_chunked(t, x, 128), first)
    with torch.no_grad():  # outside inference mode: plain F.linear (no inference tensor written in place)
        _assert_equal(t.targets(x, row_start=0, **ARGS), first)
    _assert_equal(_chunked(_teacher(t.model), x, 64), first)  # a new teacher: a new buffer


def test_chunked_targets_in_bf16_match_the_full_logits_targets():
    t = _teacher(_llama(), torch.bfloat16)
    x = torch.randint(0, VOCAB, (2, 96), generator=torch.Generator().manual_seed(2))
    ref = _reference(t, x)
    for chunk in (64, None):
        got = _chunked(t, x, chunk)
        # bf16 logits carry ~3 significant digits; the chunked head must agree to fp16 rounding of the log-probs
        torch.testing.assert_close(got["topk_logprobs"], ref["topk_logprobs"], rtol=1e-3, atol=1e-3)
        assert (got["topk_ids"].long() == ref["topk_ids"]).float().mean() > 0.99
        for k in ("log_tail", "entropy", "gold_logprob", "tail_logz"):
            torch.testing.assert_close(got[k], ref[k], rtol=1e-3, atol=1e-3)


def test_sampled_ids_do_not_depend_on_batch_or_chunk_size():
    t = _teacher(_llama())
    x = torch.randint(0, VOCAB, (4, 128), generator=torch.Generator().manual_seed(3))
    whole = _chunked(t, x, None, row_start=10)
    one_by_one = [_chunked(t, x[r: r + 1], 64, row_start=10 + r) for r in range(4)]
    pairs = [_chunked(t, x[r: r + 2], 192, row_start=10 + r) for r in (0, 2)]
    for parts in (one_by_one, pairs):
        for k in ("draws", "topk_ids", "topk_logprobs"):
            assert torch.equal(whole[k], torch.cat([p[k] for p in parts])), k


def test_logit_softcapping_is_applied_like_the_model():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=128,
                       final_logit_softcapping=5.0)
    t = _teacher(Gemma2ForCausalLM(cfg))
    assert logit_ops(t.model.config) == (("softcap", 5.0),)
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(4))
    _assert_equal(_chunked(t, x, 64), _reference(t, x))


def test_a_head_chorus_cannot_reproduce_is_refused(monkeypatch):
    from transformers import LlamaForCausalLM

    forward = LlamaForCausalLM.forward

    def scaled(self, *args, **kwargs):  # an architecture that rescales its logits in a way no config names
        out = forward(self, *args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    monkeypatch.setattr(LlamaForCausalLM, "forward", scaled)
    t = _teacher(_llama())
    with pytest.raises(ChorusError, match="not a linear head over the final hidden states"):
        _chunked(t, torch.randint(0, VOCAB, (1, 16)), None)


MEMORY_SCRIPT = """
import resource, sys, torch
from transformers import LlamaConfig, LlamaForCausalLM
from chorus.teacher.model import Teacher
torch.set_num_threads(1)
length, vocab, chunk = {length}, {vocab}, {chunk}
cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                  num_key_value_heads=2, max_position_embeddings=length)
t = Teacher(LlamaForCausalLM(cfg).eval().requires_grad_(False), torch.device("cpu"), torch.float32, vocab, "tiny",
            "local", "fp", "tokenizer", chunk_size=chunk)
x = torch.randint(0, vocab, (1, length))
with torch.inference_mode():
    t.targets(x[:, :64], top_k=8, num_samples=8, seed=0, row_start=0, tail_betas=(1.0,))  # the head check
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = t.targets(x, top_k=8, num_samples=8, seed=0, row_start=0, tail_betas=(1.0,))
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
assert out["topk_ids"].shape == (1, length, 8)
print((after - before) * 1024)
"""


def test_a_long_row_with_a_large_vocabulary_caches_in_bounded_memory():
    """L = 8192, V = 32 000: full fp32 logits alone would be 8192·32000·4 B = 1.05 GB (the per-row reference held
    ~3 such buffers). Chunks of 512 positions hold a few 512·32000·4 B = 66 MB buffers: the whole pass (body,
    attention, head, targets: top-k, samples, statistics) must stay under 300 MB of peak RSS growth (measured
    ~190 MB with the default statistics grid; k, M and the grid are kept small here only to keep the test fast)."""
    script = textwrap.dedent(MEMORY_SCRIPT.format(length=8192, vocab=32000, chunk=512))
    src = os.path.join(os.path.dirname(__file__), "..", "..", "src")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.abspath(src)}
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    peak = int(res.stdout.split()[-1])
    assert peak < 300e6, f"peak RSS grew by {peak / 1e6:.0f} MB"


# ---------------------------------------------------------------------------------------------- device-side sampler
def _lowbias32(x: np.ndarray) -> np.ndarray:
    """The reference hash in native uint32 arithmetic (numpy wraps uint32 products), not the code's 16-bit limbs."""
    x = x.astype(np.uint32)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint32(16)
        x *= np.uint32(0x7FEB352D)
        x ^= x >> np.uint32(15)
        x *= np.uint32(0x846CA68B)
        x ^= x >> np.uint32(16)
    return x


def _reference_uniforms(seed: int, row: int, length: int, m: int) -> np.ndarray:
    k0, k1 = (np.uint32(int(v)) for v in row_keys(seed, row, 1)[0])
    counter = (np.arange(length, dtype=np.uint64)[:, None] * m + np.arange(m, dtype=np.uint64)).astype(np.uint32)
    with np.errstate(over="ignore"):
        x = _lowbias32(counter ^ k0)
        x = _lowbias32(x + k1)
        x = _lowbias32(x ^ k0)
    return (x >> np.uint32(8)).astype(np.float64) / 2**24


def test_device_uniforms_are_the_uint32_hash_bit_for_bit():
    """The int64 limb arithmetic (which any torch device runs exactly) equals native uint32 wrap-around arithmetic,
    including at counters and keys near 2^32."""
    for seed, row, length, m in ((0, 0, 64, 16), (7, 123_456_789, 33, 5), (2**40, 2**31 + 5, 512, 64)):
        got = row_uniforms(seed, row, 1, length, m).double().numpy()
        np.testing.assert_array_equal(got, _reference_uniforms(seed, row, length, m))
    x = torch.tensor([0, 1, 0xFFFF, 0x10000, 0xFFFFFFFF, 0x80000000, 0xDEADBEEF], dtype=torch.int64)
    np.testing.assert_array_equal(_mix32(x).numpy().astype(np.uint32), _lowbias32(x.numpy()))


def test_device_uniforms_are_uniform_and_independent():
    """2^20 draws over 64 rows: a chi-square over 1024 bins, neighbouring draws (same position, next position,
    next row) uncorrelated, and no two rows alike."""
    u = row_uniforms(1, 1000, 64, 256, 64).double().numpy()  # (64·256, 64)
    counts = np.bincount((u.reshape(-1) * 1024).astype(int), minlength=1024)
    expected = u.size / 1024
    chi2 = ((counts - expected) ** 2 / expected).sum()
    assert chi2 < 1023 + 6 * (2 * 1023) ** 0.5, chi2  # 6 sigma of a chi-square with 1023 degrees of freedom
    assert abs(u.mean() - 0.5) < 6 * (1 / 12 / u.size) ** 0.5
    rows = u.reshape(64, 256, 64)
    for a, b in ((rows[..., :-1], rows[..., 1:]), (rows[:, :-1], rows[:, 1:]), (rows[:-1], rows[1:])):
        r = np.corrcoef(a.reshape(-1), b.reshape(-1))[0, 1]
        assert abs(r) < 6 / a.size**0.5, r
    assert len({r.tobytes() for r in rows}) == 64


def test_too_many_samples_for_the_counter_are_refused():
    with pytest.raises(ChorusError, match="samples"):
        check_sampler(131_072, 32_768)
    check_sampler(131_072, 32_767)


def test_draws_are_the_inverse_cdf_of_the_full_distribution():
    """Against a float64 inverse CDF of a Zipf-like distribution over 5000 tokens: the same token for every draw whose
    uniform is not within fp32 rounding of a boundary, and counts that fit the probabilities (chi-square)."""
    v, n, m = 5000, 512, 64
    rng = np.random.default_rng(0)
    p = 1.0 / (np.arange(v) + 2.7) ** 1.1
    p = rng.permutation(p / p.sum())
    logp = torch.from_numpy(np.log(p)).float().expand(n, v).contiguous()
    u = row_uniforms(5, 0, 1, n, m)
    got = draw_ids(logp, u).numpy().reshape(-1)
    cdf = np.cumsum(p)
    want = np.minimum(np.searchsorted(cdf, u.double().numpy().reshape(-1) * cdf[-1], side="right"), v - 1)
    differ = got != want
    assert differ.mean() < 1e-3
    gap = np.abs(cdf[np.minimum(got, want)[differ]] - u.double().numpy().reshape(-1)[differ])
    assert (gap < 1e-5).all()  # only at a boundary, by rounding
    counts = np.bincount(got, minlength=v)
    top = np.argsort(-p)[:200]  # enough expected draws per cell for the chi-square
    expected = p[top] * got.size
    chi2 = ((counts[top] - expected) ** 2 / expected).sum()
    assert chi2 < 200 + 6 * (2 * 200) ** 0.5, chi2


def test_compiled_math_gives_the_same_targets():
    """`chorus cache --compile` on a CPU runs the GPU's logit path compiled (its statistics' exps as one exp and
    powers): against the eager reference, the same ids, top-k log-probs, gold log-probs and statistics within fp32
    rounding (log Z is summed in another order), and the same draws but where a uniform is within rounding of a CDF
    boundary."""
    from chorus.teacher.position import chain_statistics
    from chorus.teacher.sampler import block_stats

    t = _teacher(_llama())
    x = torch.randint(0, VOCAB, (3, 100), generator=torch.Generator().manual_seed(5))
    eager = _chunked(t, x, None)
    t.compiled = True
    got = _chunked(t, x, None)
    # else this machine has no working compiler: the fallback is tested below
    assert not compiled_targets(chain_statistics).failed and not compiled_targets(block_stats).failed
    assert sorted(got) == sorted(eager) and torch.equal(got["topk_ids"], eager["topk_ids"])
    assert (got["draws"] == eager["draws"]).float().mean() > 0.999
    for k in ("topk_logprobs", "gold_logprob", "log_tail", "entropy", "tail_logz"):
        torch.testing.assert_close(got[k], eager[k], rtol=1e-5, atol=1e-5, msg=k)


def test_a_failing_compile_falls_back_to_the_same_targets(capsys):
    from chorus.teacher.position import _CompiledTargets

    def broken(*_a, **_k):
        raise RuntimeError("no C++ compiler found")

    t = _teacher(_llama())
    x = torch.randint(0, VOCAB, (2, 64), generator=torch.Generator().manual_seed(6))
    eager = _chunked(t, x, None)
    compiled = _CompiledTargets()
    compiled.fn = broken
    with torch.inference_mode():
        got = chunked_targets(t.hidden_states(x), *t.head(x)[:2], x, top_k=8, num_samples=16, seed=3, row_start=0,
                              tail_betas=BETAS, per_position=compiled)
    _assert_equal(got, eager)
    assert compiled.failed and capsys.readouterr().err.count("--compile failed (no C++ compiler found)") == 1
