"""`chorus calibrate`: fit one temperature per teacher on held-out rows and record it in its manifest.

setup (store, teacher check) → loop (stream held-out rows — ``--max-rows``, by default ~1 M positions, stratified
by domain — gather the cached top-k at every position
that predicts a real token) → fit (T minimizing the mean gold-token NLL of the softened sparse
distribution, Guo et al. 2017) → report (NLL and ECE before/after) → write (manifest temperature).
Training then softens this teacher by T before pooling, so an overconfident teacher no longer drowns
out a careful one. The fit always starts from the cached (T = 1) values, so rerunning is idempotent.
"""

from __future__ import annotations

import math

import torch

from chorus import failpoints
from chorus.config import CalibrateConfig
from chorus.distill.calibration import (
    DEFAULT_POSITIONS,
    PROB_FLOOR,
    expected_calibration_error,
    fit_temperature,
    top1_confidence,
)
from chorus.distill.sparse import IGNORE_INDEX, SparseDist, cat, gold_log_prob, soften
from chorus.distill.targets import TargetBuilder
from chorus.errors import ChorusError
from chorus.progress import Progress, say
from chorus.store import Store, check_teachers
from chorus.student.data import CachedRows, positions


def _nll(dist: SparseDist, gold: torch.Tensor) -> float:
    return float(-gold_log_prob(dist, gold).clamp_min(math.log(PROB_FLOOR)).mean())


def _ece(dist: SparseDist, gold: torch.Tensor) -> float:
    return expected_calibration_error(*top1_confidence(dist, gold))


def run(cfg: CalibrateConfig) -> dict:
    store = Store.open(cfg.store, "a", cfg.storage_options)
    (teacher,) = check_teachers(store, [cfg.teacher])
    vocab = store.manifest.tokenizer.vocab_size
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise ChorusError(f"--max-rows must be a positive number of rows, got {cfg.max_rows}")
    # every held-out position would not fit in memory at scale (~190 GB at 10 B tokens); one temperature is
    # pinned down by far fewer: by default ~1 M positions, stratified by domain, from a few whole shards
    rows = cfg.max_rows or -(-DEFAULT_POSITIONS // store.manifest.seq_len)
    data = CachedRows(cfg.store, batch_size=64, teachers=[cfg.teacher], split=cfg.split, shuffle=False, epochs=1,
                      max_rows=rows, stratify=True, rank=0, world_size=1, storage_options=cfg.storage_options)

    builder = TargetBuilder([teacher], vocab, calibrated=False)  # the fit starts from the cached T = 1 values
    dists, gold = [], []
    with Progress(f"calibrate {cfg.teacher}", total=data.rows_per_epoch, unit="rows") as bar:
        for batch in data:
            pos = positions(batch)
            dists.append(builder.teacher(0, batch["teachers"][cfg.teacher], pos.select))
            gold.append(pos.gold)
            bar.update(len(batch["row"]), tokens=len(pos.select))
    gold_t = torch.cat(gold)
    keep = gold_t != IGNORE_INDEX
    if not bool(keep.any()):
        raise ChorusError(f"split '{cfg.split}' has no token to calibrate teacher '{cfg.teacher}' on")
    dist = cat(dists).rows(keep)
    gold_t = gold_t[keep]

    temperature = fit_temperature(dist, gold_t)
    fitted = soften(dist, temperature)
    report = {"nll_before": _nll(dist, gold_t), "nll_after": _nll(fitted, gold_t),
              "ece_before": _ece(dist, gold_t), "ece_after": _ece(fitted, gold_t),
              "rows": data.rows_per_epoch, "tokens": int(len(gold_t)), "split": cfg.split}
    failpoints.hit("record")
    store.write_teacher_manifest(teacher.replace(temperature=float(temperature), calibration=report))
    failpoints.hit("recorded")

    print(f"teacher '{cfg.teacher}': temperature {temperature:.4f} fitted on {report['tokens']:,} tokens "
          f"({report['rows']} {cfg.split} rows)")
    print(f"{'':<8}{'NLL':>9}{'ECE':>9}")
    print(f"{'before':<8}{report['nll_before']:>9.4f}{report['ece_before']:>9.4f}")
    print(f"{'after':<8}{report['nll_after']:>9.4f}{report['ece_after']:>9.4f}")
    say(f"temperature {temperature:.4f} written to the manifest of teacher '{cfg.teacher}'; "
        "`chorus train` applies it before pooling (calibrated: false to ignore it)")
    return {"temperature": float(temperature), **report}
