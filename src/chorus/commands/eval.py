"""`chorus eval`: a model's (or a cached teacher's) held-out metrics as a table, and as JSON with ``--out``."""

from __future__ import annotations

import json
import math
import os

from chorus.config import EvalConfig
from chorus.device import resolve_device
from chorus.errors import ChorusError
from chorus.progress import say
from chorus.store import Store, blend_fill, complete_teachers, store_vocabulary, stored_blend
from chorus.student.evaluate import KL_LABEL, evaluate_model, evaluate_teacher_cache
from chorus.student.model import Student, load_student


def _table(res: dict, title: str) -> str:
    bpb = res.get("bits_per_byte", {})
    lines = [title, f"{'domain':<16}{'loss':>9}{'ppl':>11}{'tokens':>9}" + (f"{'bits/byte':>11}" if bpb else "")]
    for d, v in res["per_domain"].items():
        lines.append(f"{d:<16}{v:>9.4f}{res['ppl'][d]:>11.2f}{res['tokens'][d]:>9}"
                     + (f"{bpb[d]:>11.4f}" if d in bpb else ""))
    lines.append(f"{'mean':<16}{res['mean']:>9.4f}{math.exp(min(res['mean'], 700)):>11.2f}"
                 + (f"{'':>9}{res['bpb_mean']:>11.4f}" if bpb else ""))
    lines.append(f"{'worst':<16}{res['worst']:>9.4f}   ({res['worst_domain']})"
                 + (f"; bits/byte {res['bpb_worst']:.4f} ({res['bpb_worst_domain']})" if bpb else ""))
    lines.append(f"ECE (top-1, 15 bins): {res['ece']:.4f}")
    if res.get("note"):
        lines.append(f"note: {res['note']}")
    if res["teachers"]:
        lines.append(f"{'teacher':<16}{'KL(t||s)*':>10}{'top-1 agree':>13}")
        for t, r in res["teachers"].items():
            lines.append(f"{t:<16}{r['kl']:>10.4f}{r['top1_agreement']:>13.3f}")
        lines.append(f"* {KL_LABEL}")
    ens = res.get("ensemble")
    if ens:
        fitted = f", blend '{ens['blend']}'" if ens.get("blend") else ""
        lines.append(f"ensemble ({ens['operator']}, weighting {ens['weighting']}{fitted}): mean inter-teacher JSD "
                     f"{ens['mean_jsd']:.4f}")
        for d, j in ens["jsd_per_domain"].items():
            ws = ", ".join(f"{t} {w:.2f}" for t, w in ens["weights_per_domain"][d].items())
            lines.append(f"  {d:<14} JSD {j:.4f}  weights {ws}")
        lines.append("  pooled top-1 differs from: " + ", ".join(f"{t} {x:.1%}" for t, x in ens["pooled_top1_differs"].items()))
    return "\n".join(lines)


def _model_dir(path: str) -> str:
    """A `chorus train` run directory holds the model in ``model/``."""
    sub = os.path.join(path, "model")
    return sub if os.path.isfile(os.path.join(sub, "config.json")) else path


def _pooling(cfg: EvalConfig, st: Store, teachers: list[str]) -> dict:
    """The ensemble diagnostics pool as `chorus train` does: the store's fitted blend for these teachers fills
    in the per-domain weights and the per-token weighting, unless the user chose a weighting or set blend=false."""
    pool = {"weighting": cfg.weighting, "beta": cfg.beta, "domain_weights": None}
    fitted = stored_blend(st, teachers) if cfg.blend and len(teachers) >= 2 else None
    if fitted is None:
        return pool
    return pool | blend_fill(fitted, domain_weights={}, weighting=cfg.weighting, operator=cfg.aggregate) \
        | {"blend": fitted["choice"]}


def run(cfg: EvalConfig) -> dict:
    if cfg.split not in ("train", "valid"):
        raise ChorusError(f"--split must be train or valid, got '{cfg.split}'")
    st = Store.open(cfg.store, "r", cfg.storage_options)
    m = st.manifest
    if cfg.model.startswith("teacher:"):
        name = cfg.model.split(":", 1)[1]
        res = evaluate_teacher_cache(cfg.store, name, split=cfg.split, batch_size=cfg.batch_size, max_rows=cfg.max_rows,
                                     storage_options=cfg.storage_options)
        res["model"] = cfg.model
        title = f"teacher '{name}' from its cache on split '{cfg.split}' ({res['rows']} rows)"
    else:
        device = resolve_device(cfg.device)
        model = load_student(_model_dir(cfg.model), vocab_size=m.tokenizer.vocab_size, seq_len=m.seq_len,
                             tokenizer_fingerprint=m.tokenizer.fingerprint, store_tokens=store_vocabulary(st)).to(device)
        teachers = cfg.teachers or complete_teachers(st)
        left_out = sorted(set(st.teacher_names()) - set(teachers)) if not cfg.teachers else []
        if left_out:  # incomplete, of another corpus, damaged or of an old mapping: `chorus verify` names why
            say(f"warning: not comparing with teacher(s) {', '.join(left_out)}, which cannot be read as complete "
                "caches (pass --teachers NAME to see why, or run `chorus verify`)")
        pool = _pooling(cfg, st, teachers)
        blend = pool.pop("blend", None)
        res = evaluate_model(Student(model, m.tokenizer.vocab_size), cfg.store, split=cfg.split, batch_size=cfg.batch_size,
                             max_rows=cfg.max_rows, teachers=teachers, chunk_size=cfg.chunk_size, operator=cfg.aggregate,
                             alpha=cfg.alpha, storage_options=cfg.storage_options, **pool)
        if "ensemble" in res and blend:
            res["ensemble"]["blend"] = blend
        res["model"] = cfg.model
        title = f"model '{cfg.model}' on split '{cfg.split}' ({res['rows']} rows)"
    print(_table(res, title))
    if cfg.out:
        os.makedirs(os.path.dirname(os.path.abspath(cfg.out)), exist_ok=True)
        with open(cfg.out, "w") as f:
            json.dump(res, f, indent=2)
        say(f"metrics → {cfg.out}")
    return res
