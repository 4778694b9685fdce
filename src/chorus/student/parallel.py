"""Many processes, one run: torchrun plumbing (rank, world, device, collectives on device tensors), and how the
student is spread over ranks — a DDP replica per rank, or FSDP2 shards — with whole-tensor state for checkpoints,
evaluation and saving."""

from __future__ import annotations

import os
from contextlib import contextmanager

import torch

from chorus.device import resolve_device
from chorus.student.model import Student


class Dist:
    """torchrun plumbing: rank, world size, device; a single process when not launched by torchrun."""

    def __init__(self, device: str) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", 1))
        self.rank = int(os.environ.get("RANK", 0))
        local = int(os.environ.get("LOCAL_RANK", 0))
        self.device = resolve_device(device, local)
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.set_device(self.device)
        self.owns_group = False
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend(cuda))
            self.owns_group = True

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def sum(self, values: list[float]) -> list[float]:
        return self.sum_async(values).cpu().tolist()

    def sum_async(self, values: list[float] | torch.Tensor) -> torch.Tensor:
        """The sum over ranks as a float64 tensor on this rank's device (NCCL reduces device tensors
        only); reading it is the caller's host sync, not this call's."""
        t = torch.as_tensor(values, dtype=torch.float64).to(self.device)
        if self.world > 1:
            torch.distributed.all_reduce(t)
        return t

    def gather(self, obj: object) -> list:
        if self.world == 1:
            return [obj]
        out: list = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            torch.distributed.destroy_process_group()


def backend(cuda: bool) -> str:
    """gloo for CPU tensors and NCCL for CUDA ones, so objects gathered on the CPU and losses reduced on
    the GPU both have a backend."""
    return "cpu:gloo,cuda:nccl" if cuda else "gloo"



def sharded(student: Student) -> bool:
    return hasattr(student, "set_requires_gradient_sync")  # what fully_shard adds to a module


def wrap(student: Student, how: str, dist: Dist) -> torch.nn.Module:
    """The module the step calls: the student itself in one process; under torchrun a DDP replica, or the
    student sharded by FSDP2 (each decoder layer one unit, the root holding embeddings, norm and head)."""
    if dist.world == 1:
        return student
    if how == "fsdp":
        from torch.distributed.fsdp import fully_shard

        for layer in getattr(student._body(), "layers", None) or []:
            fully_shard(layer)
        fully_shard(student)
        return student
    return torch.nn.parallel.DistributedDataParallel(student, device_ids=[dist.device] if dist.device.type == "cuda" else None)


@contextmanager
def accumulating(net: torch.nn.Module):
    """Micro-batches before the last: gradients accumulate locally, without a reduction across ranks."""
    if isinstance(net, torch.nn.parallel.DistributedDataParallel):
        with net.no_sync():
            yield
    elif hasattr(net, "set_requires_gradient_sync"):
        net.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            net.set_requires_gradient_sync(True)
    else:
        yield


def full_state(student: Student, optimizer) -> tuple[dict, dict]:
    """Model and optimizer state as whole tensors on the host (a collective call under FSDP: every rank)."""
    if not sharded(student):
        return student.model.state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    # asked of the sharded root (the Student): asked of the inner model, its root-level parameters stay DTensors
    model, optim = get_state_dict(student, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k.removeprefix("model."): v for k, v in model.items()}, optim


def load_full_state(student: Student, optimizer, model_state: dict, optim_state: dict) -> None:
    if not sharded(student):
        student.model.load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    set_state_dict(student, optimizer, model_state_dict={f"model.{k}": v for k, v in model_state.items()},
                   optim_state_dict=optim_state, options=StateDictOptions(full_state_dict=True))


def whole(student: Student, dist: Dist) -> Student | None:
    """The student with whole parameters, for evaluation and saving on the main rank: itself unless
    sharded, else a plain copy gathered from every rank (all ranks call this; others get None)."""
    if not sharded(student):
        return student
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    from transformers import AutoModelForCausalLM

    state = get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    state = {k.removeprefix("model."): v for k, v in state.items()}
    if not dist.main:
        return None
    copy = AutoModelForCausalLM.from_config(student.model.config)
    copy.load_state_dict(state)
    return Student(copy.to(dist.device), student.vocab_size)
