"""A cross-tokenizer teacher's forward pass: its rows in its own tokens, its distributions mapped onto the store's.

``cross_targets`` returns what ``Teacher.targets`` returns (top-k over the store's vocabulary normalized over all of
it, samples, the exact statistics of the mapped distribution), computed by ``position_targets`` from the mapped
full log-probs, so every reader treats the cache like any other. The mapping itself is described in ``_cross.py``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chorus.pipeline._cross import CrossMap, align
from chorus.pipeline._position import position_targets, tail_statistics
from chorus.pipeline._sampler import draw_ids, row_uniforms
from chorus.pipeline._teacher import Teacher, _apply_ops, chunk_positions
from chorus.storage._manifest import NO_TARGET_ENTROPY

# head chunks of the cross-tokenizer pass: its fp32 passes over whole chunks hold ~4 (chunk, V) buffers, so on a GPU it
# keeps 256 MiB chunks (the same-tokenizer pass's 1 GiB ones were measured for that pass only, on an H200)
CROSS_CHUNK_BYTES = {"cpu": 1 << 21, "cuda": 1 << 28}


def project(logits: torch.Tensor, *, matrix: torch.Tensor, vocab: int, chain: torch.Tensor,
            moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor], gold: torch.Tensor, spans: torch.Tensor,
            stop: torch.Tensor,
            extensions: tuple[torch.Tensor, ...] | None = None,
            inside: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(C, Vt) fp32 teacher logits → ((C, Vs + 1) log-probs over the store's vocabulary and, last, the unplaced
    bucket; (C,) float64 log-prob of the gold token's text; (C,) the bucket's mass).

    Boundary rows: q = p · matrixᵀ, every teacher token's probability placed on the store token its text begins
    with (CrossMap.spread_id). Rows ``inside`` a teacher token: the teacher's distribution conditioned on the bytes
    before the position — only the teacher tokens that extend them (``extensions``: (row, teacher id, store id,
    weight) of the placed ones, then (row, teacher id) of all, for the normalizer), each placed by the rest of its
    text. Where the gold token's text ``spans`` several teacher tokens (the next teacher token is a strict prefix of
    it), the teacher's probability of that whole text along its own tokens, ``exp(chain)``, is a lookahead the
    teacher itself made: it leaves the place of the next teacher token (``moves``: (row, store id, weight)) for the
    gold id. Where the next teacher token spells the gold exactly but is unplaced (a longer store token extends it),
    its probability times ``stop`` — the teacher's own probability, at its next position, that the text does not go
    on into a longer store token — goes to the gold id. Mass the map could not place stays the teacher's, in the bucket, never on the gold token; the gold
    text's log-prob is the teacher's own ``chain`` (conditioned likewise), whatever the target holds at the id."""
    p = torch.softmax(logits, dim=-1)
    q = torch.sparse.mm(matrix, p.t()).t().contiguous()
    scale = torch.ones(len(q), device=q.device)
    if inside is not None and bool(inside.any()):
        rows, tids, sids, w, all_rows, all_tids = extensions
        q[inside] = 0.0
        q.view(-1).index_add_(0, rows * vocab + sids, p[rows, tids] * w)
        z = torch.zeros(len(q), device=q.device).index_add_(0, all_rows, p[all_rows, all_tids])
        scale = torch.where(inside, 1.0 / z.clamp_min(torch.finfo(torch.float32).tiny), scale)
        q *= scale[:, None]
    gold_text = torch.exp(chain).float() * scale * torch.where(spans, 1.0, stop)
    rows, sids, w = moves
    flat = rows * vocab + sids
    removed = torch.minimum(gold_text[rows] * w, q.view(-1)[flat])
    q.view(-1).index_add_(0, flat, -removed)
    q[torch.arange(len(q), device=q.device), gold] += gold_text
    bucket = (1.0 - q.sum(-1)).clamp_min(0.0)
    logq = torch.log(torch.cat([q, bucket[:, None]], -1))
    return logq, chain + torch.log(scale).double(), bucket


