"""On a CUDA device (skipped without one): the cache a GPU writes against the one a CPU writes from the same
teacher, the pinned asynchronous host copies, a bf16 cache that a student trains from on the GPU and resumes bit
for bit, and the collectives' NCCL backend."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch

from chorus.commands import cache
from chorus.config import CacheConfig
from chorus.store import Store, decode_samples, decode_stats, decode_topk

from .conftest import CACHE_ARGS, read_cache

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _cache(prepared_store: str, teacher: str, out, **kw) -> dict[str, np.ndarray]:
    """Cache a copy of the store; every position's decoded targets and statistics."""
    shutil.copytree(prepared_store, out)
    cache.run(CacheConfig(store=str(out), teacher=teacher, **{**CACHE_ARGS, "top_k": 16, "samples": 32, **kw}))
    arrays, commits = read_cache(str(out), CACHE_ARGS["name"])
    assert commits
    manifest = Store.open(str(out), "r").teacher_manifest(CACHE_ARGS["name"])
    ids, logp = decode_topk(arrays, manifest)
    sample_ids, counts = decode_samples(arrays, manifest)
    return {"ids": ids, "logp": logp, "sample_ids": sample_ids, "counts": counts,
            **decode_stats(arrays, manifest, logp[..., -1])}


def test_gpu_cache_in_fp32_matches_the_cpu_cache(prepared_store, teacher_model, tmp_path):
    """Same teacher, same rows: the GPU's fp32 targets equal the CPU's up to the GEMMs' rounding — the top-k log-probs
    within one fp16 step, the ids wherever no near tie lets them order either way, the sampled ids (their uniforms
    are the same bits on any device) except where a uniform falls that close to a CDF boundary, and the statistics."""
    cpu, gpu = (_cache(prepared_store, teacher_model, tmp_path / f"on-{d}", device=d, dtype="fp32")
                for d in ("cpu", "cuda"))
    step = np.spacing(np.abs(cpu["logp"]).astype(np.float16)).astype(np.float32)  # one fp16 step at each value
    assert (np.abs(gpu["logp"] - cpu["logp"]) <= step).all()
    clear = np.ones(cpu["logp"].shape, bool)
    ties = np.abs(np.diff(cpu["logp"], axis=-1)) < 2 * step[..., 1:]
    clear[..., 1:] &= ~ties
    clear[..., :-1] &= ~ties
    assert clear.mean() > 0.1, clear.mean()  # a tiny random teacher: many near ties
    np.testing.assert_array_equal(gpu["ids"][clear], cpu["ids"][clear])
    for name in ("sample_ids", "counts"):
        same = (gpu[name] == cpu[name]).all(-1).mean()
        assert same > 0.99, (name, same)
    for name in ("log_tail", "entropy", "gold_logprob"):
        np.testing.assert_allclose(gpu[name], cpu[name], rtol=2e-3, atol=2e-3, err_msg=name)
    from chorus.teacher.position import compiled_targets, logit_statistics

    assert not compiled_targets(logit_statistics).failed  # the GPU's default: the statistics compiled


def test_pinned_async_host_copies_survive_the_device_buffers_reuse():
    """ShardWriter's copies run on a side stream into pinned memory; the device buffers are freed and reused by the
    next batch at once. After the event, the host copies hold the first batch's values, not the second's."""
    from chorus.teacher.writer import to_host_async

    stream = torch.cuda.Stream()
    first = {"a": torch.arange(1 << 22, device="cuda", dtype=torch.int32), "b": torch.randn(4096, 64, device="cuda")}
    want = {k: v.cpu() for k, v in first.items()}
    host, event = to_host_async(first, stream)
    del first
    for _ in range(4):  # the allocator may hand the freed blocks to these writes
        torch.full((1 << 22,), -7, device="cuda", dtype=torch.int32)
        torch.zeros(4096, 64, device="cuda")
    event.synchronize()
    assert all(h.is_pinned() for h in host.values())
    for k in want:
        assert torch.equal(host[k], want[k]), k


