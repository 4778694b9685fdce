"""`chorus blend`: fit how several cached teachers are combined, from cached statistics only, and record
the blend in the store so everyone who shares the cache trains with it.

setup (store, teachers, each at its calibrated temperature) → collect (held-out rows: every teacher's exact
gold log-prob and entropy at every position, from the target builder) → fit (per-domain mixture weights
by EM, and the sharpness β of per-token confidence weighting by a grid, each on one half of the held-out
positions) → compare (held-out gold NLL of the pooled target on the other half: uniform, per-domain,
confidence, per-domain × confidence) → write (the winner, with the report, in the store's attributes).

The pooled target's gold log-loss is what a good target minimizes, and for the linear pool it is exact
from the cached gold log-probs: p(g) = Σ_t w_t p_t(g). Confidence weights come from each teacher's exact
entropy (gold-free, so they route a corpus without domain labels). Likelihood weights peek at the gold
token, so their held-out NLL would be meaningless; they are not candidates here.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from chorus._progress import Progress, say
from chorus.config import BlendConfig
from chorus.errors import ChorusError
from chorus.storage import Store
from chorus.trainer.data import CachedRows, check_teachers, complete_teachers, positions
from chorus.trainer.sparse import entropy, gold_log_prob
from chorus.trainer.targets import TargetBuilder

BLEND_KEY = "chorus_blend"
BETAS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
_EM_STEPS = 100


def pooled_nll(gold_logp: Tensor, weights: Tensor) -> Tensor:
    """(N,) −log Σ_t w_t p_t(g) for gold log-probs (N, T) and weights (N, T) (rows sum to 1)."""
    return -torch.logsumexp(weights.clamp_min(1e-30).log() + gold_logp, dim=-1)


def fit_domain_weights(gold_logp: Tensor, domain: Tensor, num_domains: int) -> Tensor:
    """(D, T) mixture weights per domain maximizing Σ log Σ_t w_{d,t} p_t(g) (EM: the responsibilities'
    mean is the next weight; the log-likelihood never decreases). Domains without positions stay uniform."""
    t = gold_logp.shape[1]
    w = torch.full((num_domains, t), 1.0 / t, dtype=torch.float64)
    lp = gold_logp.double()
    for _ in range(_EM_STEPS):
        resp = torch.softmax(w[domain].log() + lp, dim=-1)
        total = torch.zeros_like(w).index_add_(0, domain, resp)
        count = torch.bincount(domain, minlength=num_domains).double()[:, None]
        w = torch.where(count > 0, total / count.clamp_min(1), w).clamp_min(1e-6)
        w = w / w.sum(-1, keepdim=True)
    return w.float()


def confidence(prior: Tensor, ent: Tensor, beta: float) -> Tensor:
    """(N, T) w ∝ prior · exp(−β H_t): the confidence weighting of ensemble.confidence_weights."""
    return torch.softmax(prior.clamp_min(1e-30).log() - beta * ent, dim=-1)


def compare(gold_logp: Tensor, ent: Tensor, domain: Tensor, num_domains: int, fit: Tensor) -> dict:
    """Fit on positions ``fit`` (bool), score on the others: mean held-out NLL per candidate blend."""
    t = gold_logp.shape[1]
    test = ~fit
    if not bool(fit.any()) or not bool(test.any()):
        raise ChorusError("blend needs held-out positions to fit on and to score on; use more --max-rows")
    per_domain = fit_domain_weights(gold_logp[fit], domain[fit], num_domains)
    uniform = torch.full((num_domains, t), 1.0 / t)

    def score(table: Tensor, beta: float, rows: Tensor) -> float:
        w = confidence(table[domain[rows]], ent[rows], beta) if beta else table[domain[rows]]
        return float(pooled_nll(gold_logp[rows], w).mean())

    best_beta = {name: min(BETAS, key=lambda b: score(table, b, fit)) for name, table in
                 (("uniform", uniform), ("per_domain", per_domain))}
    out = {
        "uniform": {"domain_weights": uniform, "beta": 0.0},
        "per_domain": {"domain_weights": per_domain, "beta": 0.0},
        "confidence": {"domain_weights": uniform, "beta": best_beta["uniform"]},
        "per_domain_confidence": {"domain_weights": per_domain, "beta": best_beta["per_domain"]},
    }
    for cand in out.values():
        cand["heldout_nll"] = score(cand["domain_weights"], cand["beta"], test)
        cand["heldout_nll_per_domain"] = {
            d: float(pooled_nll(gold_logp[test & (domain == d)],
                                (confidence(cand["domain_weights"][domain[test & (domain == d)]],
                                            ent[test & (domain == d)], cand["beta"]) if cand["beta"]
                                 else cand["domain_weights"][domain[test & (domain == d)]])).mean())
            for d in range(num_domains) if bool((test & (domain == d)).any())}
    return out


def stored_blend(store: Store, teachers: list[str]) -> dict | None:
    """The blend recorded in ``store`` for exactly these teachers (in any order), else None."""
    blend = store.group.attrs.get(BLEND_KEY)
    if not blend or sorted(blend.get("teachers", [])) != sorted(teachers):
        return None
    return blend


def run(cfg: BlendConfig) -> dict:
    store = Store.open(cfg.store, "a", cfg.storage_options)
    names = list(cfg.teachers) or complete_teachers(store)
    if len(names) < 2:
        raise ChorusError(f"blend needs at least two complete teachers; the store has: {', '.join(names) or 'none'}")
    manifests = check_teachers(store, names)
    m = store.manifest
    builder = TargetBuilder(manifests, m.tokenizer.vocab_size, calibrated=True)
    data = CachedRows(cfg.store, batch_size=64, teachers=names, split=cfg.split, shuffle=False, epochs=1,
                      max_rows=cfg.max_rows, rank=0, world_size=1, storage_options=cfg.storage_options)
    golds, ents, doms = [], [], []
    with Progress("blend", total=data.rows_per_epoch, unit="rows") as bar:
        for batch in data:
            pos = positions(batch)
            keep = pos.gold != -100
            dists = [builder.teacher(i, batch["teachers"][t], pos.select) for i, t in enumerate(names)]
            golds.append(torch.stack([gold_log_prob(d, pos.gold) for d in dists], -1)[keep])
            ents.append(torch.stack([entropy(d) for d in dists], -1)[keep])
            doms.append(pos.domain[keep])
            bar.update(len(batch["row"]), tokens=int(keep.sum()))
    gold_logp, ent, domain = torch.cat(golds), torch.cat(ents), torch.cat(doms)
    fit = torch.arange(len(domain)) % 2 == 0  # interleaved halves: every domain in both
    cands = compare(gold_logp, ent, domain, len(m.domains), fit)
    best = min(cands, key=lambda k: cands[k]["heldout_nll"])
    teacher_nll = {t: {m.domains[d]: float(-gold_logp[(~fit) & (domain == d), i].mean())
                       for d in range(len(m.domains)) if bool(((~fit) & (domain == d)).any())}
                   for i, t in enumerate(names)}
    chosen = cands[best]
    record = {
        "teachers": names, "operator": "mixture", "choice": best,
        "weighting": "confidence" if chosen["beta"] else "none", "beta": chosen["beta"],
        "domain_weights": {d: {t: float(chosen["domain_weights"][i, j]) for j, t in enumerate(names)}
                           for i, d in enumerate(m.domains)},
        "temperatures": {t.name: t.temperature for t in manifests},
        "report": {"heldout_nll": {k: c["heldout_nll"] for k, c in cands.items()},
                   "heldout_nll_per_domain": {k: {m.domains[d]: v for d, v in c["heldout_nll_per_domain"].items()}
                                              for k, c in cands.items()},
                   "teacher_nll_per_domain": teacher_nll, "positions": int(len(domain)), "split": cfg.split},
    }
    store.group.attrs[BLEND_KEY] = record
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
    print(f"weights ({record['choice']}, β = {record['beta']}):")
    for d, ws in record["domain_weights"].items():
        print(f"  {d:<14}" + ", ".join(f"{t} {w:.2f}" for t, w in ws.items()))
