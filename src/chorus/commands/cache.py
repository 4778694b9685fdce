"""`chorus cache`: run a teacher once over a store's corpus and cache its sparse next-token distribution.

setup (store and corpus, this worker's shards, teacher, manifest: create, resume or refuse) → loop
(for each uncommitted shard: read its input ids, forward in inference mode to the final hidden states, then
the LM head over chunks of positions — top-k log-probs, samples and the exact per-position statistics of
format v2 on the device, never the full (B, L, V) logits — hand them to the background writer,
which commits whole shards) → cleanup (flip the status to complete once every shard is committed;
report where the cache is and its bytes per token).

Resumable and shardable by construction: a shard is the unit of work and of commit, batches never
straddle shards, and sampling is seeded per row, so whatever the interruptions or the split of shards
among workers, each shard's bytes are those an uninterrupted single run writes.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from chorus import __version__
from chorus.config import CacheConfig
from chorus.device import resolve_device
from chorus.errors import ChorusError
from chorus.progress import Progress, say
from chorus.store import (
    STATS_FIELDS,
    TAIL_BETAS,
    CacheUnit,
    CorpusManifest,
    ShardLeases,
    Store,
    TeacherManifest,
    encode_targets,
    fingerprint,
    target_specs,
    value_params,
)
from chorus.store.manifest import NAME_PATTERN, TokenizerInfo, no_target
from chorus.store.tokenizer import store_tokenizer
from chorus.teacher.alignment import align, check_text
from chorus.teacher.cross import METHOD, METHOD_VERSION, CrossMap, TokenText
from chorus.teacher.cross_targets import cross_targets
from chorus.teacher.model import (
    OutOfMemory,
    Teacher,
    check_tokenizer,
    dtype_name,
    first_bad_position,
    load_teacher,
    resolve_dtype,
)
from chorus.teacher.sampler import check_sampler
from chorus.teacher.writer import ShardWriter

TARGETS = ("topk log_softmax fp32 + inverse-cdf samples seeded by (seed, row) + exact tail statistics "
           "(masked logsumexp, entropy, gold log-prob), v2")  # in the fingerprint: change it with the math
# in the fingerprint of caches with samples: the uniforms behind the draws (teacher/sampler.py position_uniforms)
SAMPLER = "counter-based uniforms: lowbias32 x3 keyed by blake2b(seed, row), counter position*M + draw, 24 bits"


# ---------------------------------------------------------------------------------------------- setup helpers
def shard_assignment(spec: str | None, env: dict | None = None) -> tuple[int, int]:
    """(i, n) from ``--shard i/n``, else from torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    env = os.environ if env is None else env
    if spec:
        m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", spec)
        if not m or not 0 <= int(m.group(1)) < int(m.group(2)):
            raise ChorusError(f"--shard: expected i/n with 0 <= i < n (e.g. 0/4), got {spec!r}")
        return int(m.group(1)), int(m.group(2))
    if "RANK" in env and "WORLD_SIZE" in env:
        return int(env["RANK"]), int(env["WORLD_SIZE"])
    return 0, 1


def default_name(model: str) -> str:
    base = os.path.basename(os.path.normpath(os.path.expanduser(model))) or model
    return re.sub(r"[^A-Za-z0-9._-]+", "-", base).strip("-._") or "teacher"


def _open_store(cfg: CacheConfig) -> tuple[Store, CorpusManifest]:
    if not Store.exists(cfg.store, cfg.storage_options):
        raise ChorusError(f"no chorus store at '{cfg.store}'; run `chorus prepare --out {cfg.store}` first")
    store = Store.open(cfg.store, "a", cfg.storage_options)
    if store.group.attrs.get("chorus") is None:
        raise ChorusError(f"store '{cfg.store}' has no corpus (no manifest: `chorus prepare` did not finish); rerun it")
    corpus = store.manifest
    if len(store.commits("corpus")) != corpus.num_shards:
        raise ChorusError(f"the corpus of '{cfg.store}' is incomplete; rerun `chorus prepare`")
    return store, corpus


def _check_args(cfg: CacheConfig, corpus: CorpusManifest) -> str:
    vocab = corpus.tokenizer.vocab_size
    if not 1 <= cfg.top_k <= vocab:
        raise ChorusError(f"--top-k must be between 1 and the vocabulary size {vocab}, got {cfg.top_k}")
    if cfg.samples < 0:
        raise ChorusError(f"--samples must be >= 0 (0: no sampled targets), got {cfg.samples}")
    if cfg.branches < 0:
        raise ChorusError(f"--branches must be >= 0 (0: unplaced mass stays in the bucket), got {cfg.branches}")
    if cfg.batch_size < 1:
        raise ChorusError(f"--batch-size must be >= 1, got {cfg.batch_size}")
    check_sampler(corpus.seq_len, cfg.samples)
    name = cfg.name or default_name(cfg.teacher)
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ChorusError(f"--name {name!r}: use letters, digits, '.', '_' and '-' (no '/')")
    value_params(cfg.value_codec)  # refuses an unknown codec
    return name