def bucket_targets(logq: torch.Tensor, gold: torch.Tensor, gold_logprob: torch.Tensor, uniforms: torch.Tensor | None,
                   *, top_k: int, tail_betas: Sequence[float]) -> dict[str, torch.Tensor]:
    """``position_targets`` of (N, V + 1) log-probs whose last column is the unplaced bucket: the top-k and the
    draws over the V store ids only, the statistics over all of it (the bucket is one atom of the tail, so τ,
    entropy and the tail sums hold it, as the losses' tail bucket does), the gold log-prob the given one.
    Draws come from the placed mass (renormalized): a draw cannot name the bucket. Overwrites ``logq``."""
    v, i = torch.topk(logq[:, :-1], top_k, dim=-1, sorted=True)
    out = {"topk_ids": i, "topk_logprobs": v}
    if uniforms is not None:
        out["draws"] = draw_ids(logq[:, :-1].contiguous(), uniforms)
    if tail_betas:
        last = torch.zeros(len(logq), dtype=torch.bool, device=logq.device)
        out.update(tail_statistics(logq, i, v, gold, tail_betas, last))
        out["gold_logprob"] = gold_logprob.float()
    return out


def _spread_rows(cmap: CrossMap, ids: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    rows, sids, w = cmap.triples(ids)
    return (torch.from_numpy(rows).to(device), torch.from_numpy(sids).to(device),
            torch.from_numpy(w).float().to(device))


def _sets(cmap: CrossMap, ids: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(entry, teacher id) pairs of the ``cmap.starting`` sets ``ids``."""
    parts = [cmap.starting[i] for i in ids]
    rows = np.repeat(np.arange(len(parts)), [len(p) for p in parts])
    return torch.from_numpy(rows).to(device), torch.from_numpy(np.concatenate(parts)).to(device)


def _extensions(cmap: CrossMap, prefix: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """(rows, teacher ids, store ids, weights) of the placed extensions of the rows with a prefix id > 0, then
    (rows, teacher ids) of all their extensions."""
    rows, tids, spreads = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for r in np.flatnonzero(prefix > 0):
        t, sp = cmap.extensions[prefix[r]]
        rows.append(np.full(len(t), r, np.int64))
        tids.append(t)
        spreads.append(sp)
    rows, tids, spreads = (np.concatenate(x) for x in (rows, tids, spreads))
    entry, sids, w = cmap.triples(spreads)
    return tuple(torch.from_numpy(x).to(device) for x in (rows[entry], tids[entry], sids, w.astype(np.float32), rows, tids))


def windowed_hidden_states(teacher: Teacher, x: torch.Tensor, limit: int | None) -> torch.Tensor:
    """(B, Lt) teacher ids → (B, Lt, H) hidden states. Rows longer than the teacher's context (``limit`` tokens: a row
    of the store can be more tokens in the teacher's) run in windows of ``limit`` that overlap by half: the first
    window's positions see everything before them, each later position at least ``limit // 2`` tokens."""
    lt = x.shape[1]
    if limit is None or lt <= limit:
        return teacher.hidden_states(x)
    keep = max(limit // 2, 1)  # new positions per later window
    parts, done = [teacher.hidden_states(x[:, :limit])], limit
    while done < lt:
        start = done + keep - limit
        end = min(lt, start + limit)
        parts.append(teacher.hidden_states(x[:, start:end])[:, done - start:])
        done = end
    return torch.cat(parts, 1)


def cross_targets(teacher: Teacher, cmap: CrossMap, ids: np.ndarray, segs: np.ndarray, *, top_k: int, num_samples: int,
                  seed: int, row_start: int, tail_betas: Sequence[float]) -> dict[str, torch.Tensor]:
    """Store rows (B, L) and their segment ids → the targets of ``chunked_targets`` over the store's vocabulary,
    from a teacher with its own tokenizer; positions with no target hold the hard label (``NO_TARGET_ENTROPY``)."""
    al = align(ids, segs, cmap, row_start=row_start)
    device = teacher.device
    b, length = ids.shape
    lt = al.teacher_ids.shape[1]
    x = torch.from_numpy(al.teacher_ids).to(device)
    weight, bias, ops = teacher.head(x)
    limit = getattr(teacher.model.config, "max_position_embeddings", None)
    flat = windowed_hidden_states(teacher, x, limit).reshape(b * lt, -1).to(weight.device)
    step = chunk_positions(teacher.vocab_size, teacher.chunk_size, CROSS_CHUNK_BYTES.get(device.type, CROSS_CHUNK_BYTES["cuda"]))

    def logits(s: int, e: int) -> torch.Tensor:  # the same-tokenizer path's chunks (same bits for one token table)
        return _apply_ops(F.linear(flat[s:e], weight, bias), ops).float()

    sel = np.flatnonzero((al.tpos >= 0).reshape(-1) & al.real.reshape(-1))  # store positions with a target
    src = sel // length * lt + al.tpos.reshape(-1)[sel]  # ... and the flat teacher positions they read
    end = sel // length * lt + al.tend.reshape(-1)[sel]
    gold = torch.from_numpy(np.roll(ids, -1, axis=1).reshape(-1).astype(np.int64)[sel]).to(device)
    move = al.move.reshape(-1)[sel]
    prefix = al.prefix.reshape(-1)[sel]
    chain = torch.zeros(len(sel), dtype=torch.float64, device=device)
    stop = torch.zeros(len(sel), dtype=torch.float32, device=device)  # > 0: looked ahead (pass 1)
    perm = None if cmap.permutation is None else torch.from_numpy(cmap.permutation).to(device)
    if perm is None and len(sel):  # pass 1: the teacher's log-prob of its own next tokens, summed along each chain
        nxt = torch.roll(x, -1, dims=1).reshape(-1, 1)
        ends = al.ends.reshape(-1)[sel]
        inner = np.flatnonzero(ends > 0)  # chains whose gold token ends inside their last teacher token
        last = torch.from_numpy(end[inner] - 1).to(device)
        starts = torch.zeros(len(inner), dtype=torch.float64, device=device)
        # a next teacher token whose text is the gold's, unplaced (a longer store token extends it): its own next
        # distribution, at the following teacher position, says whether the store stops at the gold there
        gold_np = np.roll(ids, -1, axis=1).reshape(-1)[sel]
        goes_on = np.zeros(len(sel), dtype=np.int64)
        cand = np.flatnonzero((end - src == 1) & (ends == 0) & (move == 0))
        goes_on[cand] = [cmap.continuing_id(int(u)) for u in gold_np[cand]]
        look = np.flatnonzero(goes_on > 0)
        look_t, ahead = torch.from_numpy(look).to(device), torch.from_numpy(end[look]).to(device)
        own = []
        for s in range(0, b * lt, step):
            logp_t = torch.log_softmax(logits(s, min(b * lt, s + step)), -1)
            own.append(logp_t.gather(-1, nxt[s: s + step])[:, 0])
            here = torch.nonzero((last >= s) & (last < s + step))[:, 0]
            if len(here):  # log Σ p(v) over the teacher tokens whose text starts with the gold's bytes in that token
                rows, tids = _sets(cmap, ends[inner[here.cpu().numpy()]], device)
                mass = torch.zeros(len(here), dtype=torch.float64, device=device)
                mass.index_add_(0, rows, logp_t[last[here][rows] - s, tids].double().exp())
                starts[here] = mass.log()
            here = torch.nonzero((ahead >= s) & (ahead < s + step))[:, 0]
            if len(here):  # after a teacher token that spelled the gold exactly: P(it goes on into a longer one)
                rows, tids = _sets(cmap, goes_on[look[here.cpu().numpy()]], device)
                mass = torch.zeros(len(here), dtype=torch.float32, device=device)
                mass.index_add_(0, rows, logp_t[ahead[here][rows] - s, tids].exp())
                stop[look_t[here]] = (1.0 - mass).clamp_min(0.0)
        own = torch.cat(own).double()
        cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), own.cumsum(0)])
        chain = cum[torch.from_numpy(end).to(device)] - cum[torch.from_numpy(src).to(device)]
        inner_t = torch.from_numpy(inner).to(device)
        chain[inner_t] += starts - own[last]  # the last token's own log-prob → P(its text starts with the gold's)
    uniforms = row_uniforms(seed, row_start, b, length, num_samples, device) if num_samples else None
    matrix = cmap.matrix(device) if perm is None else None

    out = _masked(ids, top_k, num_samples, tail_betas, device)
    measured = cmap.measured
    src_t, sel_t = torch.from_numpy(src).to(device), torch.from_numpy(sel).to(device)
    no_last = torch.zeros(len(sel), dtype=torch.bool, device=device)
    for s in range(0, b * lt, step):  # pass 2: each chunk's logits, then the store positions that read them
        pick = torch.nonzero((src_t >= s) & (src_t < s + step))[:, 0]
        if not len(pick):
            continue
        z = logits(s, min(b * lt, s + step))[src_t[pick] - s]
        if perm is not None:  # one token table: the same-tokenizer teacher's log-softmax, op for op
            logp = torch.log_softmax(z[:, perm], dim=-1)
            gold_text, unplaced = logp.gather(-1, gold[pick, None])[:, 0].double(), torch.zeros(len(pick), device=device)
        else:
            rows = pick.cpu().numpy()
            logq, gold_text, unplaced = project(
                z, matrix=matrix, vocab=cmap.store_vocab, chain=chain[pick], gold=gold[pick],
                spans=torch.from_numpy(end[rows] - src[rows] > 1).to(device), stop=stop[pick],
                moves=_spread_rows(cmap, move[rows], device), extensions=_extensions(cmap, prefix[rows], device),
                inside=torch.from_numpy(prefix[rows] > 0).to(device))
        draws = None if uniforms is None else uniforms[sel_t[pick]]
        part = (position_targets(logp, gold[pick], no_last[pick], draws, top_k=top_k, tail_betas=tail_betas)
                if perm is not None else
                bucket_targets(logq, gold[pick], gold_text, draws, top_k=top_k, tail_betas=tail_betas))
        keep = torch.isfinite(part["topk_logprobs"][:, 0])  # the teacher placed nothing there: no target
        for k, t in part.items():
            out[k][sel_t[pick[keep]]] = t[keep].to(out[k].dtype)
        kept = pick[keep].cpu().numpy()
        measured["gold_text_nats"] -= float(gold_text[keep].sum())
        measured["gold_bytes"] += int(cmap.store_bytes[gold[pick[keep]].cpu().numpy()].sum())
        measured["unplaced_mass"] += float(unplaced[keep].double().sum())
        measured["covered"] += len(kept)
        measured["inside"] += int((prefix[kept] > 0).sum())
    measured["positions"] += int(al.real.sum())
    return {k: t.reshape(b, length, *t.shape[1:]) for k, t in out.items()}


