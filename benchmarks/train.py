"""`chorus train` costs, measured side by side in one process on one synthetic store.

For one student and batch: step time and peak memory of (i) CE only, (ii) KD from the cache (sparse
top-k targets, tail bucket), (iii) online KD with a teacher in memory (its forward + dense KL, the
thing the cache replaces); loader throughput in target-tokens/s (positions × teachers) with 1 and 3
teachers at k = 64 and 0, 1, 2 loader workers (threads decoding shards ahead; the same batches for any
number); and the cost of turning 3 cached teachers into one pooled target per step
(building the sparse distributions + `ensemble.aggregate`) relative to the student step.

Modes are interleaved round-robin and each reports its median step, so machine load affects all alike.
Peak memory: CUDA max_memory_allocated; on CPU the resident-set high-water mark (VmHWM, reset through
/proc/self/clear_refs) above the resident set before the step. The store is synthetic (random corpus,
well-formed top-k: unique ids, log-probs sorted and normalized over the full vocabulary with a tail); its ids are
Zipf-distributed, calibrated to cost about what a real teacher's do (``zipf_ids``), or with ``--ids uniform``
uniform over the vocabulary (the ids codec's worst case: nearly every id a two-byte code).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write  # noqa: E402

from chorus.distill.targets import pool as pool_teachers  # noqa: E402
from chorus.distill.targets import teacher_dist
from chorus.store import (  # noqa: E402
    ArraySpec,
    CorpusManifest,
    Store,
    TeacherManifest,
    TokenizerInfo,
    encode_targets,
    fingerprint,
    target_specs,
    value_params,
)
from chorus.student.data import CachedRows, StreamLoader, positions  # noqa: E402
from chorus.student.model import Student  # noqa: E402

K = 64


# ---------------------------------------------------------------------------------------------- store
ZIPF_S = 0.9  # synthetic ids' Zipf exponent: ~98 B/token and 65% two-byte ids at vocab 32 000 (a real teacher: 92, 64%)


def zipf_ids(rng: np.random.Generator, shape: tuple[int, ...], vocab: int, s: float = ZIPF_S) -> np.ndarray:
    """Top-k ids [..., k], unique per position, whose frequencies over the store fall off as rank^-s (a bounded
    Zipf law, then ranks pushed up past duplicates) in random order per position, ranks mapped to random ids:
    what the ids codec sees of a real teacher (SmolLM2-135M, benchmarks/cache.py --real: ~92 B/token of ids,
    64% of them two-byte codes), where uniform random ids are its worst case (122 B/token, 99.5% two-byte)."""
    k = shape[-1]
    u = rng.random((int(np.prod(shape[:-1])), k))
    r = ((1 + u * ((vocab - k) ** (1 - s) - 1)) ** (1 / (1 - s)) - 1).astype(np.int64)
    r.sort(-1)
    r = rng.permuted(np.maximum.accumulate(r - np.arange(k), -1) + np.arange(k), axis=-1)
    return rng.permutation(vocab)[r].reshape(shape)


def build_store(url: str, *, vocab: int, seq_len: int, rows: int, rps: int, teachers: int, seed: int = 0,
                ids: str = "zipf") -> None:
    """A store of random rows and ``teachers`` well-formed top-k caches; ``ids`` "zipf" (realistic: ``zipf_ids``)
    or "uniform" (every id equally likely: the ids codec's worst case)."""
    rng = np.random.default_rng(seed)
    store = Store.open(url, "w")
    tok = TokenizerInfo(name="synthetic", vocab_size=vocab, fingerprint=fingerprint("tok", vocab),
                        vocab_fingerprint=fingerprint("vocab", vocab), eos_id=0, pad_id=1)
    specs = [ArraySpec("input_ids", (seq_len,), "int32"), ArraySpec("segment_ids", (seq_len,), "uint16"),
             ArraySpec("domain", (), "uint16"), ArraySpec("split", (), "uint8")]
    store.create_arrays("corpus", specs, rows, rps)
    shards = -(-rows // rps)
    for s in range(shards):
        lo, hi = s * rps, min(rows, s * rps + rps)
        n = hi - lo
        store.write_shard("corpus", s, lo, {
            "input_ids": rng.integers(2, vocab, (n, seq_len), dtype=np.int32),
            "segment_ids": np.ones((n, seq_len), np.uint16),
            "domain": (np.arange(lo, hi) % 3).astype(np.uint16),
            "split": (np.arange(lo, hi) % 16 == 0).astype(np.uint8),
        })
    m = CorpusManifest(fingerprint=fingerprint("bench", vocab, seq_len, rows), tokenizer=tok, seq_len=seq_len,
                       num_rows=rows, rows_per_shard=rps, domains=("a", "b", "c"), num_tokens=rows * seq_len,
                       split_rows={"train": rows - len(range(0, rows, 16)), "valid": len(range(0, rows, 16))},
                       source={"synthetic": True}, created_by="bench")
    store.write_manifest(m)
    params = value_params("fp16")
    for t in range(teachers):
        name = f"t{t}"
        tm = TeacherManifest(name=name, model="synthetic", revision="none", weights_fingerprint=fingerprint(name),
                             dtype="fp32", device="cpu", top_k=K, num_samples=0, seed=t, value_codec="fp16",
                             value_params=params, corpus_fingerprint=m.fingerprint,
                             tokenizer_fingerprint=tok.fingerprint, vocab_size=vocab, fingerprint=fingerprint(name, K),
                             created_by="bench", status="incomplete")
        store.write_teacher_manifest(tm)
        store.create_arrays(f"teachers/{name}", target_specs(seq_len, K, 0, vocab, "fp16", params), rows, rps)
        for s in range(shards):
            lo, hi = s * rps, min(rows, s * rps + rps)
            shape = (hi - lo, seq_len, K)
            if ids == "zipf":
                top = zipf_ids(rng, shape, vocab)
            else:
                gaps = rng.integers(1, max(2, vocab // (2 * K)), shape)
                top = (rng.integers(0, vocab, shape[:2] + (1,)) + np.cumsum(gaps, -1)) % vocab  # unique per position
            logits = np.sort(rng.normal(0, 2, shape), -1)[..., ::-1]
            tail = rng.uniform(0.01, 0.2, shape[:2] + (1,))
            logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True)) + np.log1p(-tail)
            store.write_shard(f"teachers/{name}", s, lo, encode_targets(top, logp.astype(np.float32), vocab_size=vocab,
                                                                        codec="fp16", params=params))
        store.write_teacher_manifest(tm.replace(status="complete"))


# ---------------------------------------------------------------------------------------------- memory
class Peak:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _status(self, key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
            self.base = self._status("VmRSS")

    def stop(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - self.base
        return self._status("VmHWM") - self.base


def llama(vocab: int, hidden: int, layers: int, seq_len: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
                      num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 64),
                      max_position_embeddings=seq_len, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1: stable when other processes share the cores)")
    ap.add_argument("--ids", choices=("zipf", "uniform"), default="zipf",
                    help="synthetic top-k ids: zipf (calibrated to a real teacher's cost) or uniform (worst case)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()
    if args.quick:
        vocab, seq_len, rows, rps, hidden, layers, batch, repeats = 8192, 256, 512, 64, 128, 2, 8, 5
    else:
        vocab, seq_len, rows, rps, hidden, layers, batch, repeats = 32000, 512, 1024, 128, 256, 4, 4, 5
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    work = Path(tempfile.mkdtemp(prefix="chorus-bench-train-"))
    url = str(work / "store.zarr")
    t0 = time.perf_counter()
    build_store(url, vocab=vocab, seq_len=seq_len, rows=rows, rps=rps, teachers=3, ids=args.ids)
    print(f"load average {load[0]:.1f} on {os.cpu_count()} cores; torch threads {args.threads}")
    print(f"synthetic store: {rows} rows x {seq_len}, vocab {vocab}, 3 teachers at k={K}, {args.ids} ids "
          f"({time.perf_counter() - t0:.0f} s)")

    # ---- loader throughput (1 and 3 teachers; whole epochs, shard decode and checksum included). StreamLoader's
    # workers are threads of this process decoding shards ahead and collating on a background thread; the
    # configurations are interleaved round-robin and each reports its median, so machine load affects all alike
    loader_times: dict[tuple[int, int], list[float]] = {}
    loader_cpu: dict[tuple[int, int], list[float]] = {}  # CPU-seconds of this process (all threads): load-robust
    positions_per_epoch: dict[int, int] = {}
    for _ in range(3):
        for n_teachers in (1, 3):
            for workers in (0, 1, 2):
                names = [f"t{i}" for i in range(n_teachers)]
                ds = CachedRows(url, batch_size=16, teachers=names, epochs=1, shuffle_buffer=2 * rps, rank=0,
                                world_size=1)
                t0, c0 = time.perf_counter(), time.process_time()
                positions_per_epoch[n_teachers] = sum(b["input_ids"].numel() for b in StreamLoader(ds, num_workers=workers))
                loader_times.setdefault((n_teachers, workers), []).append(time.perf_counter() - t0)
                loader_cpu.setdefault((n_teachers, workers), []).append(time.process_time() - c0)
    loader_rows = []
    for (n_teachers, workers), ts in loader_times.items():
        dt = statistics.median(ts)
        cpu = statistics.median(loader_cpu[(n_teachers, workers)])
        loader_rows.append({"teachers": n_teachers, "workers": workers, "positions_per_s": positions_per_epoch[n_teachers] / dt,
                            "target_tokens_per_s": positions_per_epoch[n_teachers] * n_teachers / dt,
                            "target_tokens_per_cpu_s": positions_per_epoch[n_teachers] * n_teachers / cpu})

    # ---- step costs, interleaved
    student = Student(llama(vocab, hidden, layers, seq_len, 0).to(device), vocab)
    teacher = llama(vocab, 2 * hidden, 2 * layers, seq_len, 1).to(device).eval()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    ds = CachedRows(url, batch_size=batch, teachers=["t0", "t1", "t2"], rank=0, world_size=1)
    batch_data = next(iter(ds))
    pos = positions(batch_data, device)
    ids = batch_data["input_ids"].to(device)
    prior = torch.ones(len(pos.select), 3, device=device)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    def one_target():
        return teacher_dist(batch_data["teachers"]["t0"], pos.select, target="topk_tail", vocab_size=vocab, device=device)

    def pooled_target(operator="mixture", weighting="none"):
        dists = [teacher_dist(batch_data["teachers"][t], pos.select, target="topk_tail", vocab_size=vocab, device=device)
                 for t in ("t0", "t1", "t2")]
        return pool_teachers(dists, prior, operator=operator, weighting=weighting, gold=pos.gold)[0]

    def step(targets_fn, fused=True):
        targets = targets_fn() if targets_fn else None
        loss, _ = student(ids, pos.attention_mask, pos.select, pos.gold, targets, loss_fn="forward_kl",
                          kd_weight=0.5 if targets is not None else 0.0, chunk_size=1024, fused=fused)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def ce_hf():  # the usual full-logits HF loss, for reference
        out = student.model(input_ids=ids, attention_mask=pos.attention_mask, labels=ids)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def online_kd():  # teacher forward + dense KL on full [B, L, V] logits
        with torch.no_grad():
            t_logp = F.log_softmax(teacher(input_ids=ids, attention_mask=pos.attention_mask).logits[:, :-1].float(), -1)
        logits = student.model(input_ids=ids, attention_mask=pos.attention_mask).logits[:, :-1].float()
        s_logp = F.log_softmax(logits, -1)
        mask = pos.attention_mask[:, 1:].bool()
        kd = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[mask].mean()
        ce = F.nll_loss(s_logp.reshape(-1, vocab), ids[:, 1:].reshape(-1))
        (0.5 * kd + 0.5 * ce).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    modes = {
        "ce": lambda: step(None),
        "ce_checkpointed_chunks": lambda: step(None, fused=False),  # the head's logits recomputed in backward
        "ce_hf_full_logits": ce_hf,
        "kd_cache_1_teacher": lambda: step(one_target),
        "kd_cache_3_teachers_mixture": lambda: step(pooled_target),
        "kd_online_teacher_in_memory": online_kd,
        "pool_3_teachers_mixture": lambda: pooled_target(),
        "pool_3_teachers_geometric_confidence": lambda: pooled_target("geometric", "confidence"),
        "pool_3_teachers_power_agreement": lambda: pooled_target("power", "agreement"),
    }
    times: dict[str, list[float]] = {k: [] for k in modes}
    peaks: dict[str, int] = {k: 0 for k in modes}
    peak = Peak(device)
    for fn in modes.values():  # warm-up
        fn()
    for _ in range(repeats):
        for name, fn in modes.items():
            sync()
            peak.start()
            t0 = time.perf_counter()
            fn()
            sync()
            times[name].append(time.perf_counter() - t0)
            peaks[name] = max(peaks[name], peak.stop())
    med = {k: statistics.median(v) for k, v in times.items()}
    ce = med["ce"]
    step_rows = [[k, med[k] * 1e3, med[k] / ce, peaks[k] / 2**20] for k in modes]
    print(f"\nstep costs on {device} (student {hidden}x{layers} layers, teacher {2 * hidden}x{2 * layers}, "
          f"batch {batch}x{seq_len}, vocab {vocab}; median of {repeats})")
    print(table(["mode", "ms", "x CE step", "peak MiB"], step_rows))
    print("\nloader (one epoch, decode + checksum + collate; median of 3)")
    print(table(["teachers", "workers", "positions/s", "target-tokens/s", "per CPU-second"],
                [[r["teachers"], r["workers"], r["positions_per_s"], r["target_tokens_per_s"], r["target_tokens_per_cpu_s"]]
                 for r in loader_rows]))
    goals = {
        "ce_step_over_hf_full_logits": ce / med["ce_hf_full_logits"],
        "ce_step_over_hf_full_logits_goal": 1.0,
        "kd_cache_step_over_hf_full_logits": med["kd_cache_1_teacher"] / med["ce_hf_full_logits"],
        "kd_cache_step_over_hf_full_logits_goal": 1.0,
        "ce_peak_over_hf_full_logits": peaks["ce"] / max(peaks["ce_hf_full_logits"], 1),
        "ce_peak_over_hf_full_logits_goal": 0.5,
        "kd_cache_step_over_ce": med["kd_cache_1_teacher"] / ce,
        "kd_cache_step_over_ce_goal": 1.05,
        "pool_3_teachers_over_student_step": med["pool_3_teachers_mixture"] / ce,
        "pool_3_teachers_over_student_step_goal": 0.05,
        "loader_best_target_tokens_per_s_3_teachers": max(r["target_tokens_per_s"] for r in loader_rows if r["teachers"] == 3),
        "loader_best_target_tokens_per_s_1_teacher": max(r["target_tokens_per_s"] for r in loader_rows if r["teachers"] == 1),
        "loader_goal_target_tokens_per_s": 2_000_000,
    }
    print("\n" + "\n".join(f"{k}: {v:.4g}" for k, v in goals.items()))
    path = write("train", {"quick": args.quick, "device": str(device), "torch_threads": args.threads, "ids": args.ids,
                           "ids_note": "zipf: Zipf-distributed ids calibrated to a real teacher's ~92 B/token and 64% "
                                       "two-byte codes (here ~98 B/token, 65%); uniform: the ids codec's worst case",
                           "load_average_at_start": load, "load_average_at_end": os.getloadavg(),
                           "setup": {"vocab": vocab, "seq_len": seq_len, "rows": rows, "rows_per_shard": rps, "k": K,
                                     "student_hidden": hidden, "student_layers": layers, "teacher_hidden": 2 * hidden,
                                     "teacher_layers": 2 * layers, "batch_rows": batch, "repeats": repeats},
                           "step_ms_median": {k: v * 1e3 for k, v in med.items()},
                           "step_over_ce": {k: v / ce for k, v in med.items()},
                           "peak_bytes": peaks, "peak_memory_method": "cuda max_memory_allocated" if device.type == "cuda"
                           else "VmHWM above VmRSS (reset via /proc/self/clear_refs)",
                           "loader": loader_rows, "goals": goals})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
