"""`chorus compress`: a model pruned toward a size or sparsity in n stages, each distilled from the cache.

setup (store, the start model, its held-out loss, calibration rows) → stages (prune a step of the way →
distill through `chorus train` from the cached teachers → record) → cleanup (the table, ``results.json``).

Stage i of n aims at 1 − (1 − r)·i/n of the start model's parameters (structured) or s·i/n sparsity
(masks), a linear path from the model to the target (the staged homotopy of Sparse-KD; n = 1 is one-shot
pruning). ``steps`` is the total student budget, split evenly, so one-shot and n stages are compared at
equal steps. Every stage is an ordinary `chorus train` run (fresh AdamW, warmup + cosine; the warmup is at
most a fifth of the stage) on a different data order (seed + 7919·(i − 1)), so n stages see as many distinct
batches as one. Teachers never run: every stage and every retry reads the same caches.

Resumable at any point: a stage whose record (``stage-XX/stage.json``) exists is skipped, a pruned model is
written whole then renamed into place (pruning is deterministic), and the distillation resumes from its
last checkpoint. Running the same command again continues; another config in the same ``--out`` is refused.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import time
from pathlib import Path

import torch
import yaml

from chorus import rundir
from chorus.config import CompressConfig, TrainConfig, build_config, to_dict
from chorus.device import resolve_device
from chorus.errors import ChorusError
from chorus.progress import say
from chorus.prune import importance, structured
from chorus.prune import masks as masks_mod
from chorus.prune.masks import Masks
from chorus.store import Store, store_vocabulary
from chorus.student.data import CachedRows
from chorus.student.evaluate import evaluate_model
from chorus.student.model import load_student
from chorus.student.training import train

# Keys of `train` that the schedule sets itself.
OWNED_TRAIN_KEYS = ("store", "student", "out", "teachers", "steps", "seed", "resume", "overwrite", "eval_rows",
                    "storage_options")
VOLATILE_KEYS = ("overwrite", "storage_options")


# ---------------------------------------------------------------------------------------------- setup
def calibration_batches(store: str, *, rows: int, batch_size: int = 8, storage_options: dict | None = None) -> list[dict]:
    """The first ``rows`` training rows (evenly spread over the store, fixed order) as model inputs."""
    data = CachedRows(store, batch_size=batch_size, split="train", shuffle=False, epochs=1, max_rows=rows, rank=0,
                      world_size=1, storage_options=storage_options)
    return [{"input_ids": b["input_ids"], "attention_mask": (b["segment_ids"] > 0).long()} for b in data]


def _validate(cfg: CompressConfig) -> None:
    if cfg.stages < 1:
        raise ChorusError(f"compress key 'stages': expected a positive integer, got {cfg.stages}")
    if cfg.steps < cfg.stages:
        raise ChorusError(f"compress key 'steps': {cfg.steps} steps cannot be split over {cfg.stages} stages "
                          "(need at least one per stage)")
    if cfg.method == "structured" and not 0.0 < cfg.target_params < 1.0:
        raise ChorusError(f"compress key 'target_params': expected a fraction in (0, 1), got {cfg.target_params}")
    if cfg.method in ("magnitude", "wanda") and not 0.0 < cfg.sparsity < 1.0:
        raise ChorusError(f"compress key 'sparsity': expected a fraction in (0, 1), got {cfg.sparsity}")
    bad = [a for a in cfg.axes if a not in structured.AXES]
    if cfg.method == "structured" and (bad or not cfg.axes):
        raise ChorusError(f"compress key 'axes': expected some of {', '.join(structured.AXES)}, got {cfg.axes}")
    owned = sorted(k for k in cfg.train if k.replace("-", "_") in OWNED_TRAIN_KEYS)
    if owned:
        raise ChorusError(f"compress key 'train' sets {', '.join(owned)}, which compress sets itself; "
                          "use the compress keys instead")
    if cfg.calibration_rows < 1:
        raise ChorusError(f"compress key 'calibration_rows': expected a positive integer, got {cfg.calibration_rows}")


def _prepare_out(cfg: CompressConfig) -> Path:
    out = Path(cfg.out)
    saved = out / "compress.yaml"
    new = {k: v for k, v in to_dict(cfg).items() if k not in VOLATILE_KEYS}
    if saved.is_file() and not cfg.overwrite:
        old = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k not in VOLATILE_KEYS}
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed:
            raise ChorusError(f"'{cfg.out}' holds another compression (its config differs in: {', '.join(changed)}); "
                              "pass --overwrite to replace it, or choose another --out")
    (rundir.replace if cfg.overwrite else rundir.claim)(out, "compress")
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def stage_steps(total: int, stages: int) -> list[int]:
    """``total`` steps split evenly over ``stages`` (the first ones take the remainder)."""
    return [total // stages + (i < total % stages) for i in range(stages)]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def forward_tokens_per_s(model: torch.nn.Module, input_ids: torch.Tensor, *, reps: int = 5) -> float:
    """Tokens/s of a plain forward pass over ``input_ids`` (B, L): the median of ``reps`` timed passes."""
    was_training = model.training
    model.eval()
    ids = input_ids.to(next(model.parameters()).device)
    model(input_ids=ids)  # warm up
    times = []
    for _ in range(reps):
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        model(input_ids=ids)
        if ids.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    model.train(was_training)
    return ids.numel() / sorted(times)[len(times) // 2]


# ---------------------------------------------------------------------------------------------- one stage
def _prune(cfg: CompressConfig, model: torch.nn.Module, prev: Masks | None, i: int, p0: int, calib: list[dict]):
    """The model one step of the way (stage i of n) and its masks (None for structured pruning)."""
    frac = i / cfg.stages
    if cfg.method == "structured":
        imp = importance.measure(model, calib)
        goal = p0 * (1 - (1 - cfg.target_params) * frac)
        sizes = structured.sizes_for(model.config, goal / structured.param_count(model.config), tuple(cfg.axes))
        return structured.prune(model, imp, **sizes), None
    score = "magnitude" if cfg.method == "magnitude" else "wanda"
    pattern = "2:4" if cfg.method == "2:4" else "unstructured"
    target = (0.5 if cfg.method == "2:4" else cfg.sparsity) * frac
    inputs = importance.measure(model, calib).inputs if score == "wanda" else None
    masks = masks_mod.compute(model, target, score=score, pattern=pattern, inputs=inputs, previous=prev)
    masks.bind(model)  # zeroes the pruned weights
    masks.unbind()
    return model, masks


def _save_pruned(model: torch.nn.Module, masks: Masks | None, info: dict, where: Path) -> None:
    tmp = where.with_name(where.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    if masks:
        masks.save(tmp)
    (tmp / "prune.json").write_text(json.dumps(info, indent=2))
    shutil.rmtree(where, ignore_errors=True)
    os.replace(tmp, where)


def _row(stage: int, params: int, p0: int, masks: Masks | None, ev: dict, tps: float, steps: int) -> dict:
    return {"stage": stage, "params": params, "params_fraction": params / p0,
            "sparsity": masks.sparsity() if masks else 0.0, "steps": steps, "mean": ev["mean"], "worst": ev["worst"],
            "per_domain": ev["per_domain"], "tokens_per_s": tps}


def _line(r: dict) -> str:
    return (f"stage {r['stage']}: {r['params']:,} params ({r['params_fraction']:.0%}), sparsity {r['sparsity']:.0%}, "
            f"{r['steps']} steps, held-out mean {r['mean']:.4f} worst {r['worst']:.4f}, "
            f"{r['tokens_per_s']:,.0f} tokens/s")


def format_table(rows: list[dict]) -> str:
    domains = list(rows[0]["per_domain"]) if rows else []
    head = ["stage", "params", "frac", "sparsity", "steps", "mean", "worst", *domains, "tokens/s"]
    cells = [head] + [[str(r["stage"]), f"{r['params']:,}", f"{r['params_fraction']:.2f}", f"{r['sparsity']:.2f}",
                       str(r["steps"]), f"{r['mean']:.4f}", f"{r['worst']:.4f}",
                       *(f"{r['per_domain'][d]:.4f}" for d in domains), f"{r['tokens_per_s']:,.0f}"] for r in rows]
    widths = [max(len(c[j]) for c in cells) for j in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- recipe
def run(cfg: CompressConfig) -> dict:
    _validate(cfg)
    store = Store.open(cfg.store, "r", cfg.storage_options)
    m = store.manifest
    # every stage's distillation settings, validated now (errors name the key)
    base = build_config(TrainConfig, {"store": cfg.store, "student": cfg.model, "out": cfg.out, "eval_every": 0,
                                      "save_every": 0}, cfg.train)
    device = resolve_device(base.device)
    model = load_student(cfg.model, vocab_size=m.tokenizer.vocab_size, seq_len=m.seq_len, seed=cfg.seed,
                         tokenizer_fingerprint=m.tokenizer.fingerprint, store_tokens=store_vocabulary(store)).to(device)
    out = _prepare_out(cfg)  # after the start model loads: a model that cannot be used leaves no directory
    calib = calibration_batches(cfg.store, rows=cfg.calibration_rows, batch_size=base.batch_size,
                                           storage_options=cfg.storage_options)
    bench_ids = calib[0]["input_ids"]

    p0 = n_params(model)
    start = out / "stage-00.json"
    if start.is_file():
        row0 = json.loads(start.read_text())
    else:
        ev = evaluate_model(model, cfg.store, max_rows=cfg.eval_rows, batch_size=base.batch_size, teachers=[],
                            chunk_size=base.chunk_size, storage_options=cfg.storage_options)
        row0 = _row(0, p0, p0, None, ev, forward_tokens_per_s(model, bench_ids), 0)
        start.write_text(json.dumps(row0, indent=2))
    say(_line(row0) + " (the start model)")
    rows, masks, current = [row0], None, cfg.model
    steps = stage_steps(cfg.steps, cfg.stages)
    for i in range(1, cfg.stages + 1):
        sd = out / f"stage-{i:02d}"
        record, pruned, trained = sd / "stage.json", sd / "pruned", sd / "train" / "model"
        if record.is_file():
            rows.append(json.loads(record.read_text()))
            say(_line(rows[-1]) + " (done before)")
            current = str(trained)
            continue
        if not (pruned / "prune.json").is_file():
            model = load_student(current, vocab_size=m.tokenizer.vocab_size, seq_len=m.seq_len).to(device)
            masks = Masks.load(current) if i > 1 else None
            small, masks = _prune(cfg, model, masks, i, p0, calib)
            sd.mkdir(parents=True, exist_ok=True)
            _save_pruned(small, masks, {"stage": i, "of": cfg.stages, "from": current, "params": n_params(small),
                                        "sparsity": masks.sparsity() if masks else 0.0}, pruned)
        warmup = min(base.warmup_steps, max(1, steps[i - 1] // 5))
        tcfg = dataclasses.replace(base, student=str(pruned), out=str(sd / "train"), teachers=list(cfg.teachers),
                                   steps=steps[i - 1], seed=cfg.seed + 7919 * (i - 1), warmup_steps=warmup,
                                   eval_rows=cfg.eval_rows, resume=True, storage_options=cfg.storage_options)
        res = train(tcfg)
        model = load_student(str(trained), vocab_size=m.tokenizer.vocab_size, seq_len=m.seq_len).to(device)
        masks = Masks.load(trained)
        row = _row(i, n_params(model), p0, masks, res["eval"], forward_tokens_per_s(model, bench_ids), steps[i - 1])
        record.write_text(json.dumps(row, indent=2))
        rows.append(row)
        say(_line(row))
        current = str(trained)
    table = format_table(rows)
    print(table)
    result = {"model": current, "rows": rows, "table": table}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result
