"""A cross-tokenizer teacher's forward pass: its rows in its own tokens, its distributions mapped onto the store's.

``cross_targets`` returns what ``Teacher.targets`` returns (top-k over the store's vocabulary normalized over all of
it, samples, the exact statistics of the mapped distribution), computed by ``position_targets`` from the mapped
full log-probs, so every reader treats the cache like any other. The mapping itself is described in ``cross.py``.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from chorus.store.manifest import NO_TARGET_ENTROPY
from chorus.teacher.alignment import Alignment, align
from chorus.teacher.cross import CrossMap
from chorus.teacher.model import Teacher, _apply_ops, chunk_positions, kept_buffer, slab_positions
from chorus.teacher.position import position_targets, tail_statistics
from chorus.teacher.sampler import draw_ids, row_uniforms

# head chunks of the cross-tokenizer pass: its fp32 passes over whole chunks hold ~4 (chunk, V) buffers, so on a GPU it
# keeps 256 MiB chunks (the same-tokenizer pass's 1 GiB ones were measured for that pass only: docs/measurements.md)
CROSS_CHUNK_BYTES = {"cpu": 1 << 21, "cuda": 1 << 28}
MAPPED_CPU_CHUNK_BYTES = 1 << 28  # the mapped pass on a CPU: 256 positions at V = 262 144 (2 MiB would be 2 rows:
# too few for the head's GEMM); the one-token-table path keeps CROSS_CHUNK_BYTES (bit-identical chunks)


# a set of teacher ids holding more than this share of the vocabulary is summed over the ids outside it
OUTSIDE_SHARE = 0.5

# exp(z) unshifted where every row's largest logit lies in this range: its sums cannot overflow float32 at any
# vocabulary size below 2^32, and a token it flushes to zero is < e^-71 of the row's top one
UNSHIFTED_LOGITS = (-16.0, 64.0)


def _exps(z: torch.Tensor, buffers: dict | None, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vt, C) fp32 logits, one column a position → (exp(z − top), top (C,)): unshifted (top = 0) when every
    column's largest logit lies in UNSHIFTED_LOGITS (one pass fewer). Into ``buffers[name]`` when given."""
    top = z.amax(dim=0)
    lo, hi = UNSHIFTED_LOGITS
    out = None if buffers is None else kept_buffer(buffers, name, z.shape, z.dtype, z.device)
    if bool(((top > lo) & (top < hi)).all()):
        return torch.exp(z, out=out), torch.zeros_like(top)
    return torch.sub(z, top, out=out).exp_(), top


def boundary_mass(z: torch.Tensor, dest: torch.Tensor, width: int,
                  buffers: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(Vt, C) fp32 teacher logits, one column a position → ((C, width) the teacher's next-token probabilities summed
    into the columns ``dest`` (Vt,) names (a transposed view), (C,) its log-partition). The mapped pass's only work
    over the teacher's whole vocabulary: one exp per logit, one sum, one index_add of whole rows (a position a
    column: each added row is contiguous), normalized after it — closer to a float64 reference than torch.softmax's
    approximate exp. ``buffers``: where the exps go, kept across chunks (a fresh (Vt, C) tensor is new pages from
    the kernel each chunk, slower than the exp itself). Not compiled: inductor's scatter made the CPU pass slower."""
    e, top = _exps(z, buffers, "exp")
    total = e.sum(dim=0)
    q = torch.zeros(width, z.shape[1], dtype=z.dtype, device=z.device).index_add_(0, dest, e)
    return q.div_(total).T, top + total.log()


