"""Evaluation on held-out rows: per-domain loss and perplexity, mean and worst domain, calibration (ECE of
next-token top-1 probabilities), and for each cached teacher the student's KL to it and top-1
agreement with it; ensemble diagnostics when there are several teachers.

A teacher is evaluated from its cache (``--model teacher:NAME``) without loading it: the gold token's
log-prob is the exact one cached with the statistics (format v2); a v1 cache falls back to the top-k
value or the even-tail estimate tail / (V − k), which can be far off, and says so.

The student's KL to a teacher is computed over the teacher's top-k plus one tail bucket: by the data
processing inequality it is a lower bound of the full-vocabulary KL(t‖s), and labelled so.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict, defaultdict
from collections.abc import Iterable, Iterator

import torch

from chorus.distill import ensemble
from chorus.distill.calibration import expected_calibration_error, top1_confidence
from chorus.distill.losses import CPU_LOSS_CHUNK, forward_kl
from chorus.distill.sparse import IGNORE_INDEX, gold_log_prob
from chorus.distill.targets import TargetBuilder, context_loglik, pool
from chorus.errors import ChorusError
from chorus.store import Store, check_teachers, complete_teachers, token_byte_lengths
from chorus.student.data import CachedRows, Positions, positions
from chorus.student.model import Student

KL_LABEL = "KL(t||s) over top-k + tail bucket (a lower bound of the full KL)"
EVAL_CACHE_BYTES = 1 << 30  # held-out batches kept in memory between evaluations (training evaluates every N steps)
_CACHE: OrderedDict[tuple, list[dict]] = OrderedDict()


def _nbytes(x) -> int:
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    return sum(_nbytes(v) for v in x.values()) if isinstance(x, dict) else 0


def held_out(store: str, *, teachers: list[str], split: str, batch_size: int, max_rows: int | None,
             storage_options: dict | None) -> tuple[list, Iterable[dict]]:
    """(teacher manifests, batches) of an evaluation. ``max_rows`` are stratified by domain and read from a few
    whole shards; the batches are kept (up to ``EVAL_CACHE_BYTES``) for the next evaluation of the same rows, so
    a training run reads them from the store once. The key holds the corpus and teacher fingerprints: a rebuilt
    store or cache is read afresh."""
    st = Store.open(store, "r", storage_options)
    manifests = check_teachers(st, teachers)
    key = (store, json.dumps(storage_options or {}, sort_keys=True, default=str), split, batch_size, max_rows,
           st.manifest.fingerprint, tuple((t.name, t.fingerprint) for t in manifests))
    if key in _CACHE:
        _CACHE.move_to_end(key)
        return manifests, _CACHE[key]
    data = CachedRows(store, batch_size=batch_size, teachers=teachers, split=split, shuffle=False, epochs=1,
                      max_rows=max_rows, stratify=True, rank=0, world_size=1, storage_options=storage_options)

    def batches() -> Iterator[dict]:
        kept: list[dict] | None = []
        size = 0
        for batch in data:
            size += _nbytes(batch)
            if kept is not None and size <= EVAL_CACHE_BYTES:
                kept.append(batch)
            else:
                kept = None
            yield batch
        if kept is not None:
            _CACHE[key] = kept
            while sum(_nbytes(b) for v in _CACHE.values() for b in v) > EVAL_CACHE_BYTES:
                _CACHE.popitem(last=False)

    return data.teacher_manifests, batches()


class _Sums:
    """Per-domain token-weighted sums."""

    def __init__(self) -> None:
        self.sum: dict = defaultdict(float)
        self.n: dict = defaultdict(int)

    def add(self, values: torch.Tensor, domain: torch.Tensor, num_domains: int) -> None:
        values = values.double().cpu()
        domain = domain.cpu()
        s = torch.bincount(domain, weights=values, minlength=num_domains)
        c = torch.bincount(domain, minlength=num_domains)
        for d in range(num_domains):
            if c[d]:
                self.sum[d] += float(s[d])
                self.n[d] += int(c[d])

    def total(self) -> float:
        return sum(self.sum.values()) / max(sum(self.n.values()), 1)

    def per_domain(self, names) -> dict:
        return {names[d]: self.sum[d] / self.n[d] for d in sorted(self.n)}


class _TextBytes(_Sums):
    """Per-domain bytes of text behind the gold tokens, from the store's copy of its tokenizer (none: no copy)."""

    def __init__(self, st: Store) -> None:
        super().__init__()
        lengths = token_byte_lengths(st, st.manifest.tokenizer.vocab_size)
        self.lengths = None if lengths is None else torch.tensor(lengths, dtype=torch.float64)

    def add_gold(self, gold: torch.Tensor, domain: torch.Tensor, num_domains: int) -> None:
        if self.lengths is not None:
            self.add(self.lengths[gold.cpu()], domain, num_domains)


