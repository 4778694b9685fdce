"""Blending several teachers' pooled target: per-domain mixture weights by EM on held-out gold log-probs, per-token
reweighting by a gold-free signal, and the held-out comparison of the candidates that `chorus blend` records.

For the linear pool the pooled target's gold log-loss is exact from the cached gold log-probs:
p(g) = Σ_t w_t p_t(g).
"""

from __future__ import annotations

import torch
from torch import Tensor

from chorus.errors import ChorusError

# β grid per per-token signal (weights ∝ prior · exp(β · signal)); context sums grow with the document
SIGNAL_BETAS = {"confidence": (0.25, 0.5, 1.0, 2.0, 4.0), "context": (0.02, 0.05, 0.1, 0.25, 0.5, 1.0)}
_EM_STEPS = 100
# The teachers' calibrated temperatures are fitted one teacher at a time; pooled, calibrated forecasters are
# under-confident (a mixture flattens where they disagree), so the blend rescales them together.
TEMPERATURE_SCALES = (0.7, 0.8, 0.9, 1.0, 1.1)


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


def reweight(prior: Tensor, signal: Tensor | None, beta: float) -> Tensor:
    """(N, T) w ∝ prior · exp(β · signal): confidence uses signal = −H_t (ensemble.confidence_weights),
    context the document's log-likelihood so far (targets.context_loglik)."""
    if signal is None or beta == 0:
        return prior
    return torch.softmax(prior.clamp_min(1e-30).log() + beta * signal, dim=-1)


def compare(gold_logp: Tensor, signals: dict[str, Tensor], domain: Tensor, num_domains: int, fit: Tensor) -> dict:
    """Fit on positions ``fit`` (bool), score on the others: mean held-out NLL per candidate blend.
    ``signals``: per-token weighting name → (N, T) signal (see :func:`reweight`)."""
    t = gold_logp.shape[1]
    test = ~fit
    if not bool(fit.any()) or not bool(test.any()):
        raise ChorusError("blend needs held-out positions to fit on and to score on; use more --max-rows")
    priors = {"uniform": torch.full((num_domains, t), 1.0 / t),
              "per_domain": fit_domain_weights(gold_logp[fit], domain[fit], num_domains)}

    def nll(table: Tensor, weighting: str, beta: float, rows: Tensor) -> Tensor:
        signal = signals[weighting][rows] if weighting != "none" else None
        return pooled_nll(gold_logp[rows], reweight(table[domain[rows]], signal, beta))

    out = {}
    for prior_name, table in priors.items():
        out[prior_name] = {"domain_weights": table, "weighting": "none", "beta": 0.0}
        for weighting in signals:
            beta = min(SIGNAL_BETAS[weighting], key=lambda b: float(nll(table, weighting, b, fit).mean()))
            name = weighting if prior_name == "uniform" else f"{prior_name}_{weighting}"
            out[name] = {"domain_weights": table, "weighting": weighting, "beta": beta}
    for cand in out.values():
        cand["fit_nll"] = float(nll(cand["domain_weights"], cand["weighting"], cand["beta"], fit).mean())
        scores = nll(cand["domain_weights"], cand["weighting"], cand["beta"], test)
        cand["heldout_nll"] = float(scores.mean())
        dom = domain[test]
        cand["heldout_nll_per_domain"] = {d: float(scores[dom == d].mean()) for d in range(num_domains)
                                          if bool((dom == d).any())}
    return out
