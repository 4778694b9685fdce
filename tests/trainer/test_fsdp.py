"""FSDP2 checkpoints: the whole-tensor state a sharded run saves restores a sharded run exactly.

Two ranks on gloo in spawned processes: one sharded student takes two steps; its model and optimizer state are
saved as whole tensors after the first (what `chorus train parallel=fsdp` checkpoints), loaded into a fresh
sharded student, and the second step from the restored state must equal the uninterrupted second step."""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from chorus.student import parallel as _parallel
from chorus.student.model import Student


def _model(seed: int) -> Student:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=16, tie_word_embeddings=True)
    return Student(LlamaForCausalLM(cfg), 64)


class _OneProcess:  # what _parallel.wrap needs of its Dist: world size and device
    world, device = 2, torch.device("cpu")


def _step(student: Student, opt, rank: int, step: int) -> None:
    g = torch.Generator().manual_seed(100 * step + rank)  # each rank its own rows
    ids = torch.randint(0, 64, (2, 12), generator=g)
    mask = torch.ones_like(ids)
    select = torch.arange(2 * 11)
    gold = ids[:, 1:].reshape(-1)
    loss, _ = student(ids, mask, select, gold, None, loss_fn="forward_kl", kd_weight=0.0, chunk_size=8)
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)


def _worker(rank: int, init: str, out: str) -> None:
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    try:
        a = _parallel.wrap(_model(0), "fsdp", _OneProcess())
        opt_a = torch.optim.AdamW(a.parameters(), lr=1e-2)
        _step(a, opt_a, rank, 1)
        model_state, optim_state = _parallel.full_state(a, opt_a)  # whole tensors on rank 0 (empty elsewhere)
        ckpt = out + ".ckpt"
        if rank == 0:  # saved by rank 0 and read back by every rank, as `chorus train --resume` does
            torch.save({"model": model_state, "optimizer": optim_state}, ckpt)
        dist.barrier()
        saved = torch.load(ckpt, weights_only=True)
        _step(a, opt_a, rank, 2)
        want = _parallel.full_state(a, opt_a)[0]

        b = _parallel.wrap(_model(1), "fsdp", _OneProcess())  # other weights: the load must replace them all
        opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
        _parallel.load_full_state(b, opt_b, saved["model"], saved["optimizer"])
        _step(b, opt_b, rank, 2)
        got = _parallel.full_state(b, opt_b)[0]
        if rank == 0:
            assert set(got) == set(want) and all(v.shape == want[k].shape for k, v in got.items())
            torch.save({"got": got, "want": want, "first": saved["model"]}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_fsdp_checkpoint_restores_the_sharded_run_exactly(tmp_path):
    out = str(tmp_path / "states.pt")
    mp.start_processes(_worker, args=(f"file://{tmp_path / 'init'}", out), nprocs=2, start_method="spawn")
    states = torch.load(out, weights_only=True)
    for k, w in states["want"].items():
        torch.testing.assert_close(states["got"][k], w, rtol=0, atol=0)  # the same step from the same state
    assert any(not torch.equal(states["first"][k], w) for k, w in states["want"].items())  # the second step moved it