def _bits_per_byte(loss: _Sums, nbytes: _TextBytes | None, names) -> dict:
    """Per domain, mean and worst bits per byte of text: a unit that does not depend on the tokenizer, so models
    and teachers of other tokenizers compare (the same nats over the same text's bytes)."""
    if nbytes is None or nbytes.lengths is None:
        return {}
    per = {names[d]: loss.sum[d] / math.log(2) / nbytes.sum[d] for d in sorted(loss.n) if nbytes.sum[d] > 0}
    if not per:
        return {}
    worst = max(per, key=per.get)
    return {"bits_per_byte": per, "bpb_mean": sum(per.values()) / len(per), "bpb_worst": per[worst],
            "bpb_worst_domain": worst}


def _summary(loss: _Sums, names, conf: list, correct: list, nbytes: _TextBytes | None = None) -> dict:
    per = loss.per_domain(names)
    if not per:
        raise ChorusError("no held-out tokens to evaluate (every selected row is padding)")
    worst = max(per, key=per.get)
    return {**_bits_per_byte(loss, nbytes, names),
        "per_domain": per,
        "ppl": {d: math.exp(min(v, 700.0)) for d, v in per.items()},
        "tokens": {names[d]: n for d, n in sorted(loss.n.items())},
        "mean": sum(per.values()) / len(per),
        "worst": per[worst],
        "worst_domain": worst,
        "token_mean": loss.total(),
        "ece": expected_calibration_error(torch.cat(conf), torch.cat(correct)),
    }


def _predictable(pos: Positions) -> Positions | None:
    """``pos`` without ignored positions (gold -100: ``positions`` keeps one in a batch with nothing to
    predict, for DDP's sake), or None when none is left."""
    keep = pos.gold != IGNORE_INDEX
    if bool(keep.all()):
        return pos
    if not bool(keep.any()):
        return None
    return Positions(pos.select[keep], pos.gold[keep], pos.domain[keep], pos.attention_mask)