def _masked(ids: np.ndarray, top_k: int, num_samples: int, tail_betas, device) -> dict[str, torch.Tensor]:
    """Targets that say "no target: the hard label" at every position: the row's next token with probability 1,
    entropy NO_TARGET_ENTROPY (no distribution has a negative entropy), empty tail."""
    n = ids.size
    nxt = torch.from_numpy(np.roll(ids, -1, axis=1).reshape(-1).astype(np.int64)).to(device)
    topk_ids = torch.zeros((n, top_k), dtype=torch.int32, device=device)
    topk_ids[:, 0] = nxt.to(torch.int32)
    logp = torch.full((n, top_k), float("-inf"), dtype=torch.float32, device=device)
    logp[:, 0] = 0.0
    out = {"topk_ids": topk_ids, "topk_logprobs": logp}
    if num_samples:
        out["draws"] = nxt[:, None].expand(n, num_samples).to(torch.int32).contiguous()
    if tail_betas:
        out["log_tail"] = torch.full((n,), float("-inf"), device=device)
        out["entropy"] = torch.full((n,), NO_TARGET_ENTROPY, device=device)
        out["gold_logprob"] = torch.zeros(n, device=device)
        out["tail_logz"] = torch.full((n, len(tail_betas)), float("-inf"), device=device)
    return out