def test_bf16_gpu_cache_trains_a_student_on_the_gpu_and_resumes_bit_for_bit(prepared_store, teacher_model, tmp_path,
                                                                             monkeypatch):
    from chorus.commands import train
    from chorus.config import TrainConfig
    from tests.trainer.conftest import run_until_checkpoint, student_yaml

    targets = _cache(prepared_store, teacher_model, tmp_path / "store.zarr", device="cuda", dtype="bf16")
    assert np.isfinite(targets["logp"]).all() and (np.diff(targets["logp"], axis=-1) <= 0).all()
    student = student_yaml(tmp_path / "student.yaml")
    base = dict(store=str(tmp_path / "store.zarr"), student=student, teachers=[CACHE_ARGS["name"]], steps=8,
                batch_size=4, lr=3e-3, warmup_steps=2, eval_every=4, eval_rows=16, log_every=1, device="cuda")
    train.run(TrainConfig(out=str(tmp_path / "full"), save_every=4, **base))
    run_until_checkpoint(monkeypatch, TrainConfig(out=str(tmp_path / "cut"), save_every=4, **base), 4)
    train.run(TrainConfig(out=str(tmp_path / "cut"), save_every=4, resume=True, **base))
    from safetensors.torch import load_file

    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("full", "cut"))
    assert a.keys() == b.keys()
    for k in a:  # CUDA's backward kernels may add in another order from run to run (atomics): not always bit for bit;
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)  # a lost optimizer state is far off


def test_collectives_reduce_on_the_device_through_nccl(tmp_path):
    """The process group chorus asks for under torchrun on GPUs: NCCL reduces the device tensor, gloo gathers
    host objects (one rank here: NCCL refuses two ranks on one GPU)."""
    import torch.distributed as dist

    from chorus.student.parallel import backend

    dist.init_process_group(backend(True), init_method=f"file://{tmp_path / 'init'}", rank=0, world_size=1)
    try:
        t = torch.tensor([1.5, 2.0], dtype=torch.float64, device="cuda")
        dist.all_reduce(t)
        assert t.device.type == "cuda" and t.tolist() == [1.5, 2.0]
        out = [None]
        dist.all_gather_object(out, {"rank": 0})
        assert out == [{"rank": 0}]
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_loss_on_the_gpu_matches_the_dense_loss(temperature, dtype):
    """The GPU's loss path (4096-position chunks by default; at T = 1 the gradient w.r.t. the logits in closed
    form) against autograd over the full logits, on the device, for every divergence."""
    import torch.nn.functional as F

    from chorus.distill.losses import LOSSES, chunked_distill_loss, distill_loss_from_logits
    from chorus.distill.sparse import from_topk

    g = torch.Generator().manual_seed(0)
    n, h, v, k = 5000, 64, 3000, 16
    hidden, weight = torch.randn(n, h, generator=g), torch.randn(v, h, generator=g) * 0.3
    top = (torch.randn(n, v, generator=g) * 2).log_softmax(-1).topk(k)
    gold = torch.randint(0, v, (n,), generator=g)
    gold[::7] = -100
    cuda = torch.device("cuda")
    targets = from_topk(top.indices.to(cuda), top.values.half().to(cuda), v)
    gold = gold.to(cuda)
    tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-3}
    for name in sorted(LOSSES):
        kw = dict(loss_fn=name, kd_weight=0.6, temperature=temperature)
        h1, w1 = (x.to(cuda, dtype).requires_grad_() for x in (hidden, weight))
        loss1, _ = chunked_distill_loss(h1, w1, gold, targets, **kw)
        loss1.backward()
        h2, w2 = (x.to(cuda, dtype).requires_grad_() for x in (hidden, weight))
        loss2, _ = distill_loss_from_logits(F.linear(h2, w2), gold, targets, **kw)
        loss2.backward()
        torch.testing.assert_close(loss1.float(), loss2.float(), **tol, msg=name)
        torch.testing.assert_close(h1.grad.float(), h2.grad.float(), **tol, msg=name)
        torch.testing.assert_close(w1.grad.float(), w2.grad.float(), **tol, msg=name)