@torch.no_grad()
def evaluate_model(model, store: str, *, split: str = "valid", batch_size: int = 8, max_rows: int | None = None,
                   teachers: list[str] | None = None, chunk_size: int | None = None, operator: str = "mixture",
                   weighting: str = "none", alpha: float = 0.5, beta: float = 1.0,
                   domain_weights: dict | None = None, storage_options: dict | None = None) -> dict:
    """Metrics of ``model`` (a :class:`~chorus.student.model.Student`, or a causal LM it wraps) on
    ``split``. ``teachers``: cached teachers to compare with (None: every complete one), pooled by ``operator``
    with ``domain_weights`` ({domain: {teacher: weight}}, default 1) as each position's prior."""
    st = Store.open(store, "r", storage_options)
    m = st.manifest
    names = list(m.domains)
    teachers = complete_teachers(st) if teachers is None else list(teachers)
    student = model if isinstance(model, Student) else Student(model, m.tokenizer.vocab_size)
    device = student.device
    was_training = student.training
    student.eval()
    manifests, data = held_out(store, teachers=teachers, split=split, batch_size=batch_size, max_rows=max_rows,
                               storage_options=storage_options)
    v, nd = m.tokenizer.vocab_size, len(names)
    builder = TargetBuilder(manifests, v, calibrated=False, warn=False) if teachers else None
    loss, conf, correct = _Sums(), [], []
    nbytes = _TextBytes(st)
    kl = {t: _Sums() for t in teachers}
    agree = {t: _Sums() for t in teachers}
    jsd, differs, weights = _Sums(), {t: _Sums() for t in teachers}, {t: _Sums() for t in teachers}
    table = torch.tensor([[float((domain_weights or {}).get(d, {}).get(t, 1.0)) for t in teachers] for d in names],
                         dtype=torch.float32, device=device)
    rows = 0
    for batch in data:
        rows += len(batch["row"])
        pos = _predictable(positions(batch, device))
        if pos is None:  # every position of the batch is padding: nothing to score
            continue
        dists = [builder.teacher(i, batch["teachers"][t], pos.select, device) for i, t in enumerate(teachers)]
        ctx = context_loglik(batch, teachers, pos.select, device) if weighting == "context" and len(teachers) >= 2 else None
        for sl, s_logp in student.log_probs_chunks(batch["input_ids"].to(device), pos.attention_mask, pos.select,
                                                   chunk_size or CPU_LOSS_CHUNK):
            gold, dom = pos.gold[sl], pos.domain[sl]
            top_logp, pred = s_logp.max(-1)
            loss.add(-s_logp.gather(1, gold[:, None])[:, 0], dom, nd)
            nbytes.add_gold(gold, dom, nd)
            conf.append(top_logp.exp().cpu())
            correct.append((pred == gold).cpu())
            chunk = [d.rows(sl) for d in dists]
            for t, d in zip(teachers, chunk):
                kl[t].add(forward_kl(d, s_logp), dom, nd)
                agree[t].add((ensemble.top1(d) == pred).double(), dom, nd)
            if len(chunk) >= 2:
                jsd.add(ensemble.mean_pairwise_jsd(chunk), dom, nd)
                prior = table[dom]
                pooled, w = pool(chunk, prior, operator=operator, weighting=weighting, gold=gold, alpha=alpha, beta=beta,
                                 context=ctx[sl] if ctx is not None else None)
                top = ensemble.top1(pooled)
                for i, (t, d) in enumerate(zip(teachers, chunk)):
                    differs[t].add((ensemble.top1(d) != top).double(), dom, nd)
                    weights[t].add(w[:, i], dom, nd)
    student.train(was_training)
    out = {"split": split, "rows": rows, **_summary(loss, names, conf, correct, nbytes), "teachers": {},
           "kl_label": KL_LABEL}
    for t in teachers:
        out["teachers"][t] = {"kl": kl[t].total(), "top1_agreement": agree[t].total(),
                              "per_domain": {d: {"kl": kl[t].per_domain(names)[d],
                                                 "top1_agreement": agree[t].per_domain(names)[d]}
                                             for d in kl[t].per_domain(names)}}
    if len(teachers) >= 2:
        out["ensemble"] = {
            "operator": operator, "weighting": weighting, "domain_weights": domain_weights or {},
            "mean_jsd": jsd.total(), "jsd_per_domain": jsd.per_domain(names),
            "weights_per_domain": {d: {t: weights[t].per_domain(names)[d] for t in teachers}
                                   for d in jsd.per_domain(names)},
            "pooled_top1_differs": {t: differs[t].total() for t in teachers},
        }
    return out


@torch.no_grad()
def evaluate_teacher_cache(store: str, name: str, *, split: str = "valid", batch_size: int = 64,
                           max_rows: int | None = None, storage_options: dict | None = None) -> dict:
    """A cached teacher's own held-out metrics, without loading it: the exact gold log-prob cached with
    its statistics (v1 caches: top-k value or even-tail estimate); ECE of its top-1 probabilities."""
    st = Store.open(store, "r", storage_options)
    m = st.manifest
    names = list(m.domains)
    (tm,), data = held_out(store, teachers=[name], split=split, batch_size=batch_size, max_rows=max_rows,
                           storage_options=storage_options)
    builder = TargetBuilder([tm], m.tokenizer.vocab_size, calibrated=False, warn=False)
    loss, conf, correct, in_topk, rows = _Sums(), [], [], _Sums(), 0
    nbytes = _TextBytes(st)
    for batch in data:
        rows += len(batch["row"])
        pos = _predictable(positions(batch))
        if pos is None:
            continue
        arrays = batch["teachers"][name]
        d = builder.teacher(0, arrays, pos.select)
        loss.add(-gold_log_prob(d, pos.gold).clamp_min(-1e4), pos.domain, len(names))
        nbytes.add_gold(pos.gold, pos.domain, len(names))
        ids = arrays["topk_ids"][:, :-1].reshape(-1, tm.top_k)[pos.select].long()
        in_topk.add((ids == pos.gold[:, None]).any(-1).double(), pos.domain, len(names))
        c, ok = top1_confidence(d, pos.gold)
        conf.append(c)
        correct.append(ok)
    out = {"split": split, "rows": rows, **_summary(loss, names, conf, correct, nbytes), "teachers": {},
           "source": "cache", "temperature": tm.temperature, "gold_in_topk": in_topk.total(),
           "exact": tm.has_stats,
           "note": ("exact gold log-probs cached with the teacher's statistics; the teacher was not loaded"
                    if tm.has_stats else
                    f"format v1 cache: gold log-prob from the cached top-{tm.top_k} when present "
                    f"({in_topk.total():.1%} of tokens), else the even-tail estimate tail/(V-{tm.top_k}), which can be "
                    "far off; recache for the exact value")}
    return out
