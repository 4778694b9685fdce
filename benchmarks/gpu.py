"""GPU costs of `chorus cache` and `chorus train`, measured side by side in one run (random-init Llamas, nothing
downloaded):

(a) cache: bf16 tokens/s of the teacher pass (chunked LM head → top-64, samples, exact statistics, copied to the
    host) against the bare HF forward (full logits, nothing else) and against the previous per-row pass over full
    logits, at V ≈ 50k and 128k, L = 2048 and 8192; "pipelined": batches back to back with their host copies
    queued on a side stream as `chorus cache` does (teacher/writer.py); peak memory of each
    (torch.cuda.max_memory_allocated above the memory held before the step);
(b) train: one student step (forward, backward, AdamW) with KD from cached top-64 targets (chunked loss) against
    a CE step with the same chunked loss and against HF's own full-logits CE.

    python benchmarks/gpu.py                → on a CUDA machine: table on stdout, benchmarks/results/gpu.json
    python benchmarks/gpu.py --compile      → also `chorus cache --compile` (a GPU's default; on a CPU a compile
                                              per shape)
    python benchmarks/gpu.py --profile      → first the kernels of one target pass (torch.profiler)
    python benchmarks/gpu.py --smoke        → tiny CPU run of the same code paths in seconds (not GPU numbers;
                                              written to gpu-smoke.json, under --results DIR if given)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "src"))
import _common  # noqa: E402

from chorus.distill.losses import chunked_distill_loss  # noqa: E402
from chorus.distill.sparse import SparseDist  # noqa: E402
from chorus.store import TAIL_BETAS  # noqa: E402
from chorus.teacher.model import Teacher, sparse_targets  # noqa: E402
from chorus.teacher.writer import to_host_async  # noqa: E402

TOP_K, SAMPLES = 64, 32
PIPELINE = 3  # batches per timed call of the pipelined cache loop
FULL = {"teacher": {"hidden": 2048, "layers": 8, "heads": 16, "kv": 8, "ffn": 5632},
        # Llama-3-8B's shape (random weights): how the target pass compares with a forward of a teacher people use
        "big_teacher": {"hidden": 4096, "layers": 32, "heads": 32, "kv": 8, "ffn": 14336},
        "student": {"hidden": 1024, "layers": 8, "heads": 16, "kv": 8, "ffn": 2816},
        "vocabs": (50_304, 128_256), "lengths": (2048, 8192), "tokens": 16_384, "repeats": 3}
SMOKE = {"teacher": {"hidden": 64, "layers": 1, "heads": 2, "kv": 2, "ffn": 128},
         "big_teacher": {"hidden": 96, "layers": 2, "heads": 2, "kv": 2, "ffn": 192},
         "student": {"hidden": 32, "layers": 1, "heads": 2, "kv": 2, "ffn": 64},
         "vocabs": (512, 1024), "lengths": (64, 128), "tokens": 256, "repeats": 2}


def llama(vocab: int, length: int, dims: dict, dtype: torch.dtype, device: torch.device, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dims["hidden"], intermediate_size=dims["ffn"],
                      num_hidden_layers=dims["layers"], num_attention_heads=dims["heads"],
                      num_key_value_heads=dims["kv"], max_position_embeddings=length)
    with torch.device(device):  # initialized where it runs (a 1B model's random init on a host CPU takes long)
        return LlamaForCausalLM(cfg).to(dtype)


class Meter:
    """Median wall time and peak memory of a callable (CUDA: max_memory_allocated above the memory held before;
    CPU: the resident-set high-water mark above the resident set, reset through /proc/self/clear_refs)."""

    def __init__(self, device: torch.device, repeats: int):
        self.device, self.repeats = device, repeats

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _rss(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1]) * 1024
        return 0

    def peak(self, fn) -> int:
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            before = torch.cuda.memory_allocated(self.device)
            fn()
            self.sync()
            return torch.cuda.max_memory_allocated(self.device) - before
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            return -1
        before = self._rss("VmRSS:")
        fn()
        return self._rss("VmHWM:") - before

    def time(self, fn) -> float:
        fn()  # warm-up (kernels, allocator, the teacher's one-time head check)
        times = []
        for _ in range(self.repeats):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


# ---------------------------------------------------------------------------------------------- (a) cache
def bench_cache(plan: dict, dtype: torch.dtype, device: torch.device, meter: Meter, *, per_row: bool,
                compile: bool, big_only: bool = False) -> list[dict]:
    cases = [] if big_only else [("teacher", v, length, per_row) for v in plan["vocabs"] for length in plan["lengths"]]
    cases += [("big_teacher", plan["vocabs"][-1], length, False) for length in plan["lengths"]]
    rows = []
    for teacher, vocab, length, full in cases:
        rows.append(_cache_row(plan, teacher, vocab, length, dtype, device, meter, per_row=full, compile=compile))
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the last teacher is gone with its row
    return rows


def _cache_row(plan: dict, teacher: str, vocab: int, length: int, dtype: torch.dtype, device: torch.device,
               meter: Meter, *, per_row: bool, compile: bool) -> dict:
    net = llama(vocab, length, plan[teacher], dtype, device).eval().requires_grad_(False)
    t = Teacher(net, device, dtype, vocab, "random-llama", "local", "-", "tokenizer")
    batch = max(1, plan["tokens"] // length)
    x = torch.randint(0, vocab, (batch, length), device=device)
    kw = {"top_k": TOP_K, "num_samples": SAMPLES, "seed": 0, "row_start": 0, "tail_betas": TAIL_BETAS}

    def bare():
        with torch.inference_mode():
            net(input_ids=x, use_cache=False).logits.sum().item()  # the sum only to wait for the result

    def body():  # the model up to its final hidden states: what is left is the head GEMM and the target math
        with torch.inference_mode():
            t.hidden_states(x).sum().item()

    def chunked():
        with torch.inference_mode():
            return {k: v.cpu() for k, v in t.targets(x, **kw).items()}

    def variant(**settings):  # the same pass with other Teacher settings
        def run():
            saved = {k: getattr(t, k) for k in settings}
            for k, val in settings.items():
                setattr(t, k, val)
            try:
                return chunked()
            finally:
                for k, val in saved.items():
                    setattr(t, k, val)
        return run

    def full():
        with torch.inference_mode():
            return {k: v.cpu() for k, v in sparse_targets(t.logits(x), x, **kw).items()}

    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def pipelined():  # as `chorus cache` runs: PIPELINE batches back to back, each one's host copies queued on a
        with torch.inference_mode():  # side stream (teacher/writer.py), waited for only at the end
            pending = [to_host_async(t.targets(x, **kw), stream) for _ in range(PIPELINE)]
        for _, event in pending:
            if event is not None:
                event.synchronize()

    row = {"teacher": teacher, "params_m": sum(p.numel() for p in net.parameters()) / 1e6, "vocab": vocab,
           "seq_len": length, "batch": batch}
    # chunked: `chorus cache`'s defaults here (a GPU: logit_targets, statistics compiled); eager: nothing compiled;
    # log_probs: the pass before logit_targets (fp32 log-softmax of each chunk, then position_targets);
    # compiled: --compile (on a CPU: logit_targets, its statistics as one exp and powers, compiled);
    # chain: the GPU's pass with a CPU's statistics (chain_statistics: one exp and powers, sums in blocks of 4096 ids;
    # not yet measured on a GPU)
    runs = [("bare", bare), ("body", body), ("chunked", chunked), ("pipelined", pipelined), ("chain", variant(chain=True)),
            ("eager", variant(compiled=False)), ("log_probs", variant(compiled=False, from_logits=False))]
    runs += [("per_row", full)] if per_row else []
    runs += [("compiled", variant(compiled=True))] if compile else []
    for name, fn in runs:
        try:
            sec = meter.time(fn) / (PIPELINE if name == "pipelined" else 1)
            row[f"{name}_tok_s"] = x.numel() / sec
            row[f"{name}_peak_mb"] = meter.peak(fn) / 2**20
        except torch.OutOfMemoryError:
            row[f"{name}_tok_s"] = row[f"{name}_peak_mb"] = None
            torch.cuda.empty_cache()
    if row.get("bare_tok_s") and row.get("chunked_tok_s"):
        row["cache_vs_bare"] = row["chunked_tok_s"] / row["bare_tok_s"]
    for name in ("pipelined", "chain", "eager", "log_probs", "compiled"):
        if row.get("bare_tok_s") and row.get(f"{name}_tok_s"):
            row[f"{name}_vs_bare"] = row[f"{name}_tok_s"] / row["bare_tok_s"]
    print({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    return row


def profile_targets(plan: dict, dtype: torch.dtype, device: torch.device) -> None:
    """Where one target pass's time goes, by kernel (so the next change is measured, not guessed)."""
    from torch.profiler import ProfilerActivity, profile

    vocab, length = plan["vocabs"][-1], plan["lengths"][0]
    net = llama(vocab, length, plan["teacher"], dtype, device).eval().requires_grad_(False)
    t = Teacher(net, device, dtype, vocab, "random-llama", "local", "-", "tokenizer")
    x = torch.randint(0, vocab, (max(1, plan["tokens"] // length), length), device=device)
    kw = {"top_k": TOP_K, "num_samples": SAMPLES, "seed": 0, "row_start": 0, "tail_betas": TAIL_BETAS}
    cuda = device.type == "cuda"
    for from_logits in ((None, False) if cuda else (None,)):
        t.from_logits, t.compiled = from_logits, None if from_logits is None else False
        with torch.inference_mode():
            t.targets(x, **kw)
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            with profile(activities=activities) as prof:
                t.targets(x, **kw)
                if cuda:
                    torch.cuda.synchronize()
        print(f"target pass, V = {vocab}, {x.numel()} positions, "
              f"{'defaults' if from_logits is None else 'fp32 log-probs, eager'}:")
        print(prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=18))


# ---------------------------------------------------------------------------------------------- (b) train
def synthetic_targets(n: int, vocab: int, device: torch.device, seed: int = 0) -> SparseDist:
    """Well-formed top-k targets: unique ids, log-probs sorted and normalized over the vocabulary with a tail."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    ids = torch.stack([torch.randperm(vocab, generator=g)[:TOP_K] for _ in range(min(n, 64))]).repeat(-(-n // 64), 1)[:n]
    logp = torch.log_softmax(torch.randn(n, TOP_K + 1, generator=g) * 2, -1).sort(-1, descending=True).values
    tail = logp[:, -1].exp()
    return SparseDist(ids.to(device), logp[:, :TOP_K].contiguous().to(device), tail.to(device), vocab)


def bench_train(plan: dict, dtype: torch.dtype, device: torch.device, meter: Meter) -> list[dict]:
    return [_train_row(plan, vocab, dtype, device, meter) for vocab in plan["vocabs"]]


def _train_row(plan: dict, vocab: int, dtype: torch.dtype, device: torch.device, meter: Meter) -> dict:
    length = plan["lengths"][0]
    net = llama(vocab, length, plan["student"], dtype, device, seed=1).train()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=device.type == "cuda")
    batch = max(1, plan["tokens"] // length)
    x = torch.randint(0, vocab, (batch, length), device=device)
    gold = torch.roll(x, -1, 1)
    gold[:, -1] = -100
    targets = synthetic_targets(x.numel(), vocab, device)

    def chunked(kd: bool):
        def step():
            hidden = net.model(input_ids=x, use_cache=False).last_hidden_state.reshape(x.numel(), -1)
            loss, _ = chunked_distill_loss(hidden, net.lm_head.weight, gold.reshape(-1), targets if kd else None,
                                           loss_fn="forward_kl", kd_weight=0.5 if kd else 0.0)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return step

    def hf_ce():
        logits = net(input_ids=x, use_cache=False).logits
        F.cross_entropy(logits.float().reshape(-1, vocab), gold.reshape(-1), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    row = {"vocab": vocab, "seq_len": length, "batch": batch}
    for name, fn in (("kd_cache", chunked(True)), ("ce_chunked", chunked(False)), ("ce_hf", hf_ce)):
        row[f"{name}_ms"] = meter.time(fn) * 1e3
        row[f"{name}_peak_mb"] = meter.peak(fn) / 2**20
    row["kd_vs_ce"] = row["kd_cache_ms"] / row["ce_chunked_ms"]
    row["kd_vs_hf_ce"] = row["kd_cache_ms"] / row["ce_hf_ms"]
    return row


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny models on CPU: exercises the code, not GPU numbers")
    ap.add_argument("--results", default=None, help="folder for the JSON (default benchmarks/results)")
    ap.add_argument("--no-per-row", action="store_true", help="skip the previous per-row full-logits pass")
    ap.add_argument("--big-only", action="store_true", help="only the 8B-shaped teacher's cache rows (no training)")
    ap.add_argument("--profile", action="store_true", help="first print the kernels of one target pass at the largest "
                                                           "vocabulary (torch.profiler), then benchmark")
    ap.add_argument("--compile", action="store_true", help="also time `chorus cache --compile` (torch.compile of the "
                                                           "per-position math; compiles once per shape)")
    args = ap.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.smoke
    if not cuda and not args.smoke:
        print("no CUDA device here: running --smoke (tiny CPU models; these are not GPU numbers)")
        args.smoke = True
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    plan = SMOKE if args.smoke else FULL
    meter = Meter(device, plan["repeats"])
    if args.results:
        _common.RESULTS = Path(args.results)

    if args.profile:
        profile_targets(plan, dtype, device)
    cache_rows = bench_cache(plan, dtype, device, meter, per_row=not args.no_per_row, compile=args.compile,
                             big_only=args.big_only)
    print(_common.table(["params M", "V", "L", "B", "bare tok/s", "body tok/s", "chunked tok/s", "pipelined tok/s",
                         "eager tok/s", "log-probs tok/s", "per-row tok/s", "cache/bare", "pipelined/bare",
                         "chain/bare", "eager/bare", "log-probs/bare", "compiled/bare", "bare MB", "chunked MB", "per-row MB"],
                        [[r["params_m"], r["vocab"], r["seq_len"], r["batch"], r["bare_tok_s"], r["body_tok_s"],
                          r["chunked_tok_s"], r.get("pipelined_tok_s"), r.get("eager_tok_s"),
                          r.get("log_probs_tok_s"), r.get("per_row_tok_s"), r.get("cache_vs_bare"),
                          r.get("pipelined_vs_bare"), r.get("chain_vs_bare"), r.get("eager_vs_bare"),
                          r.get("log_probs_vs_bare"), r.get("compiled_vs_bare"), r["bare_peak_mb"], r["chunked_peak_mb"], r.get("per_row_peak_mb")]
                         for r in cache_rows]))
    train_rows = [] if args.big_only else bench_train(plan, dtype, device, meter)
    print(_common.table(["V", "L", "B", "KD cache ms", "CE chunked ms", "CE HF ms", "KD/CE", "KD/HF CE", "KD MB",
                         "CE MB", "HF CE MB"],
                        [[r["vocab"], r["seq_len"], r["batch"], r["kd_cache_ms"], r["ce_chunked_ms"], r["ce_hf_ms"],
                          r["kd_vs_ce"], r["kd_vs_hf_ce"], r["kd_cache_peak_mb"], r["ce_chunked_peak_mb"],
                          r["ce_hf_peak_mb"]] for r in train_rows]))
    payload = {"mode": "smoke (CPU, tiny models: not GPU numbers)" if args.smoke else "gpu",
               "dtype": str(dtype).removeprefix("torch."), "device": torch.cuda.get_device_name(0) if cuda else "cpu",
               "plan": {k: v for k, v in plan.items()}, "top_k": TOP_K, "samples": SAMPLES,
               "cache": cache_rows, "train": train_rows}
    path = _common.write("gpu-smoke" if args.smoke else "gpu-big" if args.big_only else "gpu", payload)
    print(f"→ {path}")
    return payload


if __name__ == "__main__":
    os.environ.setdefault("CHORUS_PROGRESS", "off")
    main()