def place(logprob, boundary: torch.Tensor, at: torch.Tensor, inside: torch.Tensor,
          extensions: tuple[torch.Tensor, ...] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Store positions reading teacher rows ``at`` of a chunk (``logprob(rows, teacher ids)``: the teacher's log-probs
    there, and :func:`boundary_mass` ``boundary``: every placed teacher token's probability on the store token its
    text begins with) → ((N, Vs + 1) placed mass, the last column free for the bucket; (N,) ``scale``). Rows
    ``inside`` a teacher token: the teacher's distribution conditioned on the bytes before the position — only the
    teacher tokens that extend them (``extensions``: (row, teacher id, store id, weight) of the placed ones, then
    (row, teacher id) of all, for the normalizer ``1 / scale``), each placed by the rest of its text."""
    q = boundary[at]  # contiguous, from a transposed view as from a plain one
    scale = torch.ones(len(q), device=q.device)
    if bool(inside.any()):
        rows, tids, sids, w, all_rows, all_tids = extensions
        q[inside] = 0.0
        width = q.shape[1]
        q.view(-1).index_add_(0, rows * width + sids, torch.exp(logprob(at[rows], tids)) * w)
        mass = torch.exp(logprob(at[all_rows], all_tids))
        norm = torch.zeros(len(q), device=q.device).index_add_(0, all_rows, mass)
        scale = torch.where(inside, 1.0 / norm.clamp_min(torch.finfo(torch.float32).tiny), scale)
        q *= scale[:, None]
    return q, scale


def project(q: torch.Tensor, scale: torch.Tensor, *, chain: torch.Tensor,
            moves: tuple[torch.Tensor, torch.Tensor, torch.Tensor], gold: torch.Tensor, spans: torch.Tensor,
            step: torch.Tensor, stop: torch.Tensor, after: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`place`'s (N, Vs + 1) mass and scale → ((N, Vs + 1) the teacher's probabilities over the store's
    vocabulary and, last, the unplaced bucket (``q``, completed in place: the caller takes their logs slab by slab);
    (N,) float64 log-prob of the gold token's text; (N,) the bucket's mass).

    Where the gold token's text ``spans`` several teacher tokens (the next teacher token is a strict prefix of
    it), the teacher's probability of that whole text along its own tokens, ``exp(chain)``, is a lookahead the
    teacher itself made: it leaves the place of the next teacher token (``moves``: (row, store id, weight)) for the
    gold id. Where the next teacher token is unplaced (a longer store token extends its text), its probability
    (``exp(step)``, its own log-prob there) times ``stop`` — the teacher's own probability, at its next position,
    that the text does not go on into a longer store token — goes to the store id its text begins with (``after``;
    the gold's where it spells the gold exactly). Mass the map could not place stays the teacher's, in the bucket,
    never on the gold token; the gold text's log-prob is the teacher's own ``chain`` (conditioned likewise), whatever
    the target holds at the id."""
    vocab = q.shape[1] - 1
    gold_text = torch.exp(chain).float() * scale * spans
    rows, sids, w = moves
    flat_q, flat = q.view(-1), rows * (vocab + 1) + sids
    removed = torch.minimum(gold_text[rows] * w, flat_q[flat])
    flat_q.index_add_(0, flat, -removed)
    at = torch.arange(len(q), device=q.device)
    q[at, gold] += gold_text
    stops = stop > 0
    q[at[stops], after[stops]] += torch.exp(step[stops]).float() * scale[stops] * stop[stops]
    bucket = (1.0 - q[:, :vocab].sum(-1)).clamp_min(0.0)
    q[:, vocab] = bucket
    return q, chain + torch.log(scale).double(), bucket


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


def _outside_mass(cmap: CrossMap, ids: np.ndarray, logprob, device) -> torch.Tensor:
    """(n,) float64: at each entry i, the teacher's probability of a token outside the set ``cmap.starting[ids[i]]``
    (``logprob(entries, teacher ids)``: its log-probs), summed over whichever side of the set has fewer ids — the
    continuing sets of short texts hold most of a large vocabulary."""
    most = len(cmap.teacher_spread) * OUTSIDE_SHARE
    big = np.array([len(cmap.starting[i]) > most for i in ids], dtype=bool)
    parts = [cmap.outside(i) if b else cmap.starting[i] for i, b in zip(ids, big)]
    rows = torch.from_numpy(np.repeat(np.arange(len(parts)), [len(p) for p in parts])).to(device)
    tids = torch.from_numpy(np.concatenate(parts) if parts else np.zeros(0, np.int64)).to(device)
    mass = torch.zeros(len(ids), dtype=torch.float64, device=device).index_add_(0, rows, logprob(rows, tids).double().exp())
    return torch.where(torch.from_numpy(big).to(device), mass, 1.0 - mass).clamp_min(0.0)


def _extensions(cmap: CrossMap, prefix: np.ndarray, device) -> tuple[torch.Tensor, ...]:
    """(rows, teacher ids, store ids, weights) of the placed extensions of the rows with a prefix id > 0, then
    (rows, teacher ids) of all their extensions."""
    cols: tuple[list, ...] = ([], [], [], [], [], [])
    for r in np.flatnonzero(prefix > 0):
        placed, sids, w, every = cmap.placed_extensions(int(prefix[r]))
        for out, x in zip(cols, (np.full(len(placed), r), placed, sids, w, np.full(len(every), r), every)):
            out.append(x)
    return tuple(torch.from_numpy(np.concatenate(x) if x else np.zeros(0, np.float32 if k == 3 else np.int64)).to(device)
                 for k, x in enumerate(cols))


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


def _with_cache(teacher: Teacher, cache) -> dict:
    """The forward's arguments that fill and read ``cache`` (transformers 5 renamed ``past_key_values`` ``cache``)."""
    name = "cache" if "cache" in inspect.signature(teacher.model.forward).parameters else "past_key_values"
    return {name: cache, "use_cache": True}


def _fits_tree(teacher: Teacher, lt: int) -> bool:
    """Whether branches can read rows of ``lt`` teacher tokens with one cached forward pass and a custom mask: the
    row is one window, and a sliding-window layer would see all of it anyway (the mask is the same for every layer)."""
    cfg = teacher.model.config.get_text_config() if hasattr(teacher.model.config, "get_text_config") else teacher.model.config
    limit = getattr(cfg, "max_position_embeddings", None)
    window = getattr(cfg, "sliding_window", None)
    return (limit is None or lt <= limit) and (window is None or lt <= window)


def branch_hidden_states(teacher: Teacher, cache, b: int, lt: int, src: np.ndarray, tok: np.ndarray, *,
                         pad: int) -> torch.Tensor:
    """Branch tokens ``tok`` (nb,), each one more token after flat teacher position ``src`` of rows (b, lt) whose keys
    ``cache`` holds → (nb, H) their final hidden states: what a forward pass over that row up to ``src``, then the
    token, gives (tree attention: one pass, each branch sees its prefix and itself, at the position after ``src``).
    ``cache`` holds the rows only again afterwards. Memory: a (b, 1, m, lt + m) mask, m the most branches of one
    row."""
    device = teacher.device
    rows, pos = src // lt, src % lt
    order = np.argsort(rows, kind="stable")
    slot = np.zeros(len(src), np.int64)
    counts = np.bincount(rows, minlength=b)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot[order] = np.arange(len(src)) - np.repeat(starts, counts)
    m = int(counts.max())
    low = torch.finfo(teacher.dtype).min
    ids = torch.full((b, m), pad, dtype=torch.long, device=device)
    where = torch.zeros((b, m), dtype=torch.long, device=device)
    mask = torch.full((b, 1, m, lt + m), low, dtype=teacher.dtype, device=device)
    mask[:, 0, :, 0] = 0  # padding slots read the row's first token (never used)
    r_t, s_t = torch.from_numpy(rows).to(device), torch.from_numpy(slot).to(device)
    ids[r_t, s_t] = torch.from_numpy(tok).to(device)
    where[r_t, s_t] = torch.from_numpy(pos + 1).to(device)
    keys = torch.arange(lt, device=device)
    mask[r_t, 0, s_t, :lt] = torch.where(keys[None, :] <= torch.from_numpy(pos).to(device)[:, None], 0.0,
                                         low).to(teacher.dtype)
    mask[r_t, 0, s_t, lt + s_t] = 0
    try:
        return teacher.hidden_states(ids, **_with_cache(teacher, cache), position_ids=where,
                                     attention_mask=mask)[r_t, s_t]
    finally:
        cache.crop(-m)  # the branches' keys out again: the next call's branches see the rows only


def branch_stops(teacher: Teacher, cmap: CrossMap, cache, x: torch.Tensor, flat: torch.Tensor, weight: torch.Tensor,
                 bias: torch.Tensor | None, ops, head, srcs: np.ndarray, *, branches: int, step: int,
                 buffers: dict | None) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Branch-token lookahead. At flat teacher positions ``srcs`` (boundary positions of the store), the
    ``branches`` most probable unplaced teacher tokens other than the actual next one each run as one more token after
    that position (tree attention: the row's cached keys up to it, then itself, in one forward pass over all of them;
    ``head``: their logits, one column a branch) → (src, teacher id, store id it begins with, (nb,) the teacher's
    probability after it that its text stops there rather than going on into a longer store token), so that share is
    placed like the actual next token's (see :func:`project`). The candidates are scored by a head over their rows
    only: choosing them from the main pass's logits would need a branch pass per head chunk, whose batch is mostly
    rows without branches."""
    device, b, lt = x.device, x.shape[0], x.shape[1]
    cand = cmap.branch_candidates(device)
    if not len(srcs) or not len(cand):
        return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64), torch.zeros(0, device=device)
    src_t = torch.from_numpy(srcs).to(device)
    zc = _apply_ops(F.linear(flat[src_t], weight[cand], None if bias is None else bias[cand]), ops).float()
    nxt = x.reshape(-1)[(src_t + 1).clamp_max(b * lt - 1)]
    col = cmap.branch_column(device)[nxt]
    has = col >= 0
    zc[torch.nonzero(has)[:, 0], col[has]] = float("-inf")  # the actual next token: its own next position tells
    top = torch.topk(zc, min(branches, len(cand)), dim=-1)
    real = torch.isfinite(top.values).reshape(-1).cpu().numpy()  # not the excluded next token
    tok = cand[top.indices].reshape(-1).cpu().numpy()[real]
    src = np.repeat(srcs, top.values.shape[1])[real]
    conts = np.array([cmap.continuing_id(cmap.teacher_text.surfaces[t]) for t in tok], dtype=np.int64)
    after = np.array([cmap.index.first(cmap.teacher_text.surfaces[t]) for t in tok], dtype=np.int64)
    stop = torch.ones(len(tok), device=device)
    ask = np.flatnonzero(conts > 0)  # a token no teacher token can carry on stops for sure
    if len(ask):
        h = branch_hidden_states(teacher, cache, b, lt, src[ask], tok[ask], pad=cmap.teacher_text.pad_id)
        for a in range(0, len(ask), step):
            e = min(len(ask), a + step)
            zb = head(h[a:e])  # before the main pass: its buffers are free
            ex, shift = _exps(zb, buffers, "exp")
            lse = shift + ex.sum(dim=0).log()
            stop[torch.from_numpy(ask[a:e]).to(device)] = _outside_mass(
                cmap, conts[ask[a:e]], lambda r, t, zb=zb, lse=lse: zb[t, r] - lse[r], device).float()
    return src, tok, after, stop


def _mapped_pass(cmap: CrossMap, logits, x: torch.Tensor, sel: np.ndarray, src: np.ndarray, end: np.ndarray,
                 move: np.ndarray, prefix: np.ndarray, ends: np.ndarray, cont: np.ndarray, after: np.ndarray,
                 gold: torch.Tensor, uniforms: torch.Tensor | None, write, *, n: int, step: int, top_k: int,
                 tail_betas: Sequence[float], branch=None, buffers: dict | None = None) -> None:
    """One pass of the LM head over the teacher's ``n`` flat positions, in chunks of ``step``: each chunk's
    :func:`boundary_mass` gives the placed mass of its positions and the log-partition, hence the teacher's
    log-prob of its own next tokens (the chains) and the lookahead masses; a store position is placed as soon as its
    chunk is done, and projected once every teacher position its chain and lookahead read is (its (Vs + 1) mass is
    kept until then), so the head runs once, not once for the chains and again for the targets. ``branch``: (store
    position index into ``sel``, teacher id, store id, stop) of :func:`branch_stops`' tokens, placed with the rest.
    ``logits(s, e)``: (Vt, e - s) the head's logits of positions s..e, one column a position."""
    device = x.device
    vocab = cmap.store_vocab
    dest = cmap.destinations(device)
    nxt = torch.roll(x, -1, dims=1).reshape(-1)
    own = torch.zeros(n, dtype=torch.float64, device=device)  # log p(own next token) at each teacher position
    inner = np.flatnonzero(ends > 0)  # chains whose gold token ends inside their last teacher token
    last = torch.from_numpy(end[inner] - 1).to(device)
    starts = torch.zeros(len(inner), dtype=torch.float64, device=device)
    at_inner = torch.full((len(sel),), -1, dtype=torch.long, device=device)
    at_inner[torch.from_numpy(inner).to(device)] = torch.arange(len(inner), device=device)
    # an unplaced next teacher token (a longer store token extends its text): its own next distribution, at the
    # following teacher position, says whether the store's token stops where its text does
    look = np.flatnonzero(cont > 0)
    look_t, ahead = torch.from_numpy(look).to(device), torch.from_numpy(src[look] + 1).to(device)
    stop = torch.zeros(len(sel), dtype=torch.float32, device=device)
    after_t = torch.from_numpy(np.maximum(after, 0)).to(device)
    src_t, end_t = torch.from_numpy(src).to(device), torch.from_numpy(end).to(device)
    spans_t = end_t - src_t > 1
    inside_t = torch.from_numpy(prefix > 0).to(device)
    pend_idx = torch.zeros(0, dtype=torch.long, device=device)
    pend_q, pend_scale = torch.zeros(0, vocab + 1, device=device), torch.zeros(0, device=device)
    sel_t = torch.from_numpy(sel).to(device)

    slab = slab_positions(vocab + 1, device)  # the per-position math in cache-sized slabs, as the same-tokenizer pass

    def project_rows(pick: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
        if not len(pick):
            return
        rows = pick.cpu().numpy()
        cum = torch.cat([torch.zeros(1, dtype=torch.float64, device=device), own.cumsum(0)])
        chain = cum[end_t[pick]] - cum[src_t[pick]]
        k = at_inner[pick]
        has = k >= 0  # the last token's own log-prob → P(its text strictly extends the gold's bytes there)
        chain[has] += starts[k[has]] - own[end_t[pick][has] - 1]
        probs, gold_text, unplaced = project(q, scale, chain=chain, gold=gold[pick], spans=spans_t[pick],
                                            step=own[src_t[pick]], stop=stop[pick], after=after_t[pick],
                                            moves=_spread_rows(cmap, move[rows], device))
        g, u = gold[pick], None if uniforms is None else uniforms[sel_t[pick]]
        parts = [bucket_targets(probs[a:a + slab].log_(), g[a:a + slab], gold_text[a:a + slab], None if u is None else
                                u[a:a + slab], top_k=top_k, tail_betas=tail_betas) for a in range(0, len(pick), slab)]
        write(pick, {k: torch.cat([p[k] for p in parts]) for k in parts[0]}, gold_text, unplaced)

    for s in range(0, n, step):
        e = min(n, s + step)
        z_all = logits(s, e)  # (Vt, e - s)
        boundary, lse = boundary_mass(z_all, dest, vocab + 1, buffers)

        def logprob(at: torch.Tensor, tids: torch.Tensor, z_all=z_all, lse=lse) -> torch.Tensor:
            return z_all[tids, at] - lse[at]

        own[s:e] = (z_all[nxt[s:e], torch.arange(e - s, device=device)] - lse).double()
        here = torch.nonzero((last >= s) & (last < e))[:, 0]
        if len(here):  # log Σ p(v) over the teacher tokens that strictly extend the gold's bytes there
            rows, tids = _sets(cmap, ends[inner][here.cpu().numpy()], device)
            mass = torch.zeros(len(here), dtype=torch.float64, device=device)
            starts[here] = mass.index_add_(0, rows, logprob(last[here][rows] - s, tids).double().exp()).log()
        here = torch.nonzero((ahead >= s) & (ahead < e))[:, 0]
        if len(here):  # after an unplaced teacher token: P(the store's token ends where its text does)
            at = ahead[here] - s
            stop[look_t[here]] = _outside_mass(cmap, cont[look][here.cpu().numpy()],
                                               lambda r, t, at=at: logprob(at[r], t), device).float()
        new = torch.nonzero((src_t >= s) & (src_t < e))[:, 0]
        if len(new):
            inside = inside_t[new]
            q_new, scale_new = place(logprob, boundary, src_t[new] - s, inside,
                                     _extensions(cmap, prefix[new.cpu().numpy()], device) if bool(inside.any()) else None)
            if branch is not None:  # boundary positions: the share of each branch token that stops there
                br_k, br_tok, br_after, br_stop = branch
                hit = torch.nonzero((src_t[br_k] >= s) & (src_t[br_k] < e))[:, 0]
                if len(hit):
                    mass = torch.exp(logprob(src_t[br_k[hit]] - s, br_tok[hit])) * br_stop[hit]
                    q_new.index_put_((torch.searchsorted(new, br_k[hit]), br_after[hit]), mass, accumulate=True)
            idx = torch.cat([pend_idx, new])
            q, scale = (q_new, scale_new) if not len(pend_idx) else (torch.cat([pend_q, q_new]), torch.cat([pend_scale, scale_new]))
        else:
            idx, q, scale = pend_idx, pend_q, pend_scale
        ready = (end_t[idx] < e) | (e == n)  # every position its chain and lookahead read is done
        if bool(ready.all()):
            project_rows(idx, q, scale)
            pend_idx, pend_q, pend_scale = idx[:0], q[:0], scale[:0]
            continue
        if bool(ready.any()):
            project_rows(idx[ready], q[ready], scale[ready])
        pend_idx, pend_q, pend_scale = idx[~ready], q[~ready], scale[~ready]


def cross_targets(teacher: Teacher, cmap: CrossMap, ids: np.ndarray, segs: np.ndarray, *, top_k: int, num_samples: int,
                  seed: int, row_start: int, tail_betas: Sequence[float],
                  alignment: Alignment | None = None, branches: int = 0) -> dict[str, torch.Tensor]:
    """Store rows (B, L) and their segment ids → the targets of ``chunked_targets`` over the store's vocabulary,
    from a teacher with its own tokenizer; positions with no target hold the hard label (``NO_TARGET_ENTROPY``).
    ``branches``: unplaced teacher tokens per boundary position asked about by :func:`branch_stops` (rows the tree
    cannot read in one pass — longer than the teacher's context or a sliding window — keep them in the bucket)."""
    al = alignment if alignment is not None else align(ids, segs, cmap, row_start=row_start)
    device = teacher.device
    b, length = ids.shape
    lt = al.teacher_ids.shape[1]
    x = torch.from_numpy(al.teacher_ids).to(device)
    weight, bias, ops = teacher.head(x)
    limit = getattr(teacher.model.config, "max_position_embeddings", None)
    cache = None
    if branches and cmap.permutation is None and _fits_tree(teacher, lt):
        from transformers import DynamicCache

        cache = DynamicCache()  # no config: every layer keeps all keys, which the branches' mask reads
        flat = teacher.hidden_states(x, **_with_cache(teacher, cache)).reshape(b * lt, -1).to(weight.device)
    else:
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
    perm = None if cmap.permutation is None else torch.from_numpy(cmap.permutation).to(device)
    uniforms = row_uniforms(seed, row_start, b, length, num_samples, device) if num_samples else None
    out = _masked(ids, top_k, num_samples, tail_betas, device)
    src_t, sel_t = torch.from_numpy(src).to(device), torch.from_numpy(sel).to(device)
    n = b * lt

    def write(pick: torch.Tensor, part: dict, gold_text: torch.Tensor, unplaced: torch.Tensor) -> None:
        keep = torch.isfinite(part["topk_logprobs"][:, 0])  # the teacher placed nothing there: no target
        for k, t in part.items():
            out[k][sel_t[pick[keep]]] = t[keep].to(out[k].dtype)
        kept = pick[keep].cpu().numpy()
        measured = cmap.measured
        measured["gold_text_nats"] -= float(gold_text[keep].sum())
        measured["gold_bytes"] += int(cmap.store_bytes[gold[pick[keep]].cpu().numpy()].sum())
        measured["unplaced_mass"] += float(unplaced[keep].double().sum())
        measured["covered"] += len(kept)
        measured["inside"] += int((prefix[kept] > 0).sum())

    if perm is not None:  # one token table: the same-tokenizer teacher's chunks and log-softmax, op for op
        no_last = torch.zeros(len(sel), dtype=torch.bool, device=device)
        for s in range(0, n, step):
            pick = torch.nonzero((src_t >= s) & (src_t < s + step))[:, 0]
            if len(pick):
                logp = torch.log_softmax(logits(s, min(n, s + step))[src_t[pick] - s][:, perm], dim=-1)
                gold_text = logp.gather(-1, gold[pick, None])[:, 0].double()
                part = position_targets(logp, gold[pick], no_last[pick], None if uniforms is None else
                                        uniforms[sel_t[pick]], top_k=top_k, tail_betas=tail_betas)
                write(pick, part, gold_text, torch.zeros(len(pick), device=device))
    elif len(sel):
        if device.type == "cpu":
            step = chunk_positions(teacher.vocab_size, teacher.chunk_size, MAPPED_CPU_CHUNK_BYTES)
        # the head's logits transposed (one column a position): index_add then adds whole contiguous rows. On a CPU
        # into the teacher's kept buffers, as _head_chunk (inference tensors: only in inference mode)
        buffers = teacher.scratch if device.type == "cpu" and torch.is_inference_mode_enabled() else None

        def head(h: torch.Tensor) -> torch.Tensor:  # (C, H) hidden states → (Vt, C) logits
            out = None if buffers is None else kept_buffer(buffers, "logits", (weight.shape[0], len(h)), weight.dtype,
                                                           device)
            h = h.to(weight.device).T
            z = torch.mm(weight, h, out=out) if bias is None else torch.addmm(bias[:, None], weight, h, out=out)
            return _apply_ops(z, ops).float()

        branch = None
        if cache is not None:
            bound = np.flatnonzero(prefix == 0)
            bound = bound[np.argsort(src[bound], kind="stable")]
            br_src, br_tok, br_after, br_stop = branch_stops(teacher, cmap, cache, x, flat, weight, bias, ops, head,
                                                             np.unique(src[bound]), branches=branches, step=step,
                                                             buffers=buffers)
            k = bound[np.searchsorted(src[bound], br_src)]
            branch = tuple(torch.from_numpy(a).to(device) for a in (k, br_tok, br_after)) + (br_stop,)

        _mapped_pass(cmap, lambda s, e: head(flat[s:e]), x, sel, src, end, move, prefix, al.ends.reshape(-1)[sel],
                     al.cont.reshape(-1)[sel], al.after.reshape(-1)[sel], gold, uniforms, write, n=n, step=step,
                     top_k=top_k, tail_betas=tail_betas, branch=branch, buffers=buffers)
    cmap.measured["positions"] += int(al.real.sum())
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
