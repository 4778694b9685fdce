"""`chorus blend`: fit how several cached teachers are combined, from cached statistics only, and record
the blend in the store so everyone who shares the cache trains with it.

setup (store, teachers, each at its calibrated temperature) → collect (held-out rows: every teacher's exact
gold log-prob, entropy and log-likelihood of the document so far at every position, from the target
builder) → fit (per-domain mixture weights by EM, and the sharpness β of each per-token weighting by a
grid, on one half of the held-out positions) → compare (held-out gold NLL of the pooled target on the
other half: uniform, per-domain, and each per-token weighting on a uniform or per-domain prior) → write
(the winner, with the report, in the store's attributes).

The pooled target's gold log-loss is what a good target minimizes, and for the linear pool it is exact
from the cached gold log-probs: p(g) = Σ_t w_t p_t(g). The per-token candidates are gold-free, so they
route a corpus without domain labels: confidence (each teacher's exact entropy) and context (how well each
teacher predicted the document so far, targets.context_loglik). Likelihood weights peek at the gold token,
so their held-out NLL would be meaningless; they are not candidates here.
"""

from __future__ import annotations

import math

import torch

from chorus import failpoints
from chorus.config import BlendConfig
from chorus.distill.blend import TEMPERATURE_SCALES, compare
from chorus.distill.calibration import DEFAULT_POSITIONS
from chorus.distill.sparse import IGNORE_INDEX, cat, entropy, gold_log_prob, soften
from chorus.distill.targets import TargetBuilder, context_loglik
from chorus.errors import ChorusError
from chorus.progress import Progress, say
from chorus.store import BLEND_KEY, Store, check_teachers, complete_teachers
from chorus.student.data import CachedRows, positions


def run(cfg: BlendConfig) -> dict:
    if cfg.max_rows is not None and cfg.max_rows < 1:
        raise ChorusError(f"--max-rows must be a positive number of rows, got {cfg.max_rows}")
    store = Store.open(cfg.store, "a", cfg.storage_options)
    names = list(cfg.teachers) or complete_teachers(store)
    if len(names) < 2:
        raise ChorusError(f"blend needs at least two complete teachers; the store has: {', '.join(names) or 'none'}")
    manifests = check_teachers(store, names)
    m = store.manifest
    builder = TargetBuilder(manifests, m.tokenizer.vocab_size, calibrated=False)  # raw: the blend picks T
    data = CachedRows(cfg.store, batch_size=64, teachers=names, split=cfg.split, shuffle=False, epochs=1,
                      max_rows=cfg.max_rows or -(-DEFAULT_POSITIONS // m.seq_len), stratify=True, rank=0, world_size=1, storage_options=cfg.storage_options)
    dists, golds, ctxs, doms = [[] for _ in names], [], [], []
    with Progress("blend", total=data.rows_per_epoch, unit="rows") as bar:
        for batch in data:
            pos = positions(batch)
            keep = pos.gold != IGNORE_INDEX
            for i, t in enumerate(names):
                dists[i].append(builder.teacher(i, batch["teachers"][t], pos.select).rows(keep))
            golds.append(pos.gold[keep])
            ctxs.append(context_loglik(batch, names, pos.select)[keep])
            doms.append(pos.domain[keep])
            bar.update(len(batch["row"]), tokens=int(keep.sum()))
    raw, gold, domain = [cat(d) for d in dists], torch.cat(golds), torch.cat(doms)
    context = torch.cat(ctxs)
    fit = torch.arange(len(domain)) % 2 == 0  # interleaved halves: every domain in both
    calibrated = {t.name: t.temperature for t in manifests}
    trials = {}
    for scale in TEMPERATURE_SCALES:  # the calibrated temperatures, scaled together: the pool's own optimum
        temps = {t: calibrated[t] * scale for t in names}
        soft = [soften(d, temps[t]) for d, t in zip(raw, names)]
        gold_lp = torch.stack([gold_log_prob(d, gold) for d in soft], -1)
        signals = {"confidence": -torch.stack([entropy(d) for d in soft], -1), "context": context}
        trials[scale] = (temps, gold_lp, compare(gold_lp, signals, domain, len(m.domains), fit))
    # chosen on the fit half; the report is the other half's
    scale, best = min(((s, k) for s, (_, _, c) in trials.items() for k in c), key=lambda sk: trials[sk[0]][2][sk[1]]["fit_nll"])
    temps, gold_logp, cands = trials[scale]
    teacher_nll = {t: {m.domains[d]: float(-gold_logp[(~fit) & (domain == d), i].mean())
                       for d in range(len(m.domains)) if bool(((~fit) & (domain == d)).any())}
                   for i, t in enumerate(names)}
    chosen = cands[best]
    record = {
        "teachers": names, "operator": "mixture", "choice": best,
        "weighting": chosen["weighting"], "beta": chosen["beta"],
        "domain_weights": {d: {t: float(chosen["domain_weights"][i, j]) for j, t in enumerate(names)}
                           for i, d in enumerate(m.domains)},
        "temperatures": temps, "temperature_scale": scale, "calibrated_temperatures": calibrated,
        "report": {"heldout_nll": {k: c["heldout_nll"] for k, c in cands.items()},
                   "heldout_nll_per_domain": {k: {m.domains[d]: v for d, v in c["heldout_nll_per_domain"].items()}
                                              for k, c in cands.items()},
                   "teacher_nll_per_domain": teacher_nll, "positions": int(len(domain)), "split": cfg.split},
    }
    failpoints.hit("record")
    store.group.attrs[BLEND_KEY] = record
    failpoints.hit("recorded")
    _print(record, m.domains)
    say(f"blend '{best}' written to store '{cfg.store}'; `chorus train --teachers {','.join(names)}` uses it "
        "by default (blend: false to ignore it)")
    return record


def _print(record: dict, domains) -> None:
    rep, names = record["report"], record["teachers"]
    print(f"held-out gold NLL of the pooled target ({rep['positions']:,} positions, half fit, half scored):")
    print(f"{'':<24}" + "".join(f"{d:>10}" for d in domains) + f"{'mean':>10}")
    for k, per in rep["heldout_nll_per_domain"].items():
        mark = " *" if k == record["choice"] else ""
        print(f"{k + mark:<24}" + "".join(f"{per.get(d, math.nan):>10.4f}" for d in domains)
              + f"{rep['heldout_nll'][k]:>10.4f}")
    for t in names:
        per = rep["teacher_nll_per_domain"][t]
        print(f"{'teacher ' + t:<24}" + "".join(f"{per.get(d, math.nan):>10.4f}" for d in domains))
    temps = ", ".join(f"{t} {v:.3f}" for t, v in record["temperatures"].items())
    print(f"temperatures (calibrated × {record['temperature_scale']}): {temps}")
    print(f"prior weights ({record['choice']}: per-token weighting {record['weighting']}, β = {record['beta']}):")
    for d, ws in record["domain_weights"].items():
        print(f"  {d:<14}" + ", ".join(f"{t} {w:.2f}" for t, w in ws.items()))
