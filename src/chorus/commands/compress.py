"""`chorus compress`: a model pruned toward a size or sparsity along a schedule, distilled from the cache.

setup (store, the start model, its held-out loss, calibration rows) → the schedule (separate stage runs, or
one run with a pruner) → cleanup (the table, ``results.json``).

``schedule`` says how the sparsity grows over the ``steps`` student steps (the same budget for every
schedule, so they compare at equal steps):

- ``stages`` (the default) and ``one-shot``: stage i of n aims at 1 − (1 − r)·i/n of the start model's
  parameters (structured) or s·i/n sparsity (masks), a linear path from the model to the target (the staged
  homotopy of Sparse-KD). ``one-shot`` is ``stages`` with n = 1 and takes no other ``stages``; the default
  ``stages=1`` is one-shot too. Every stage is an ordinary `chorus train` run on the model the stage before
  left (fresh AdamW, warmup + cosine; the warmup is at most a fifth of the stage; structured stages are
  physically smaller, so they train faster and may shrink hidden channels) with ``steps`` split evenly, on
  a different data order (seed + 7919·(i − 1)), so n stages see as many distinct batches as one.
- ``linear`` and ``cubic`` (Zhu & Gupta 2017): ONE `chorus train` run over all steps with a
  ``prune.GradualPruner``: the masks grow every ``every`` steps from ``begin`` to ``end`` (default 3/4 of the
  steps: the last quarter recovers at the target) along ``prune.Schedule``, one AdamW and one learning-rate
  schedule throughout. Patterns: unstructured (magnitude, wanda), 2:4 (wanda scores), structured (masked KV
  groups, MLP channels and layers; ``axes`` some of heads, mlp, layers, default heads, mlp). At the end
  structured masks are removed (``prune.remove_masked``) into a smaller model, ``model/``, that computes what
  the masked one did; unstructured and 2:4 masks stay in ``train/model/masks.safetensors``.
- ``in_run=true`` runs ``one-shot`` and ``stages`` the second way: the same sparsity path (stage k of n holds
  k/n of the target; ``end`` defaults to all steps, split evenly as separate runs split them) inside one run.

Why one run is an option and not the default for stages: separate runs keep what the recipe did before the
choice existed (the demo's numbers) and can shrink hidden channels, which masks cannot. Measured
(``benchmarks/sparsekd.py``, docs/results.md "SparseKD"): the same 4-stage path inside one run did better than
4 separate runs, and no better than one-shot, so the loss of separate runs comes from restarting AdamW and the
warmup + cosine schedule at every stage, not from the path; ``in_run=true`` (or one-shot) is the better choice at
the budgets measured.

Teachers never run: every stage, run and retry reads the same caches (``teachers``: the model's own cache, a
stronger teacher, several pooled with the store's blend, or none for CE-only recovery).

Resumable at any point: a stage whose record (``stage-XX/stage.json``, or ``final.json`` for one run)
exists is skipped, a pruned or shrunk model is written whole then renamed into place (pruning is
deterministic), and the distillation resumes from its last checkpoint (every run checkpoints every tenth of
its steps unless ``train`` sets ``save_every``; one run's checkpoints hold the pruner's masks). Running the same
command again continues; another config in the same ``--out`` is refused.
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

from chorus import failpoints, rundir
from chorus.config import CompressConfig, TrainConfig, build_config, to_dict
from chorus.device import resolve_device
from chorus.errors import ChorusError
from chorus.progress import say
from chorus.prune import GradualPruner, Schedule, importance, remove_masked, structured
from chorus.prune import masks as masks_mod
from chorus.prune.masks import Masks
from chorus.prune.schedule import MASKABLE_AXES
from chorus.store import Store, store_vocabulary
from chorus.student.data import CachedRows
from chorus.student.evaluate import evaluate_model
from chorus.student.model import load_student
from chorus.student.training import train

# Keys of `train` that the schedule sets itself.
OWNED_TRAIN_KEYS = ("store", "student", "out", "teachers", "steps", "seed", "resume", "overwrite", "eval_rows",
                    "storage_options")
VOLATILE_KEYS = ("overwrite", "storage_options")
GRADUAL = ("linear", "cubic")  # always inside one run
ONE_RUN_KEYS = ("begin", "end", "every")
UPDATES = 16  # linear / cubic: mask updates between begin and end by default
# method → (GradualPruner pattern, score); 2:4 uses Wanda scores, as the staged path does
PATTERN = {"structured": ("structured", "magnitude"), "magnitude": ("unstructured", "magnitude"),
           "wanda": ("unstructured", "wanda"), "2:4": ("2:4", "wanda")}


# ---------------------------------------------------------------------------------------------- setup
def calibration_batches(store: str, *, rows: int, batch_size: int = 8, storage_options: dict | None = None) -> list[dict]:
    """The first ``rows`` training rows (evenly spread over the store, fixed order) as model inputs."""
    data = CachedRows(store, batch_size=batch_size, split="train", shuffle=False, epochs=1, max_rows=rows, rank=0,
                      world_size=1, storage_options=storage_options)
    return [{"input_ids": b["input_ids"], "attention_mask": (b["segment_ids"] > 0).long()} for b in data]


def in_one_run(cfg: CompressConfig) -> bool:
    """Whether ``cfg`` prunes inside one train run (linear, cubic, or in_run) rather than a run per stage."""
    return cfg.schedule in GRADUAL or cfg.in_run


def resolve(cfg: CompressConfig) -> CompressConfig:
    """``cfg`` with its defaults that depend on the schedule filled in (axes, end, every): what is saved and
    compared on a rerun."""
    one = in_one_run(cfg)
    axes = cfg.axes if cfg.axes is not None else (["heads", "mlp"] if one else ["heads", "mlp", "hidden"])
    end, every = cfg.end, cfg.every
    if one and cfg.schedule in GRADUAL:
        end = round(0.75 * cfg.steps) if end is None else end
        every = max(1, (end - cfg.begin) // UPDATES) if every is None else every
    elif one and cfg.schedule == "stages" and end is None:
        end = cfg.steps
    return dataclasses.replace(cfg, axes=list(axes), end=end, every=every)


def _validate(cfg: CompressConfig) -> None:
    one = in_one_run(cfg)
    if cfg.stages < 1:
        raise ChorusError(f"compress key 'stages': expected a positive integer, got {cfg.stages}")
    if cfg.stages != 1 and cfg.schedule != "stages":
        raise ChorusError(f"compress key 'stages': {cfg.stages} stages need schedule=stages, got "
                          f"schedule={cfg.schedule} (" + ("which prunes once)" if cfg.schedule == "one-shot" else
                                                          "which grows the masks every `every` steps)"))
    if not one:
        if cfg.steps < cfg.stages:
            raise ChorusError(f"compress key 'steps': {cfg.steps} steps cannot be split over {cfg.stages} stages "
                              "(need at least one per stage)")
        set_keys = [k for k in ONE_RUN_KEYS if getattr(cfg, k) not in (None, 0)]
        if set_keys:
            raise ChorusError(f"compress key '{set_keys[0]}': begin, end and every shape pruning inside one run "
                              f"(schedule linear or cubic, or in_run=true); schedule={cfg.schedule} runs each stage "
                              "separately")
    if cfg.method == "structured" and not 0.0 < cfg.target_params < 1.0:
        raise ChorusError(f"compress key 'target_params': expected a fraction in (0, 1), got {cfg.target_params}")
    if cfg.method in ("magnitude", "wanda") and not 0.0 < cfg.sparsity < 1.0:
        raise ChorusError(f"compress key 'sparsity': expected a fraction in (0, 1), got {cfg.sparsity}")
    allowed = MASKABLE_AXES if one else structured.AXES
    bad = [a for a in cfg.axes if a not in allowed]
    if cfg.method == "structured" and (bad or not cfg.axes):
        why = " (inside one run units are masked, and masks cannot shrink hidden channels)" if one else ""
        raise ChorusError(f"compress key 'axes': expected some of {', '.join(allowed)}, got {cfg.axes}{why}")
    if one:
        if cfg.schedule != "one-shot" and not cfg.begin < cfg.end <= cfg.steps:
            raise ChorusError(f"compress key 'end': expected a step after begin={cfg.begin} and at most "
                              f"steps={cfg.steps}, got {cfg.end}")
        if cfg.schedule == "one-shot" and cfg.end is not None:
            raise ChorusError("compress key 'end': a one-shot schedule prunes at `begin` and has no end")
        if not 0 <= cfg.begin < cfg.steps:
            raise ChorusError(f"compress key 'begin': expected a step in [0, steps={cfg.steps}), got {cfg.begin}")
        if cfg.every is not None and (cfg.schedule not in GRADUAL or cfg.every < 1):
            raise ChorusError(f"compress key 'every': expected a positive number of steps with schedule linear or "
                              f"cubic, got {cfg.every} with schedule={cfg.schedule}")
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
        # a key the saved file lacks (written before the key existed) had its default
        defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
        old = {k: v for k, v in (yaml.safe_load(saved.read_text()) or {}).items() if k not in VOLATILE_KEYS}
        changed = sorted(k for k in set(old) | set(new) if old.get(k, defaults.get(k)) != new.get(k))
        if changed:
            raise ChorusError(f"'{cfg.out}' holds another compression (its config differs in: {', '.join(changed)}); "
                              "pass --overwrite to replace it, or choose another --out")
    (rundir.replace if cfg.overwrite else rundir.claim)(out, "compress")
    saved.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
    return out


def stage_steps(total: int, stages: int) -> list[int]:
    """``total`` steps split evenly over ``stages`` (the first ones take the remainder)."""
    return [total // stages + (i < total % stages) for i in range(stages)]


def schedule_of(cfg: CompressConfig) -> Schedule:
    """The in-run schedule of a resolved ``cfg``: its target is the sparsity (structured: the share of the
    parameters removed, as ``structured.param_count`` counts them)."""
    target = {"structured": 1.0 - cfg.target_params, "2:4": 0.5}.get(cfg.method, cfg.sparsity)
    return Schedule(cfg.schedule, target, begin=cfg.begin, end=cfg.end or 0, every=cfg.every or 1, stages=cfg.stages)


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
    pattern, score = PATTERN[cfg.method]
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


def _save_removed(small: torch.nn.Module, trained: Path, where: Path) -> None:
    """``trained`` (a train run's masked model directory: tokenizer, generation config, chorus.json) with the
    smaller model's weights and config instead of the masked ones, written whole then renamed to ``where``."""
    tmp = where.with_name(where.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(trained, tmp, ignore=shutil.ignore_patterns(masks_mod.FILE, "*.safetensors", "config.json"))
    small.save_pretrained(tmp)
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
@dataclasses.dataclass
class _Setup:
    """What both ways of running a schedule share."""

    cfg: CompressConfig
    base: TrainConfig  # the distillation settings every run starts from
    vocab: int
    seq_len: int
    device: torch.device
    out: Path
    calib: list[dict]
    p0: int

    def load(self, spec: str | Path) -> torch.nn.Module:
        return load_student(str(spec), vocab_size=self.vocab, seq_len=self.seq_len).to(self.device)

    def evaluate(self, model: torch.nn.Module) -> dict:
        return evaluate_model(model, self.cfg.store, max_rows=self.cfg.eval_rows, batch_size=self.base.batch_size,
                              teachers=[], chunk_size=self.base.chunk_size, storage_options=self.cfg.storage_options)

    def speed(self, model: torch.nn.Module) -> float:
        return forward_tokens_per_s(model, self.calib[0]["input_ids"])

    def train_config(self, student: str, out: Path, steps: int, seed: int) -> TrainConfig:
        """A run of ``steps``: the warmup at most a fifth of it, a checkpoint every tenth unless ``train`` says."""
        cfg = self.cfg
        save_every = self.base.save_every if "save_every" in {k.replace("-", "_") for k in cfg.train} else \
            max(1, steps // 10)
        return dataclasses.replace(self.base, student=student, out=str(out), teachers=list(cfg.teachers), steps=steps,
                                   seed=seed, warmup_steps=min(self.base.warmup_steps, max(1, steps // 5)),
                                   save_every=save_every, eval_rows=cfg.eval_rows, resume=True,
                                   storage_options=cfg.storage_options)


def run(cfg: CompressConfig) -> dict:
    cfg = resolve(cfg)
    _validate(cfg)
    store = Store.open(cfg.store, "r", cfg.storage_options)
    m = store.manifest
    # every stage's distillation settings, validated now (errors name the key)
    base = build_config(TrainConfig, {"store": cfg.store, "student": cfg.model, "out": cfg.out, "eval_every": 0,
                                      "save_every": 0}, cfg.train)
    device = resolve_device(base.device)
    model = load_student(cfg.model, vocab_size=m.tokenizer.vocab_size, seq_len=m.seq_len, seed=cfg.seed,
                         tokenizer_fingerprint=m.tokenizer.fingerprint, store_tokens=store_vocabulary(store)).to(device)
    if in_one_run(cfg):  # a bad schedule or an unreachable size: refused before any directory exists
        schedule_of(cfg)
        if cfg.method == "structured":
            structured.sizes_for(model.config, cfg.target_params, tuple(cfg.axes))
    out = _prepare_out(cfg)  # after the start model loads: a model that cannot be used leaves no directory
    calib = calibration_batches(cfg.store, rows=cfg.calibration_rows, batch_size=base.batch_size,
                                storage_options=cfg.storage_options)
    s = _Setup(cfg, base, m.tokenizer.vocab_size, m.seq_len, device, out, calib, n_params(model))

    start = out / "stage-00.json"
    if start.is_file():
        row0 = json.loads(start.read_text())
    else:
        row0 = _row(0, s.p0, s.p0, None, s.evaluate(model), s.speed(model), 0)
        start.write_text(json.dumps(row0, indent=2))
    say(_line(row0) + " (the start model)")
    del model
    rows, current = (_one_run if in_one_run(cfg) else _stage_runs)(s)
    rows = [row0, *rows]
    table = format_table(rows)
    print(table)
    result = {"model": current, "schedule": cfg.schedule, "in_run": in_one_run(cfg), "rows": rows, "table": table}
    (out / "results.json").write_text(json.dumps(result, indent=2))
    return result


def _stage_runs(s: _Setup) -> tuple[list[dict], str]:
    """``stages`` / ``one-shot``: prune → distill, one `chorus train` run per stage. Returns the stage rows and
    the final model's directory."""
    cfg, out = s.cfg, s.out
    rows, masks, current = [], None, cfg.model
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
            model = s.load(current)
            masks = Masks.load(current) if i > 1 else None
            small, masks = _prune(cfg, model, masks, i, s.p0, s.calib)
            sd.mkdir(parents=True, exist_ok=True)
            _save_pruned(small, masks, {"stage": i, "of": cfg.stages, "from": current, "params": n_params(small),
                                        "sparsity": masks.sparsity() if masks else 0.0}, pruned)
        res = train(s.train_config(str(pruned), sd / "train", steps[i - 1], cfg.seed + 7919 * (i - 1)))
        model = s.load(trained)
        masks = Masks.load(trained)
        row = _row(i, n_params(model), s.p0, masks, res["eval"], s.speed(model), steps[i - 1])
        record.write_text(json.dumps(row, indent=2))
        failpoints.hit("stage")
        rows.append(row)
        say(_line(row))
        current = str(trained)
    return rows, current


def _one_run(s: _Setup) -> tuple[list[dict], str]:
    """linear / cubic / in_run: one `chorus train` run whose masks follow the schedule; structured masks are
    then removed into ``model/``. Returns the final row and the final model's directory."""
    cfg, out = s.cfg, s.out
    record, trained = out / "final.json", out / "train" / "model"
    final = out / "model" if cfg.method == "structured" else trained
    if record.is_file():
        row = json.loads(record.read_text())
        say(_line(row) + " (done before)")
        return [row], str(final)
    schedule, (pattern, score) = schedule_of(cfg), PATTERN[cfg.method]
    say(f"one run of {cfg.steps} steps, {cfg.method} pruning along a {cfg.schedule} schedule to "
        f"{schedule.target:.0%} " + ("of the parameters" if pattern == "structured" else "sparsity") +
        (f" (steps {cfg.begin} → {cfg.end}" + (f", every {cfg.every}" if cfg.every else "") + ")"
         if cfg.schedule != "one-shot" else f" at step {cfg.begin}"))

    def pruner(model: torch.nn.Module) -> GradualPruner:
        return GradualPruner(model, schedule, pattern=pattern, score=score, axes=tuple(cfg.axes), calibration=s.calib)

    res = train(s.train_config(cfg.model, out / "train", cfg.steps, cfg.seed), pruner=pruner)
    model, masks = s.load(trained), Masks.load(trained)
    ev = res["eval"]
    if pattern == "structured":
        if not (final / "config.json").is_file():
            _save_removed(remove_masked(model, masks), trained, final)
        model, masks = s.load(final), None
        ev = s.evaluate(model)  # the model that is shipped: equal to the masked one up to float rounding
    row = _row(1, n_params(model), s.p0, masks, ev, s.speed(model), cfg.steps)
    record.write_text(json.dumps(row, indent=2))
    say(_line(row))
    return [row], str(final)
