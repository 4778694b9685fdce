"""`chorus train`: distill a student from cached teachers (plain CE training with none).

setup (distributed, run directory, data, student, optimizer, resume) → loop (micro-batches, targets
from the cache, loss, step, log, eval, checkpoint) → cleanup (final eval, ``model/``, ``config.yaml``).
No teacher model is ever loaded: targets are the teachers' cached sparse distributions, built by the one
target builder (targets.py: softened exactly by each teacher's calibrated temperature and the KD
temperature, weighted and pooled per token), and matched by a sparse divergence.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from chorus import __version__, failpoints, rundir
from chorus.config import TrainConfig, to_dict
from chorus.distill.sparse import IGNORE_INDEX
from chorus.errors import ChorusError
from chorus.progress import Progress, say
from chorus.prune import GradualPruner
from chorus.prune.masks import Masks
from chorus.store import Store, store_vocabulary
from chorus.store.tokenizer import store_tokenizer
from chorus.student import checkpoint as ckpt
from chorus.student.data import CachedRows, Positions, StreamLoader, positions
from chorus.student.evaluate import evaluate_model
from chorus.student.loss import DistillLoss
from chorus.student.model import Student, is_lora, load_student, with_lora
from chorus.student.parallel import Dist, accumulating, full_state, load_full_state, whole, wrap
from chorus.student.train_log import EnsembleStats, MetricsLog

# Keys that may differ between a run and its resumption without making it another run.
VOLATILE_KEYS = ("resume", "overwrite", "num_workers", "storage_options")


# ---------------------------------------------------------------------------------------------- setup
def _prepare_run_dir(cfg: TrainConfig, dist: Dist) -> tuple[bool, Path | None]:
    """Refuse a directory holding another run. Returns (finished: this very run is already done,
    the checkpoint to resume from or None)."""
    out = Path(cfg.out)
    saved_cfg = out / "config.yaml"
    holds_run = saved_cfg.is_file() or bool(ckpt.checkpoints(out))
    new = {k: v for k, v in to_dict(cfg).items() if k not in VOLATILE_KEYS}
    if holds_run and not cfg.overwrite:
        old = yaml.safe_load(saved_cfg.read_text()) if saved_cfg.is_file() else {}
        old = {k: v for k, v in (old or {}).items() if k not in VOLATILE_KEYS}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if not cfg.resume:
            if changed:
                raise ChorusError(f"'{cfg.out}' holds another run (its config differs in: {', '.join(changed)}); "
                                  "pass --resume to continue it, --overwrite to replace it, or choose another --out")
            if (out / "model" / "chorus.json").is_file():
                return True, None
            if ckpt.checkpoints(out):
                raise ChorusError(f"'{cfg.out}' holds an unfinished run of this config; pass --resume to continue it "
                                  "or --overwrite to start over")
        elif changed and dist.main:
            say(f"resuming with changed settings: {', '.join(changed)}")
    dist.barrier()  # every rank has looked before rank 0 writes
    if dist.main:
        (rundir.replace if cfg.overwrite else rundir.claim)(out, "train")
        (out / "config.yaml").write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    dist.barrier()
    return False, (ckpt.latest(out) if cfg.resume else None)


def lr_lambda(cfg: TrainConfig):
    """Linear warmup over warmup_steps, then cosine decay to min_lr_ratio of the peak at ``steps``."""
    def f(step: int) -> float:  # step = optimizer steps taken so far
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(cfg.steps - cfg.warmup_steps, 1)
        progress = min((step - cfg.warmup_steps) / span, 1.0)
        return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return f


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (0.9, 0.95); weight decay on matrices only (norms and biases keep theirs)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # norms and biases: no decay
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}],
                             lr=cfg.lr, betas=(0.9, 0.95))


def _autocast(cfg: TrainConfig, device: torch.device):
    """(context factory, dtype or None): bf16 where supported, fp16 on older GPUs, fp32 on CPU by default."""
    p = cfg.precision
    if p == "auto":
        p = "fp32" if device.type == "cpu" else ("bf16" if torch.cuda.is_bf16_supported() else "fp16")
    if p == "fp32":
        return nullcontext, None
    dtype = torch.bfloat16 if p == "bf16" else torch.float16
    return (lambda: torch.autocast(device.type, dtype=dtype)), dtype


# ---------------------------------------------------------------------------------------------- the loop
def train(cfg: TrainConfig, *, pruner: Callable[[torch.nn.Module], GradualPruner] | None = None) -> dict:
    """One training run as ``cfg`` says: resumes a run directory it wrote, refuses any other.

    ``pruner``: builds a :class:`~chorus.prune.GradualPruner` on the loaded student; its masks then follow its
    schedule during the run (updated before each step, applied after each optimizer step, checkpointed), and the
    final masks are saved with the model (``masks.safetensors``)."""
    dist = Dist(cfg.device)
    try:
        return _train(cfg, dist, pruner)
    finally:
        dist.close()


def _train(cfg: TrainConfig, dist: Dist, make_pruner=None) -> dict:
    # ---- setup: store, teachers, run directory
    store = Store.open(cfg.store, "r", cfg.storage_options)
    m = store.manifest
    vocab, domains = m.tokenizer.vocab_size, m.domains
    objective = DistillLoss.from_config(cfg, store, announce=dist.main)  # the blend filled in, every key checked
    cfg = objective.cfg
    evals = cfg.eval_rows > 0 and m.split_rows.get("valid", 0) > 0
    if cfg.eval_rows > 0 and not evals and dist.main:
        say(f"warning: store '{cfg.store}' has no held-out rows; training without evaluation (prepare with "
            "--valid-fraction > 0 for held-out metrics)")

    # ---- setup: seeds, student (before the run directory: a student that cannot be built blocks no rerun)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = load_student(cfg.student, vocab_size=vocab, seq_len=m.seq_len, seed=cfg.seed,
                         tokenizer_fingerprint=m.tokenizer.fingerprint,
                         store_tokens=store_vocabulary(store)).to(dist.device)
    masks = _student_masks(cfg.student, model)  # a sparse student's pruned weights stay exactly zero
    if cfg.lora and masks:
        raise ChorusError("train key 'lora': a sparse student (masks.safetensors) cannot take LoRA adapters, whose "
                          "merge would fill its pruned weights; train it whole")
    model = with_lora(model, cfg.lora, seed=cfg.seed)
    if make_pruner is not None and (masks or cfg.lora):
        raise ChorusError("a gradual pruning schedule needs a dense student trained whole (no masks.safetensors, "
                          "no lora)")
    pruner = make_pruner(model) if make_pruner is not None else None
    finished, resume_from = _prepare_run_dir(cfg, dist)
    if finished:
        say(f"'{cfg.out}' already holds this finished run; nothing to do (pass --overwrite to train again)")
        return json.loads((Path(cfg.out) / "model" / "chorus.json").read_text())
    out = Path(cfg.out)

    # ---- setup: optimizer, data
    student = Student(model, vocab)
    if cfg.parallel == "fsdp" and (masks or pruner is not None):
        raise ChorusError("train key 'parallel': fsdp does not keep a sparse student's masks yet; use parallel=ddp")
    net = wrap(student, cfg.parallel, dist)
    optimizer = make_optimizer(student, cfg)  # after sharding: FSDP2 replaces the parameters
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))
    autocast, amp_dtype = _autocast(cfg, dist.device)
    scaler = torch.amp.GradScaler(dist.device.type, enabled=amp_dtype == torch.float16)
    data = CachedRows(cfg.store, batch_size=cfg.batch_size, teachers=cfg.teachers, split="train",
                      domains=cfg.train_domains or None, max_rows=cfg.train_rows, exclude_rows=cfg.exclude_rows,
                      samples=cfg.target == "samples", topk=cfg.target != "samples",
                      shuffle_buffer=cfg.shuffle_buffer, shuffle_shards=cfg.shuffle_shards, seed=cfg.seed, rank=dist.rank, world_size=dist.world,
                      storage_options=cfg.storage_options)
    loader = StreamLoader(data, num_workers=cfg.num_workers, pin_memory=dist.device.type == "cuda")

    diag = EnsembleStats(domains, cfg.teachers) if len(cfg.teachers) >= 2 else None
    acc = _fresh_acc()  # running sums between two logged steps (checkpointed, so a resumed log is identical)
    pending = torch.zeros(5, dtype=torch.float64, device=dist.device)  # device-side sums since the last flush
    final_row: dict = {}  # the last step's log row, written after the final eval
    start, tokens_seen = 0, 0
    if resume_from is not None:
        state = ckpt.load(resume_from)
        load_full_state(student, optimizer, state["model"], state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        loader.load_state_dict(state["loader"])
        rngs = state["rng"]
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == dist.world else rngs[0])
        start, tokens_seen = state["step"], state["tokens"]
        acc = state["log"]["acc"] if state["log"]["acc"].get("weighted") else _fresh_acc()  # older runs: per-step means
        final_row = state["log"].get("final_row") or {}
        if diag:
            diag.load_state_dict(state["log"]["diag"])
        if pruner is not None:
            pruner.load_state_dict(state["pruner"])
        if dist.main:
            say(f"resuming from {resume_from.name} (step {start})")
    elif cfg.resume and dist.main:
        say(f"no checkpoint in '{cfg.out}' yet; starting from step 0")

    columns = ["lr", "loss", "ce", "kd", "grad_norm", "tokens", "tokens_per_s"]
    columns += [f"eval/{d}" for d in domains] + ["eval/mean", "eval/worst", "eval/ece"]
    columns += diag.columns() if diag else []
    log = MetricsLog(out, columns, start if resume_from is not None else None, dist.main)
    if dist.main:
        what = f"distilling from {', '.join(cfg.teachers)} ({cfg.loss}, {cfg.target}" + \
            (f", {cfg.aggregate} pool, {cfg.weighting} weighting)" if diag else ")") if cfg.teachers else "CE only (no teachers)"
        say(f"train: {sum(p.numel() for p in student.parameters()):,} parameters, {what}, {cfg.steps} steps of "
            f"{cfg.batch_size * cfg.grad_accum * dist.world} rows on {dist.device}")

    def targets_for(batch: dict, pos):
        """The pooled sparse target over the batch's positions, and each teacher's per-token weight."""
        out = objective.targets(batch, pos, dist.device)
        return (out.pooled, out.weights, out.dists) if out is not None else (None, None, None)

    # ---- loop
    batches = iter(loader)
    t_last = time.perf_counter()
    result: dict = {}
    student.train()
    with Progress("train", total=cfg.steps, unit="steps") as bar:
        bar.update(start)
        for step in range(start + 1, cfg.steps + 1):
            log_now = step % cfg.log_every == 0 or step == cfg.steps
            # The step's micro-batches first: positions are found on the host (no device sync), and the loss
            # is normalized by the step's token count over every micro-batch and rank (a micro-batch of few
            # tokens weighs what its tokens weigh, as in one big batch).
            if pruner is not None:
                pruner.update(step - 1)  # the sparsity after step - 1 optimizer steps
            micro_batches = [next(batches) for _ in range(cfg.grad_accum)]
            host = [positions(b) for b in micro_batches]
            counts = [int((p.gold != IGNORE_INDEX).sum()) for p in host]
            step_tokens = dist.sum_async([float(sum(counts))])[0].clamp_min(1.0)
            for micro, (batch, pos_h, n) in enumerate(zip(micro_batches, host, counts)):
                pos = _to_device(pos_h, dist.device)
                targets, w, dists = targets_for(batch, pos)
                sync = micro == cfg.grad_accum - 1 or dist.world == 1
                with nullcontext() if sync else accumulating(net):  # gradients are reduced on the last one only
                    with autocast():
                        loss, parts = net(batch["input_ids"].to(dist.device, non_blocking=True), pos.attention_mask,
                                          pos.select, pos.gold, targets, chunk_size=cfg.chunk_size, **objective.kwargs)
                    # DDP averages over ranks: × world turns that mean back into the global token mean
                    scaler.scale(loss * (n * dist.world) / step_tokens).backward()
                pending[:3] += torch.stack([loss.detach(), parts["ce"], parts["kd"]]).double() * n
                pending[3] += n
                if diag:  # weights every micro-batch, disagreement on logged steps only (it costs a union)
                    diag.add_weights(pos.domain, w)
                    if log_now and micro == 0:
                        diag.add_disagreement(targets, dists)
            scaler.unscale_(optimizer)
            norm = torch.nn.utils.clip_grad_norm_(student.parameters(), cfg.clip if cfg.clip > 0 else float("inf"))
            scaler.step(optimizer)
            if masks:
                masks.apply()
            if pruner is not None:
                pruner.apply()
            failpoints.hit("step")
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # FSDP: a DTensor
            pending[4] += norm.detach().double() / dist.world  # the same on every rank: the sum over ranks is it
            acc["steps"] += 1
            if log_now or (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                tokens_seen += _flush(acc, pending, dist)  # the one host sync of a step, on log and save steps

            row: dict = {}
            if log_now:
                now = time.perf_counter()
                k, n_all = acc["steps"], max(acc["tokens"], 1)
                row = {"lr": scheduler.get_last_lr()[0], "loss": acc["loss"] / n_all, "ce": acc["ce"] / n_all,
                       "kd": acc["kd"] / n_all, "grad_norm": acc["grad_norm"] / k, "tokens": tokens_seen,
                       "tokens_per_s": acc["tokens"] / max(now - t_last, 1e-9)}
                if diag:
                    row.update(diag.row())
                acc = _fresh_acc()
                t_last = now
            # exact token counts are reduced on log steps; the bar counts this rank's × ranks
            bar.update(1, tokens=sum(counts) * dist.world, **({"loss": f"{row['loss']:.3f}"} if row else {}))
            paused = time.perf_counter()
            if evals and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:  # final: after the save
                plain = whole(student, dist)  # every rank takes part in gathering a sharded student
                if dist.main:
                    result = _evaluate_into(row, plain, cfg)
                dist.barrier()
            if step < cfg.steps:
                log.write(step, row)
            else:
                final_row = row  # written with the final eval, once the model is saved
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                log_state = {"acc": acc, "diag": diag.state_dict() if diag else None, "final_row": final_row}
                _save_checkpoint(out, step, tokens_seen, student, optimizer, scheduler, scaler, loader, log_state, dist,
                                 extra={"pruner": pruner.state_dict()} if pruner is not None else {})
            t_last += time.perf_counter() - paused  # eval and checkpoints are not training time (tokens/s)

    # ---- cleanup: the model first (weights, tokenizer, generation config), then the final eval, then
    # chorus.json, which marks the run finished: a crash in the eval loses nothing and --resume completes it
    final = out / "model"
    plain = whole(student, dist)
    if dist.main:
        saved = _save_model(final, plain.model, pruner.masks if pruner is not None else masks, m, store)
        if saved is not plain.model:  # a LoRA student, merged: evaluated as saved
            plain = Student(saved, vocab)
    dist.barrier()
    result = {}
    if evals:
        if dist.main:
            result = _evaluate_into(final_row, plain, cfg)
        dist.barrier()
    log.write(cfg.steps, final_row)
    log.close()
    if dist.main:
        info = json.loads((final / "chorus.json.partial").read_text())
        info.update({"steps": cfg.steps, "store": cfg.store, "teachers": cfg.teachers, "config": to_dict(cfg),
                     "eval": result})
        (final / "chorus.json").write_text(json.dumps(info, indent=2))
        (final / "chorus.json.partial").unlink()
        say(f"trained {cfg.steps} steps → {final}" + (f" (held-out mean loss {result['mean']:.4f}, worst "
                                                          f"{result['worst_domain']} {result['worst']:.4f})" if result else ""))
    dist.barrier()
    return {"steps": cfg.steps, "eval": result, "out": str(out)}


def _save_model(final: Path, model: torch.nn.Module, masks, m, store) -> torch.nn.Module:
    """A complete HF model directory: config, weights (a LoRA student's merged, its adapters in ``adapter/``),
    generation config (the store's EOS and pad ids),
    the store's tokenizer when it can be found (else one warning), and ``chorus.json.partial``, which the
    recipe completes with the eval once it has run."""
    from transformers import GenerationConfig

    if is_lora(model):  # the adapters alone (peft's format), then the merged model that every command reads
        model.save_pretrained(final / "adapter")
        model = model.merge_and_unload()
    model.config.eos_token_id, model.config.pad_token_id = m.tokenizer.eos_id, m.tokenizer.pad_id
    model.generation_config = GenerationConfig(eos_token_id=m.tokenizer.eos_id, pad_token_id=m.tokenizer.pad_id)
    model.save_pretrained(final)
    model.generation_config.save_pretrained(final)
    if masks:
        masks.save(final)

    tok, source = store_tokenizer(store, m)
    if tok is not None:
        tok.save_pretrained(final)
    else:
        say(f"warning: the store's tokenizer '{m.tokenizer.name}' could not be loaded, so it is not saved with the "
            f"model; copy its files into {final} (or pass --tokenizer to `chorus cache`)")
    info = {"created_by": __version__, "corpus_fingerprint": m.fingerprint, "tokenizer": m.tokenizer.to_dict(),
            "tokenizer_source": source}
    (final / "chorus.json.partial").write_text(json.dumps(info, indent=2))
    return model


def _student_masks(spec: str, model: torch.nn.Module):
    """The sparsity masks shipped in a student directory (``masks.safetensors``, written by `chorus
    compress`), bound to ``model``; None for a dense student."""

    masks = Masks.load(spec) if os.path.isdir(os.path.expanduser(spec)) else None
    return masks.bind(model) if masks else None


def _evaluate_into(row: dict, student: Student, cfg: TrainConfig) -> dict:
    """Held-out metrics of ``student``, added to the log ``row`` as eval/* columns."""
    res = evaluate_model(student, cfg.store, max_rows=cfg.eval_rows, batch_size=cfg.batch_size, teachers=[],
                         chunk_size=cfg.chunk_size, storage_options=cfg.storage_options)
    row.update({f"eval/{d}": v for d, v in res["per_domain"].items()})
    row.update({"eval/mean": res["mean"], "eval/worst": res["worst"], "eval/ece": res["ece"]})
    return res


def _fresh_acc() -> dict:
    """Sums between two logged steps: loss, ce, kd weighted by tokens; grad_norm per step; steps; tokens."""
    return {"loss": 0.0, "ce": 0.0, "kd": 0.0, "grad_norm": 0.0, "steps": 0, "tokens": 0, "weighted": True}


def _flush(acc: dict, pending: torch.Tensor, dist: Dist) -> int:
    """Adds the device-side sums of the steps since the last flush (loss·n, ce·n, kd·n, n, grad norm) over
    every rank into ``acc`` and zeroes them; returns the tokens they cover."""
    total = dist.sum_async(pending).cpu().tolist()
    pending.zero_()
    for key, value in zip(("loss", "ce", "kd"), total):
        acc[key] += value
    acc["grad_norm"] += total[4]
    acc["tokens"] += int(total[3])
    return int(total[3])


def _to_device(pos: Positions, device: torch.device) -> Positions:
    return Positions(*(getattr(pos, f.name).to(device, non_blocking=True) for f in dataclasses.fields(pos)))


def _save_checkpoint(out: Path, step: int, tokens: int, student: Student, optimizer, scheduler, scaler,
                     loader: StreamLoader, log_state: dict, dist: Dist, extra: dict) -> None:
    rngs = dist.gather(ckpt.rng_state())  # every rank's generators, so dropout resumes exactly
    model_state, optim_state = full_state(student, optimizer)
    if dist.main:
        ckpt.save(out, step, {"step": step, "tokens": tokens, "model": model_state,
                              "optimizer": optim_state, "scheduler": scheduler.state_dict(),
                              "scaler": scaler.state_dict(), "loader": loader.state_dict(), "rng": rngs, "log": log_state,
                              "created_by": __version__, **extra})
    dist.barrier()