def _bytes_per_token(store: Store, unit: str, corpus: CorpusManifest) -> float:
    positions = corpus.num_rows * corpus.seq_len
    return sum(store.nbytes(unit, n) for n in store.array_names(unit)) / max(positions, 1)


# ---------------------------------------------------------------------------------------------- recipe
def run(cfg: CacheConfig) -> TeacherManifest:
    # ------------------------------------------------------------------ setup
    worker, workers = shard_assignment(cfg.shard)
    store, corpus = _open_store(cfg)
    name = _check_args(cfg, corpus)
    unit = f"teachers/{name}"
    device = resolve_device(cfg.device, int(os.environ["LOCAL_RANK"]) if "LOCAL_RANK" in os.environ else None)
    dtype = resolve_dtype(cfg.dtype, device)
    match, teacher_tok, teacher_info = check_tokenizer(cfg.teacher, corpus.tokenizer, tokenizer=cfg.tokenizer,
                                                       revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    cmap = _cross_map(store, corpus, teacher_tok, teacher_info) if match == "cross" else None
    teacher = load_teacher(cfg.teacher, vocab_size=len(teacher_tok) if cmap else corpus.tokenizer.vocab_size,
                           device=device, dtype=dtype, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                           tokenizer_match=match, device_map=cfg.device_map)
    teacher.compiled = cfg.compile
    max_pos = getattr(teacher.model.config, "max_position_embeddings", None)
    if max_pos is not None and corpus.seq_len > max_pos and cmap is None:
        raise ChorusError(f"store rows are {corpus.seq_len} tokens but teacher '{cfg.teacher}' handles at most {max_pos}")
    mine = [s for s in range(corpus.num_shards) if s % workers == worker]
    if cmap is not None:
        _check_text(store, corpus, cmap, mine)
    params = value_params(cfg.value_codec)
    manifest = _manifest(cfg, name, corpus, teacher, params, cross=_mapping_record(teacher_info, cmap, cfg.branches))
    specs = target_specs(corpus.seq_len, cfg.top_k, cfg.samples, corpus.tokenizer.vocab_size, cfg.value_codec, params,
                         tail_betas=manifest.tail_betas)
    cache = CacheUnit(store, manifest)
    cache.join(specs, corpus.num_rows, corpus.rows_per_shard, worker=worker, overwrite=cfg.overwrite)
    if cfg.overwrite:
        cache.forget_corrupt(mine)
    done = {s: c for s, c in store.commits(unit).items() if c.fingerprint in ("", manifest.fingerprint)}
    todo = [s for s in mine if s not in done]
    rows_todo = sum(corpus.shard_rows(s)[1] - corpus.shard_rows(s)[0] for s in todo)
    say(f"cache '{name}': {teacher.model_id} on {device} ({dtype_name(dtype)}), k={cfg.top_k} samples={cfg.samples} "
        f"values={cfg.value_codec}; worker {worker}/{workers}: {len(todo)} of {len(mine)} shards to do"
        + {"tokenizer": "", "vocabulary": " (tokenizer differs from the store's but its vocabulary is identical)",
           "cross": f" (its own tokenizer '{teacher_info.name}', {teacher_info.vocab_size} tokens: mapped onto the "
                    f"store's by {METHOD} v{METHOD_VERSION})"}[match])

    def encode(shard: int, row_start: int, host: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        bad = first_bad_position(host["topk_logprobs"])
        if bad is not None:
            raise ChorusError(
                f"teacher '{cfg.teacher}' gave NaN or inf logits at row {row_start + bad[0]} (position {bad[1]}, shard "
                f"{shard}); nothing was written for that shard: check the weights, or try --dtype fp32")
        stats = ({f: host[f] for f in (*STATS_FIELDS, "tail_logz")} | {"tail_betas": manifest.tail_betas}
                 if manifest.has_stats else None)
        with np.errstate(invalid="ignore"):  # a cross-tokenizer "no target" position: both tail bounds are -inf
            return encode_targets(host["topk_ids"], host["topk_logprobs"], vocab_size=corpus.tokenizer.vocab_size,
                                  codec=cfg.value_codec, params=params, draws=host.get("draws"), stats=stats)

    # ------------------------------------------------------------------ loop
    skipped: list[int] = []
    if todo:
        with ShardLeases(store, unit) as leases:
            skipped = _cache_shards(cache, corpus, teacher, todo, rows_todo, encode, cfg, leases=leases, cmap=cmap)

    # ------------------------------------------------------------------ cleanup
    current = cache.current()
    if current is None or current.fingerprint != manifest.fingerprint:
        raise ChorusError(f"cache '{name}' in '{store.url}' was replaced by another writer (--overwrite) while this "
                          "one ran; its status is left to that writer")
    committed = {s: c for s, c in store.commits(unit).items() if c.fingerprint in ("", manifest.fingerprint)}
    status = "complete" if len(committed) == corpus.num_shards else "incomplete"
    if status == "complete" and current.status != "complete":
        done_manifest = current.replace(status="complete")
        if cmap is not None:  # the share of real positions with a sound target, over the whole cache
            extra = {"coverage": coverage(store, name, committed)}
            if workers == 1 and len(todo) == corpus.num_shards and not skipped:  # this run did every shard
                extra["measured"] = {k: float(v) for k, v in cmap.measurements().items()}
            done_manifest = done_manifest.replace(tokenizer_mapping={**current.tokenizer_mapping, **extra})
        store.write_teacher_manifest(done_manifest)  # two workers both flipping is fine
    bpt = _bytes_per_token(store, unit, corpus)
    final = cache.current() or manifest
    covered = (f", {100 * final.tokenizer_mapping['coverage']:.1f}% of positions covered"
               if "coverage" in final.tokenizer_mapping else "")
    if cmap is not None and cmap.measured["covered"]:
        got = cmap.measurements()
        covered += (f" ({100 * got['inside_share']:.1f}% inside a teacher token; teacher's gold-text "
                    f"{got['gold_text_bits_per_byte']:.3f} bits/byte, unplaced mass {got['unplaced_mass']:.3f})")
    say(f"cache '{name}' → {store.url} ({unit}): {status}, {len(committed)}/{corpus.num_shards} shards, "
        f"{bpt:.1f} B/token{covered}" + (f"; {len(skipped)} shard(s) left to the writers that hold them" if skipped else ""))
    return final


def _cross_map(store: Store, corpus: CorpusManifest, teacher_tok, teacher_info: TokenizerInfo) -> CrossMap:
    """The store's tokenizer (its own copy, else where `chorus prepare` read it, checked by fingerprint) and the
    teacher's, mapped."""
    store_tok, _ = store_tokenizer(store, corpus)
    if store_tok is None:
        spec = corpus.source.get("tokenizer")
        raise ChorusError(f"the store's tokenizer is needed to map a teacher with another tokenizer, and the store has no "
                          f"copy of it (prepared by an older chorus) and '{spec}' is missing or has changed since "
                          "`chorus prepare`; restore it, or prepare the store again")
    store_text = TokenText.of(store_tok, corpus.tokenizer.name)
    teacher_text = TokenText.of(teacher_tok, teacher_info.name)
    return CrossMap(teacher_text, store_text, corpus.tokenizer.vocab_size)


def _check_text(store: Store, corpus: CorpusManifest, cmap: CrossMap, shards: list[int]) -> None:
    """Every row this worker will cache, read back into text by the teacher's tokenizer before its first forward
    pass: a row it cannot reproduce is refused now, with nothing written, not after hours of caching."""
    t0 = time.perf_counter()
    for shard in shards:
        lo, _ = corpus.shard_rows(shard)
        got = store.read_shard("corpus", shard, ["input_ids", "segment_ids"])
        check_text(got["input_ids"], got["segment_ids"], cmap, row_start=lo)
    say(f"the teacher's tokenizer reproduces the text of every row of {len(shards)} shard(s) "
        f"({time.perf_counter() - t0:.1f} s)")


def _mapping_record(info: TokenizerInfo, cmap: CrossMap | None, branches: int) -> dict:
    if cmap is None:
        return {}
    return {"tokenizer": info.to_dict(), "method": METHOD, "version": METHOD_VERSION,
            "branches": branches if cmap.permutation is None else 0, "vocab": cmap.summary()}


def coverage(store: Store, name: str, commits: dict) -> float:
    """Covered / real positions (a real one predicts a token of its document: segment ids > 0 at t and t + 1)."""
    covered = real = 0
    for shard, commit in sorted(commits.items()):
        entropy = store.read_shard(f"teachers/{name}", shard, ["stats"], commit=commit)["stats"][..., 1]
        seg = store.read_shard("corpus", shard, ["segment_ids"])["segment_ids"]
        mask = np.zeros(seg.shape, dtype=bool)
        mask[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] > 0)
        real += int(mask.sum())
        covered += int((mask & ~no_target(entropy)).sum())
    return covered / max(real, 1)


def _manifest(cfg: CacheConfig, name: str, corpus: CorpusManifest, teacher: Teacher, params: dict, *,
              cross: dict) -> TeacherManifest:
    settings = {"top_k": cfg.top_k, "samples": cfg.samples, "seed": cfg.seed if cfg.samples else None,
                "value_codec": cfg.value_codec, "value_params": params, "dtype": dtype_name(teacher.dtype), "targets": TARGETS,
                "tail_betas": list(TAIL_BETAS)}
    if cfg.samples:
        settings["sampler"] = SAMPLER
    if cross:  # the teacher's own tokenizer and the mapping (method, version) are part of what the targets are
        settings["cross_tokenizer"] = {k: cross[k] for k in ("tokenizer", "method", "version", "branches")}
    fp = fingerprint("teacher-cache", corpus.fingerprint, corpus.tokenizer.fingerprint, teacher.weights_fingerprint,
                     teacher.model_id, teacher.revision, settings)
    return TeacherManifest(
        name=name, model=cfg.teacher, revision=teacher.revision, weights_fingerprint=teacher.weights_fingerprint,
        dtype=dtype_name(teacher.dtype), device=teacher.device.type, top_k=cfg.top_k, num_samples=cfg.samples,
        seed=cfg.seed, value_codec=cfg.value_codec, value_params=params, corpus_fingerprint=corpus.fingerprint,
        tokenizer_fingerprint=corpus.tokenizer.fingerprint, vocab_size=corpus.tokenizer.vocab_size, fingerprint=fp,
        created_by=__version__, tail_betas=TAIL_BETAS, tokenizer_mapping=cross,
    )


def _cache_shards(cache: CacheUnit, corpus: CorpusManifest, teacher: Teacher, todo: list[int], rows_todo: int,
                  encode, cfg: CacheConfig, *, leases: ShardLeases, cmap: CrossMap | None = None) -> list[int]:
    """The loop: the main thread only reads ahead (one shard), claims each shard, runs the teacher and queues
    tensors; returns the shards skipped because a live writer holds them."""
    store, unit, tail_betas = cache.store, cache.unit, cache.manifest.tail_betas
    reader = ThreadPoolExecutor(1, thread_name_prefix="chorus-read")
    names = ["input_ids", "segment_ids"] if cmap is not None else ["input_ids"]

    def read(shard: int) -> dict:  # a cross-tokenizer teacher's rows are aligned here too, a shard ahead
        got = store.read_shard("corpus", shard, names)
        if cmap is not None:
            row_start, _ = corpus.shard_rows(shard)
            got["alignments"] = [align(got["input_ids"][o: o + cfg.batch_size], got["segment_ids"][o: o + cfg.batch_size],
                                       cmap, row_start=row_start + o) for o in range(0, len(got["input_ids"]), cfg.batch_size)]
        return got
    pending = reader.submit(read, todo[0])
    skipped: list[int] = []
    try:
        with ShardWriter(store, unit, encode=encode, fingerprint=cache.manifest.fingerprint,
                         before_commit=lambda shard: cache.fence(leases, shard),
                         on_commit=lambda shard, _a: leases.release(shard)) as writer, \
                Progress(f"cache {unit}", total=rows_todo) as bar:
            for n, shard in enumerate(todo):
                rows = pending.result()
                ids = rows["input_ids"]
                if n + 1 < len(todo):
                    pending = reader.submit(read, todo[n + 1])
                cache.fence()
                if not cache.claim(leases, shard):
                    skipped.append(shard)
                    continue
                row_start, _ = corpus.shard_rows(shard)
                for offset in range(0, len(ids), cfg.batch_size):
                    x = torch.from_numpy(ids[offset: offset + cfg.batch_size].astype(np.int64)).to(teacher.device)
                    try:
                        with torch.inference_mode():
                            if cmap is None:
                                targets = teacher.targets(x, top_k=cfg.top_k, num_samples=cfg.samples, seed=cfg.seed,
                                                          row_start=row_start + offset, tail_betas=tail_betas)
                            else:
                                segs = rows["segment_ids"][offset: offset + cfg.batch_size]
                                targets = cross_targets(teacher, cmap, ids[offset: offset + cfg.batch_size], segs, top_k=cfg.top_k,
                                                        num_samples=cfg.samples, seed=cfg.seed,
                                                        row_start=row_start + offset, tail_betas=tail_betas,
                                                        alignment=rows["alignments"][offset // cfg.batch_size],
                                                        branches=cfg.branches)
                    except OutOfMemory:
                        raise ChorusError(
                            f"out of memory on {teacher.device} at --batch-size {cfg.batch_size} (shard {shard}); "
                            f"rerun with a smaller --batch-size (e.g. --batch-size {max(1, cfg.batch_size // 2)}); committed shards are kept"
                        ) from None
                    writer.put(shard, row_start, len(ids), offset, targets)
                    bar.update(len(x), tokens=x.numel(), shards=f"{len(writer.committed)}/{len(todo)}")
    finally:
        reader.shutdown(wait=True, cancel_futures=True)
    return skipped
