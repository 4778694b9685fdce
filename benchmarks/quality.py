"""Learning quality of cached sparse targets against dense KD: the small-scale version of the table in
"Sparse Logit Sampling: Accelerating Knowledge Distillation in LLMs" (Anshumann et al., ACL 2025).

    python benchmarks/quality.py [--quick]    → tables on stdout, JSON in benchmarks/results/quality.json
                                                (--quick: benchmarks/results/quality_quick.json)

One teacher (a Llama trained here from scratch by `chorus train`, CE only, larger than the student and
trained for more steps) is cached once per target kind by `chorus cache`; then students of one size are
trained by `chorus train` on identical rows, steps and seeds, and evaluated on the held-out rows by
`chorus eval`:

  * CE only (no teacher),
  * dense KD: the teacher's FULL distribution, cached as top-k with k = V (every id present, tail 0), for
    which the sparse forward KL is exactly the dense KL. This stands in for online KD with the teacher in
    memory (same targets up to fp16 rounding of the log-probs, no teacher forward per step), which is
    why the vocabulary is small (V = 512): the k = V cache stays small.
  * top-k renormalized and top-k with the tail bucket, k ∈ {8, 64},
  * sampled targets (M draws per position, M chosen so that about 12 unique ids remain on average: the
    paper's operating point), and a second point with about 24 unique ids (still far below 64 B/token;
    added to show the bytes/quality trade-off of M, after the first full run had 12 ids close ~90 %),
  * top-64 with the tail bucket, values in the opt-in lossy q8 codec.

Every student of those rows uses pure forward KL (kd_weight = 1; the CE student kd_weight = 0), T = 1, no
calibration. Added rows, same loss, rows, steps and seeds:

  * softened KD at T = 2 (the teacher softened by T, the student by T, loss × T²): dense KD at T = 2 (the
    k = V cache: the full distribution softened exactly) is the reference of these rows, so their gap closed
    is (CE − x) / (CE − dense@T2): same softening, full distribution. Top-8 and top-64, tail bucket and
    renormalized, with the caches' per-position statistics (format v2: the tail curve A(β) makes the
    softened tail mass exact); and the tail-bucket modes once more under the even-tail guess. The even-tail
    rows read a "v1 view" of the same cache: the teacher's group copied to another name in the same store
    with only its manifest rewritten to format_version 1, tail_betas () (Store.write_teacher_manifest), so
    the arrays are byte-identical and only the reader's knowledge differs (a v1 reader loads no statistics
    and assumes the tail mass is spread evenly over the ids outside the top-k). Renormalized targets read
    no tail, so they have no even-tail variant.
  * calibrated temperatures: `chorus calibrate` fits a teacher temperature on the held-out rows of the
    top-64 cache and of its v1 view (and, for reference only, of the dense cache); students train on them
    with calibrated: true at T = 1; their gap is against dense KD at T = 1.

Goal of the added rows: each top-k mode's gap closed at T = 2 with the statistics within 3 points of its
gap closed at T = 1 (means over seeds), shown beside the even-tail numbers; the statistics (arrays ``stats``
and ``tail_logz``) cost ≤ 8 B/token.

"Gap closed" is (CE − x) / (CE − reference) on the mean held-out loss over domains, paired by seed (the
reference is dense KD at the row's temperature). Bytes/token
are the stored bytes of the arrays a mode reads (the sampled cache also holds a top-1, since k >= 1, which
is not counted) over rows × seq_len. Step time relative to CE is measured twice: (a) a timing pass that
interleaves the modes one step at a time on the same machine load (the number in the table), and (b) the
median tokens/s of each training run's own metrics.csv against the CE run of the same seed, back to back
(noisier when other processes share the cores; in the JSON and the last column).

Goal reported against (no setting is tuned per mode; the 24-id point is an added measurement, see
above): a cached mode at <= 64 B/token that closes >= 95 % of the CE → dense-KD gap with ECE within 0.5
points of dense KD (|ECE(mode) − ECE(dense)| <= 0.5, means over seeds).

Text: the demo corpus (Python's own sources, its language reference and the Unicode name table), with a
byte-level BPE of 512 ids trained on it.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from _common import table, write  # noqa: E402

from chorus.commands.report import describe  # noqa: E402
from chorus.config import CacheConfig, CalibrateConfig, EvalConfig, PrepareConfig, TrainConfig  # noqa: E402
from chorus.demo import corpus as _demo_corpus  # noqa: E402
from chorus.store import Store, decode_samples, decode_topk  # noqa: E402

# Sampled caches: mean unique ids per position that M is chosen for (12: the paper's operating point).
SAMPLE_POINTS = {"samples": 12.0, "samples24": 24.0}
GOAL = {"max_bytes_per_token": 64.0, "min_gap_closed": 0.95, "max_ece_points_from_dense": 0.5}
GOAL_T2 = {"max_gap_points_from_t1": 3.0, "max_stats_bytes_per_token": 8.0}
STATS_ARRAYS = ("stats", "tail_logz")  # per-position statistics of a format-v2 cache
V1_VIEWS = {"k8v1": "k8", "k64v1": "k64"}  # even-tail view → the cache it copies
CALIBRATE = ("k64", "k64v1", "dense")  # caches calibrated (dense: the reference fit, no student)


@dataclass(frozen=True)
class Scale:
    chars_per_domain: int
    tokens_per_domain: int
    vocab_size: int
    seq_len: int
    rows_per_shard: int
    teacher: dict
    student: dict
    teacher_steps: int
    student_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    seeds: tuple
    log_every: int
    timing_reps: int


def _llama(hidden: int, layers: int, heads: int, seq_len: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": seq_len,
            "tie_word_embeddings": True}


FULL = Scale(chars_per_domain=300_000, tokens_per_domain=100_000, vocab_size=512, seq_len=128, rows_per_shard=256,
             teacher=_llama(128, 4, 4, 128), student=_llama(48, 2, 4, 128), teacher_steps=500, student_steps=250,
             batch_size=16, lr=3e-3, warmup_steps=20, seeds=(1, 2), log_every=10, timing_reps=40)
QUICK = Scale(chars_per_domain=120_000, tokens_per_domain=30_000, vocab_size=512, seq_len=64, rows_per_shard=128,
              teacher=_llama(96, 3, 4, 64), student=_llama(48, 2, 4, 64), teacher_steps=200, student_steps=60,
              batch_size=16, lr=4e-3, warmup_steps=10, seeds=(1, 2), log_every=5, timing_reps=15)


@dataclass(frozen=True)
class Mode:
    key: str
    label: str
    cache: str | None  # which cache (below) it reads
    target: str | None
    temperature: float = 1.0  # KD temperature
    calibrated: bool = False  # apply the cache's fitted teacher temperature
    ref: str = "dense"  # the mode whose loss is 100 % of the gap (dense KD at the same temperature)


T2 = 2.0
MODES = (
    Mode("ce", "CE only", None, None),
    Mode("dense", "dense KD (full distribution cached, k=V)", "dense", "topk_tail"),
    Mode("renorm8", "top-8 renormalized", "k8", "topk_renorm"),
    Mode("tail8", "top-8 + tail bucket", "k8", "topk_tail"),
    Mode("renorm64", "top-64 renormalized", "k64", "topk_renorm"),
    Mode("tail64", "top-64 + tail bucket", "k64", "topk_tail"),
    Mode("samples", "samples (~12 unique ids)", "samples", "samples"),
    Mode("samples24", "samples (~24 unique ids)", "samples24", "samples"),
    Mode("q8tail64", "top-64 + tail bucket, q8 values", "k64q8", "topk_tail"),
    # softened KD at T = 2: gap closed against dense KD at T = 2
    Mode("dense_t2", "dense KD, T=2 (reference of the T=2 rows)", "dense", "topk_tail", T2, ref="dense_t2"),
    Mode("renorm8_t2", "top-8 renormalized, T=2", "k8", "topk_renorm", T2, ref="dense_t2"),
    Mode("tail8_t2", "top-8 + tail bucket, T=2, exact (statistics)", "k8", "topk_tail", T2, ref="dense_t2"),
    Mode("tail8_t2_even", "top-8 + tail bucket, T=2, even-tail (v1 view)", "k8v1", "topk_tail", T2, ref="dense_t2"),
    Mode("renorm64_t2", "top-64 renormalized, T=2", "k64", "topk_renorm", T2, ref="dense_t2"),
    Mode("tail64_t2", "top-64 + tail bucket, T=2, exact (statistics)", "k64", "topk_tail", T2, ref="dense_t2"),
    Mode("tail64_t2_even", "top-64 + tail bucket, T=2, even-tail (v1 view)", "k64v1", "topk_tail", T2, ref="dense_t2"),
    # calibrated teacher temperature, T = 1: gap closed against dense KD at T = 1
    Mode("tail64_cal", "top-64 + tail bucket, calibrated, exact (statistics)", "k64", "topk_tail", calibrated=True),
    Mode("tail64_cal_even", "top-64 + tail bucket, calibrated, even-tail (v1 view)", "k64v1", "topk_tail",
         calibrated=True),
)
BASE_MODES = tuple(md for md in MODES if md.temperature == 1.0 and not md.calibrated)  # the original rows (timed)
SIDE_BY_SIDE = ("renorm8", "tail8", "renorm64", "tail64")  # top-k modes: gap@T1 | @T2 exact | @T2 even-tail
TOPK_ARRAYS, SAMPLE_ARRAYS = ("topk_ids", "topk_logprobs"), ("sample_ids", "sample_counts")


class Clock:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.stages: dict[str, float] = {}

    def stage(self, name: str, text: str) -> None:
        el = int(time.perf_counter() - self.t0)
        print(f"[{el // 60:2d}:{el % 60:02d}] {text}", flush=True)
        self._open = (name, time.perf_counter())

    def done(self) -> None:
        name, t = self._open
        self.stages[name] = self.stages.get(name, 0.0) + time.perf_counter() - t


def _quiet(fn, *a, **kw):
    """Run a recipe with its stdout table (eval prints one) kept out of the benchmark's output."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **kw)


# ---------------------------------------------------------------------------------------------- cache statistics
def _train_positions(store: Store, shard: int) -> np.ndarray:
    """(rows, L) bool: positions of train rows that predict a real token (as the trainer selects them)."""
    c = store.read_shard("corpus", shard, ["segment_ids", "split"])
    real = c["segment_ids"] > 0
    ok = np.zeros_like(real)
    ok[:, :-1] = real[:, :-1] & real[:, 1:]
    return ok & (c["split"] == 0)[:, None]  # split 0 = train


def choose_samples(store: Store, dense: str, target: float, max_positions: int = 20_000) -> tuple[int, float]:
    """The M whose expected number of unique ids per position, Σ_i 1 − (1 − p_i)^M under the teacher's full
    (k = V) distribution, is closest to ``target``; and that expectation."""
    tm, probs = store.teacher_manifest(dense), []
    for shard in sorted(store.commits(f"teachers/{dense}")):
        ok = _train_positions(store, shard)
        _, logp = decode_topk(store.read_shard(f"teachers/{dense}", shard, TOPK_ARRAYS), tm)
        probs.append(np.exp(logp[ok].astype(np.float64)))
        if sum(len(p) for p in probs) >= max_positions:
            break
    p = np.concatenate(probs)[:max_positions]

    def expected(m: int) -> float:
        return float((1.0 - (1.0 - p) ** m).sum(-1).mean())

    lo, hi = 1, 255  # the smallest M (counts fit uint8) whose expectation reaches the target
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if expected(mid) < target else (lo, mid)
    best = min({max(lo - 1, 1), lo}, key=lambda m: abs(expected(m) - target))
    return best, expected(best)


def measured_unique(store: Store, name: str) -> dict:
    """Mean / quantiles of unique sampled ids per train position, counted in the cache itself."""
    tm, counts = store.teacher_manifest(name), []
    for shard in sorted(store.commits(f"teachers/{name}")):
        ok = _train_positions(store, shard)
        _, c = decode_samples(store.read_shard(f"teachers/{name}", shard, SAMPLE_ARRAYS), tm)
        counts.append((c > 0).sum(-1)[ok])
    u = np.concatenate(counts)
    return {"mean": float(u.mean()), "p10": float(np.quantile(u, 0.1)), "median": float(np.median(u)),
            "p90": float(np.quantile(u, 0.9)), "positions": int(len(u))}


def teacher_entropy(store: Store, dense: str, max_positions: int = 20_000) -> float:
    tm, ent, n = store.teacher_manifest(dense), 0.0, 0
    for shard in sorted(store.commits(f"teachers/{dense}")):
        ok = _train_positions(store, shard)
        _, logp = decode_topk(store.read_shard(f"teachers/{dense}", shard, TOPK_ARRAYS), tm)
        lp = logp[ok].astype(np.float64)
        ent += float(-(np.exp(lp) * lp).sum())
        n += len(lp)
        if n >= max_positions:
            break
    return ent / max(n, 1)


def v1_view(store_url: str, src: str, dst: str) -> None:
    """Teacher ``dst``: a copy of ``src``'s group (byte-identical arrays and commit records, the records' unit
    renamed) whose manifest says format_version 1, tail_betas (): a v1 reader of the same cache, which loads no
    statistics and softens with the even-tail guess."""
    from chorus.store.zarr_store import COMMITS

    teachers = Path(store_url) / "teachers"
    shutil.rmtree(teachers / dst, ignore_errors=True)
    shutil.copytree(teachers / src, teachers / dst)
    for rec in (teachers / dst / COMMITS).glob("*.json"):
        d = json.loads(rec.read_text())
        d["unit"] = f"teachers/{dst}"
        rec.write_text(json.dumps(d, sort_keys=True, indent=1))
    st = Store.open(store_url, "a")
    st.write_teacher_manifest(st.teacher_manifest(src).replace(name=dst, format_version=1, tail_betas=()))


# ---------------------------------------------------------------------------------------------- runs
def _tokens_per_s(run_dir: Path) -> float:
    with open(run_dir / "metrics.csv", newline="") as f:
        vals = [float(r["tokens_per_s"]) for r in csv.DictReader(f) if r.get("tokens_per_s")]
    return statistics.median(vals[1:] if len(vals) > 2 else vals)  # the first interval holds the loader's start


def _eval(store: str, model: str, out: Path, teachers: list[str]) -> dict:
    from chorus.commands import eval as evaluate

    res = _quiet(evaluate.run, EvalConfig(store=store, model=model, out=str(out), batch_size=32, teachers=teachers))
    return {"mean": res["mean"], "per_domain": res["per_domain"], "worst": res["worst"], "ece": res["ece"],
            "kl_to_teacher": res["teachers"][teachers[0]]["kl"] if teachers else None,
            "top1_agreement": res["teachers"][teachers[0]]["top1_agreement"] if teachers else None,
            "tokens": sum(res["tokens"].values())}


def time_steps(store: str, student_yaml: str, batch_size: int, reps: int,
               modes: tuple = BASE_MODES) -> dict[str, dict]:
    """Seconds per training step of every mode of ``modes`` (the T = 1, uncalibrated rows: softening adds
    no measurable cost next to them), interleaved one step at a time (CE, dense, top-8, …, CE, …) so
    that each mode sees the same machine load: a step is what `chorus train` does per micro-batch with
    grad_accum 1 (next batch, positions, target, chunked loss, backward, clip, AdamW step), built from the
    recipe's own components. The first round (shard decode, allocator warm-up) is not counted."""
    from chorus.distill.losses import get_loss
    from chorus.distill.targets import teacher_dist
    from chorus.student.data import CachedRows, positions
    from chorus.student.model import Student, load_student

    m = Store.open(store, "r").manifest
    vocab, loss_fn = m.tokenizer.vocab_size, get_loss("forward_kl")
    setups = {}
    for md in modes:
        student = Student(load_student(student_yaml, vocab_size=vocab, seq_len=m.seq_len, seed=0), vocab)
        data = CachedRows(store, batch_size=batch_size, teachers=[md.cache] if md.cache else [], split="train",
                          samples=md.target == "samples", topk=md.target != "samples", seed=0, rank=0, world_size=1)
        setups[md.key] = (student, torch.optim.AdamW(student.parameters(), lr=1e-4), iter(data))
    times: dict[str, list[float]] = {md.key: [] for md in modes}
    for rep in range(reps + 1):
        for md in modes:
            student, opt, batches = setups[md.key]
            t0 = time.perf_counter()
            batch = next(batches)
            pos = positions(batch)
            tgt = (teacher_dist(batch["teachers"][md.cache], pos.select, target=md.target, vocab_size=vocab)
                   if md.cache else None)
            loss, _ = student(batch["input_ids"], pos.attention_mask, pos.select, pos.gold, tgt, loss_fn=loss_fn,
                              kd_weight=1.0 if md.cache else 0.0, chunk_size=1024)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if rep:
                times[md.key].append(time.perf_counter() - t0)
    ce = statistics.median(times["ce"])
    return {k: {"median_s": statistics.median(v), "p25_s": float(np.quantile(v, 0.25)), "p75_s": float(np.quantile(v, 0.75)),
                "over_ce": statistics.median(v) / ce, "steps": len(v)} for k, v in times.items()}


def _spread(xs: list[float]) -> dict:
    return {"mean": statistics.fmean(xs), "min": min(xs), "max": max(xs), "per_seed": xs}


def _pm(s: dict, fmt: str = "{:.3f}", scale: float = 1.0) -> str:
    half = (s["max"] - s["min"]) / 2 * scale
    return f"{fmt.format(s['mean'] * scale)} ±{fmt.format(half)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller run (about 5 minutes on 2 CPU cores)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier when the cores are shared)")
    ap.add_argument("--work", help="working directory, kept (default: a temporary one, removed at the end)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    scale = QUICK if args.quick else FULL
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="chorus-bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    load_start = os.getloadavg()
    clock = Clock()
    print(f"quality benchmark ({'quick' if args.quick else 'full'}) in {work}; load average {load_start[0]:.1f} on "
          f"{os.cpu_count()} cores, torch threads {args.threads}", flush=True)
    try:
        result = _run(scale, work, clock, args)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    result.update({"load_average_at_start": list(load_start), "load_average_at_end": list(os.getloadavg()),
                   "wall_s": {**{k: round(v, 1) for k, v in clock.stages.items()},
                              "total": round(time.perf_counter() - clock.t0, 1)}})
    path = write("quality_quick" if args.quick else "quality", result)  # a quick run never replaces the full one
    print(f"wrote {path} ({result['wall_s']['total']:.0f} s)", flush=True)


def _run(scale: Scale, work: Path, clock: Clock, args) -> dict:
    from chorus.commands import cache, prepare, train

    # ---- corpus, tokenizer, store
    clock.stage("corpus", f"corpus + {scale.vocab_size}-id BPE tokenizer, prepare (seq_len {scale.seq_len})")
    corpus, tok = _demo_corpus.build(work / "corpus", chars_per_domain=scale.chars_per_domain,
                                     tokens_per_domain=scale.tokens_per_domain, vocab_size=scale.vocab_size)
    store_url = str(work / "store.zarr")
    m = _quiet(prepare.run, PrepareConfig(dataset=str(corpus), tokenizer=str(tok), out=store_url, seq_len=scale.seq_len,
                                          domain_field="domain", valid_fraction=0.1, rows_per_shard=scale.rows_per_shard,
                                          overwrite=True))
    clock.done()
    print(f"        {m.num_rows} rows ({m.split_rows}), {m.num_tokens:,} tokens, domains {', '.join(m.domains)}", flush=True)
    models = work / "models"
    models.mkdir(exist_ok=True)
    (models / "teacher.yaml").write_text(yaml.safe_dump(scale.teacher, sort_keys=False))
    (models / "student.yaml").write_text(yaml.safe_dump(scale.student, sort_keys=False))
    common = dict(store=store_url, batch_size=scale.batch_size, lr=scale.lr, warmup_steps=scale.warmup_steps,
                  eval_every=0, save_every=0, eval_rows=8, log_every=scale.log_every, calibrated=False, overwrite=True)

    # ---- teacher
    clock.stage("teacher", f"teacher: llama {scale.teacher['hidden_size']}x{scale.teacher['num_hidden_layers']}, "
                           f"CE, {scale.teacher_steps} steps")
    t_dir = work / "teacher"
    train.run(TrainConfig(student=str(models / "teacher.yaml"), out=str(t_dir), steps=scale.teacher_steps, seed=0, **common))
    teacher_eval = _eval(store_url, str(t_dir / "model"), work / "eval-teacher.json", [])
    clock.done()
    print(f"        teacher held-out loss {teacher_eval['mean']:.4f}, ECE {100 * teacher_eval['ece']:.2f}", flush=True)

    # ---- caches: dense first (it decides M for the sampled cache)
    st = Store.open(store_url, "r")
    caches = {"dense": dict(top_k=scale.vocab_size), "k8": dict(top_k=8), "k64": dict(top_k=64),
              "k64q8": dict(top_k=64, value_codec="q8")}
    cache_s: dict[str, float] = {}

    def make_cache(name: str, **kw) -> None:
        clock.stage("cache", f"cache '{name}': {kw}")
        t0 = time.perf_counter()
        _quiet(cache.run, CacheConfig(store=store_url, teacher=str(t_dir / "model"), name=name, tokenizer=str(tok),
                                      batch_size=64, seed=0, overwrite=True, **kw))
        cache_s[name] = time.perf_counter() - t0
        clock.done()

    make_cache("dense", **caches.pop("dense"))
    st = Store.open(store_url, "r")
    entropy = teacher_entropy(st, "dense")
    print(f"        teacher entropy {entropy:.2f} nats (train positions)", flush=True)
    sampling: dict[str, dict] = {}
    for name, target in SAMPLE_POINTS.items():
        m_draws, expected = choose_samples(st, "dense", target)
        sampling[name] = {"M": m_draws, "target_unique": target, "expected_unique": expected}
        print(f"        {name}: M = {m_draws} draws → {expected:.2f} unique ids expected", flush=True)
        caches[name] = dict(top_k=1, samples=m_draws)  # top_k >= 1 is required; training reads the samples only
    for name, kw in caches.items():
        make_cache(name, **kw)
    st = Store.open(store_url, "r")
    for name, sp in sampling.items():
        sp["measured_unique"] = u = measured_unique(st, name)
        print(f"        {name}: measured unique sampled ids per position: mean {u['mean']:.2f} (p10 {u['p10']:.0f}, "
              f"p90 {u['p90']:.0f})", flush=True)

    # ---- v1 views (same arrays, manifest format_version 1) and calibrated temperatures
    clock.stage("cache", f"v1 views (even-tail readers of the same arrays): {', '.join(f'{v} = {s}' for v, s in V1_VIEWS.items())}")
    for view, src in V1_VIEWS.items():
        v1_view(store_url, src, view)
    clock.done()
    from chorus.commands import calibrate

    calibration: dict[str, dict] = {}
    for name in CALIBRATE:
        clock.stage("calibrate", f"chorus calibrate '{name}' (held-out rows)")
        calibration[name] = _quiet(calibrate.run, CalibrateConfig(store=store_url, teacher=name))
        clock.done()
        c = calibration[name]
        print(f"        T = {c['temperature']:.4f}  NLL {c['nll_before']:.4f} → {c['nll_after']:.4f}  "
              f"ECE {100 * c['ece_before']:.2f} → {100 * c['ece_after']:.2f} pts ({c['tokens']:,} tokens)", flush=True)
    st = Store.open(store_url, "r")
    info = describe(st)["teachers"]
    has_stats = {name: bool(st.teacher_manifest(name).tail_betas) for name in info}
    tail_betas = list(st.teacher_manifest("k64").tail_betas)

    def bytes_of(mode: Mode) -> float | None:
        if mode.cache is None:
            return None
        arrays = SAMPLE_ARRAYS if mode.target == "samples" else TOPK_ARRAYS
        return sum(info[mode.cache]["bytes_per_token"][a] for a in arrays)

    def stats_bytes(cache_name: str, topk: bool = True) -> float:
        """Stored bytes/token of the statistics a top-k (or sampled) reader loads from this cache."""
        arrays = STATS_ARRAYS if topk else STATS_ARRAYS[:1]
        return sum(info[cache_name]["bytes_per_token"].get(a, 0.0) for a in arrays) if has_stats[cache_name] else 0.0

    def stats_of(mode: Mode) -> float | None:
        """Statistics bytes/token a mode's target uses: top-k + tail bucket from a v2 cache (exact softening)."""
        if mode.cache is None or mode.target != "topk_tail" or not has_stats[mode.cache]:
            return None
        return stats_bytes(mode.cache)

    # ---- students: every mode of a seed back to back (so the step-time ratios share the machine's load)
    runs: dict[str, dict[int, dict]] = {md.key: {} for md in MODES}
    for seed in scale.seeds:
        for md in MODES:
            clock.stage("students", f"student seed {seed}: {md.label}")
            out = work / "students" / f"{md.key}-s{seed}"
            kd = dict(teachers=[md.cache], target=md.target, kd_weight=1.0) if md.cache else dict(kd_weight=0.0)
            t0 = time.perf_counter()
            train.run(TrainConfig(student=str(models / "student.yaml"), out=str(out), steps=scale.student_steps,
                                  seed=seed, **kd, **{**common, "calibrated": md.calibrated,
                                                      "temperature": md.temperature}))
            wall = time.perf_counter() - t0
            ev = _eval(store_url, str(out / "model"), work / f"eval-{md.key}-s{seed}.json", ["dense"])
            clock.done()
            runs[md.key][seed] = {**ev, "tokens_per_s": _tokens_per_s(out), "train_wall_s": wall}
            print(f"        loss {ev['mean']:.4f}  ECE {100 * ev['ece']:.2f}  KL(teacher||student) {ev['kl_to_teacher']:.4f}  "
                  f"{runs[md.key][seed]['tokens_per_s']:.0f} tok/s", flush=True)

    # ---- step time, interleaved step by step across modes
    clock.stage("timing", f"step time of every T = 1 mode, interleaved ({scale.timing_reps} rounds)")
    timing = time_steps(store_url, str(models / "student.yaml"), scale.batch_size, scale.timing_reps)
    clock.done()

    # ---- table
    seeds = list(scale.seeds)

    def gap_of(key: str, ref: str) -> dict:
        return _spread([(runs["ce"][s]["mean"] - runs[key][s]["mean"]) / (runs["ce"][s]["mean"] - runs[ref][s]["mean"])
                        for s in seeds])

    rows, table_rows = [], []
    by_key: dict[str, dict] = {}
    for md in MODES:
        r = runs[md.key]
        loss = _spread([r[s]["mean"] for s in seeds])
        ece = _spread([r[s]["ece"] for s in seeds])
        gap = gap_of(md.key, md.ref)
        step_runs = _spread([runs["ce"][s]["tokens_per_s"] / r[s]["tokens_per_s"] for s in seeds])
        kl = _spread([r[s]["kl_to_teacher"] for s in seeds])
        bpt, sbt = bytes_of(md), stats_of(md)
        fitted = calibration[md.cache]["temperature"] if md.calibrated else None
        settings = None
        if md.cache:
            src = V1_VIEWS.get(md.cache, md.cache)
            settings = {"top_k": scale.vocab_size} if src == "dense" else dict(caches.get(src, {}))
            if md.cache in V1_VIEWS:
                settings["view"] = f"v1 view of '{src}' (even-tail reader)"
        row = {"mode": md.key, "label": md.label, "cache": md.cache, "target": md.target,
               "temperature": md.temperature, "calibrated": md.calibrated, "teacher_temperature": fitted,
               "reference": md.ref, "cache_settings": settings,
               "heldout_loss": loss, "gap_closed": gap, "ece": ece, "kl_to_teacher": kl, "bytes_per_token": bpt,
               "stats_bytes_per_token": sbt,
               "step_time_over_ce": timing[md.key]["over_ce"] if md.key in timing else None,
               "step_time": timing.get(md.key),
               "step_time_over_ce_from_runs": step_runs, "per_seed": {str(s): r[s] for s in seeds}}
        if md.ref != "dense":
            row["gap_closed_vs_dense_t1"] = gap_of(md.key, "dense")
        rows.append(row)
        by_key[md.key] = row
        label = md.label
        if md.cache in sampling:
            label = f"samples (M={sampling[md.cache]['M']}, {sampling[md.cache]['measured_unique']['mean']:.1f} unique)"
        if fitted is not None:
            label = f"{label}, T_t={fitted:.3f}"
        gap_cell = ("0% (ref)" if md.key == "ce" else "100% (ref, T=2)" if md.key == md.ref != "dense"
                    else _pm(gap, "{:.1%}"))
        table_rows.append([label,
                           _pm(loss, "{:.4f}"), gap_cell,
                           _pm(ece, "{:.2f}", 100), _pm(kl, "{:.4f}"),
                           "-" if bpt is None else f"{bpt:.1f}", "-" if sbt is None else f"{sbt:.2f}",
                           f"{timing[md.key]['over_ce']:.2f}" if md.key in timing else "-",
                           _pm(step_runs, "{:.2f}")])
    headers = ["student", "held-out loss", "gap closed", "ECE (pts)", "KL(t||s)", "B/token", "+stats B/token",
               "step / CE", "step / CE (runs)"]
    print()
    print(f"teacher (llama {scale.teacher['hidden_size']}x{scale.teacher['num_hidden_layers']}, {scale.teacher_steps} steps): "
          f"held-out loss {teacher_eval['mean']:.4f}, ECE {100 * teacher_eval['ece']:.2f} pts")
    print(table(headers, table_rows))
    print(f"mean ± half-range over seeds {seeds}; gap closed = (CE − x)/(CE − dense), paired by seed, with dense KD at "
          f"the row's temperature (T=2 rows: dense KD at T=2); ECE in points "
          f"(%); KL(t||s): forward KL from the teacher's full distribution (T=1); B/token: stored bytes of the top-k / "
          f"sample arrays the mode reads / (rows × seq_len); +stats: bytes of the statistics (stats + tail_logz) the "
          f"exact tail-bucket target uses on top; T_t: the calibrated teacher temperature; step / CE: median step "
          f"time, T=1 modes interleaved step by step ({scale.timing_reps} steps each); (runs): median tokens/s of the "
          f"training runs themselves, back to back")
    d1, d2 = by_key["dense"], by_key["dense_t2"]
    print(f"dense KD at T=2: held-out loss {d2['heldout_loss']['mean']:.4f} vs {d1['heldout_loss']['mean']:.4f} at T=1 "
          f"({d2['gap_closed_vs_dense_t1']['mean']:.1%} of the T=1 gap)")

    # ---- goal (the original rows: T = 1, no calibration)
    dense = by_key["dense"]
    checks = []
    for r in rows:
        if r["mode"] in ("ce", "dense") or r["mode"] not in {md.key for md in BASE_MODES}:
            continue
        ece_above = 100 * (r["ece"]["mean"] - dense["ece"]["mean"])
        ok = {"bytes": r["bytes_per_token"] <= GOAL["max_bytes_per_token"],
              "gap": r["gap_closed"]["mean"] >= GOAL["min_gap_closed"],
              "ece": abs(ece_above) <= GOAL["max_ece_points_from_dense"]}
        checks.append({"mode": r["mode"], "bytes_per_token": r["bytes_per_token"], "gap_closed": r["gap_closed"]["mean"],
                       "gap_closed_min_seed": r["gap_closed"]["min"], "ece_points_minus_dense": ece_above,
                       "passes": ok, "meets": all(ok.values())})
    meeting = [c["mode"] for c in checks if c["meets"]]
    goal = {**GOAL, "ece_rule": "|ECE(mode) − ECE(dense)| ≤ 0.5 points (means over seeds)",
            "gap_rule": "mean over seeds of the per-seed (CE − x)/(CE − dense) ≥ 0.95",
            "met": bool(meeting), "modes_meeting": meeting, "checks": checks}
    for c in checks:
        print(f"goal {c['mode']:<9} {'MEETS' if c['meets'] else 'misses'}: {c['bytes_per_token']:.1f} B/token, "
              f"gap closed {c['gap_closed']:.1%} (worst seed {c['gap_closed_min_seed']:.1%}), "
              f"ECE {c['ece_points_minus_dense']:+.2f} pts vs dense")
    print("goal (≤ 64 B/token, ≥ 95% of the gap, ECE within 0.5 pts of dense): "
          + (f"met by {', '.join(meeting)}" if meeting else "NOT met by any cached mode"), flush=True)

    # ---- T = 2 side by side: gap@T1 | gap@T2 exact | gap@T2 even-tail, and the statistics' bytes
    stats_caches = {n: {"stats": info[n]["bytes_per_token"].get("stats", 0.0),
                        "tail_logz": info[n]["bytes_per_token"].get("tail_logz", 0.0),
                        "total_topk_reader": stats_bytes(n), "total_samples_reader": stats_bytes(n, topk=False)}
                    for n in info if has_stats[n]}
    stats_max = max(c["total_topk_reader"] for n, c in stats_caches.items() if n not in sampling)
    t2_checks, t2_rows = [], []
    for key in SIDE_BY_SIDE:
        t1, ex, ev = by_key[key], by_key[f"{key}_t2"], by_key.get(f"{key}_t2_even")
        delta = 100 * (ex["gap_closed"]["mean"] - t1["gap_closed"]["mean"])
        delta_even = None if ev is None else 100 * (ev["gap_closed"]["mean"] - t1["gap_closed"]["mean"])
        meets = abs(delta) <= GOAL_T2["max_gap_points_from_t1"]
        t2_checks.append({"mode": key, "gap_t1": t1["gap_closed"], "gap_t2_exact": ex["gap_closed"],
                          "gap_t2_even_tail": None if ev is None else ev["gap_closed"],
                          "points_t2_exact_minus_t1": delta, "points_t2_even_minus_t1": delta_even,
                          "bytes_per_token": t1["bytes_per_token"],
                          "stats_bytes_per_token": stats_bytes(t1["cache"]) if t1["target"] == "topk_tail" else None,
                          "meets": meets})
        t2_rows.append([t1["label"], f"{t1['bytes_per_token']:.1f}", _pm(t1["gap_closed"], "{:.1%}"),
                        _pm(ex["gap_closed"], "{:.1%}"),
                        "n/a (reads no tail)" if ev is None else _pm(ev["gap_closed"], "{:.1%}"),
                        f"{delta:+.1f}", "-" if delta_even is None else f"{delta_even:+.1f}",
                        "yes" if meets else "no"])
    t2_headers = ["top-k mode", "B/token", "gap@T1", "gap@T2 exact", "gap@T2 even-tail", "T2 exact − T1 (pts)",
                  "T2 even − T1 (pts)", "within 3 pts"]
    t2_met = all(c["meets"] for c in t2_checks) and stats_max <= GOAL_T2["max_stats_bytes_per_token"]
    goal_t2 = {**GOAL_T2, "rule": "|gap@T2 (statistics) − gap@T1| ≤ 3 points for every top-k mode (means over "
                                  "seeds; gap@T2 against dense KD at T=2), statistics ≤ 8 B/token",
               "stats_bytes_per_token_max": stats_max, "met": t2_met, "checks": t2_checks}
    print()
    print(table(t2_headers, t2_rows))
    print("statistics B/token (stats + tail_logz, as a top-k reader loads them): "
          + ", ".join(f"{n} {c['stats']:.2f} + {c['tail_logz']:.2f} = {c['total_topk_reader']:.2f}"
                      for n, c in stats_caches.items() if n not in sampling)
          + f"; tail_betas {tail_betas}")
    print(f"goal at T=2 (each top-k mode within 3 pts of its T=1 gap with statistics, ≤ 8 B/token of statistics): "
          f"{'MET' if t2_met else 'NOT met'} (statistics max {stats_max:.2f} B/token; "
          f"{', '.join(c['mode'] for c in t2_checks if not c['meets']) or 'every mode within 3 pts'}"
          + ("" if all(c["meets"] for c in t2_checks) else " outside") + ")", flush=True)

    # ---- calibrated rows
    cal_rows = []
    for name, key in (("k64", "tail64_cal"), ("k64v1", "tail64_cal_even"), ("dense", None)):
        c = calibration[name]
        r = by_key.get(key)
        cal_rows.append([f"{name}{' (v1 view, even-tail)' if name in V1_VIEWS else ' (exact)' if name == 'k64' else ' (reference fit)'}",
                         f"{c['temperature']:.4f}", f"{c['nll_before']:.4f} → {c['nll_after']:.4f}",
                         f"{100 * c['ece_before']:.2f} → {100 * c['ece_after']:.2f}",
                         "-" if r is None else _pm(r["gap_closed"], "{:.1%}"),
                         "-" if r is None else _pm(by_key["tail64"]["gap_closed"], "{:.1%}")])
    cal_headers = ["calibrated cache", "fitted T", "teacher NLL", "teacher ECE (pts)", "gap@T1 calibrated",
                   "gap@T1 uncalibrated"]
    print()
    print(table(cal_headers, cal_rows))
    print("fitted on the held-out rows by `chorus calibrate`; students: top-64 + tail bucket, T=1, calibrated: true; "
          "gap against dense KD at T=1 (uncalibrated)", flush=True)

    return {
        "quick": args.quick, "threads": args.threads, "device": "cpu" if not torch.cuda.is_available() else "cuda",
        "setup": {**dataclasses.asdict(scale), "rows": m.num_rows, "split_rows": m.split_rows, "tokens": m.num_tokens,
                  "loss": "forward_kl", "kd_weight": 1.0, "temperature": 1.0, "calibrated": False,
                  "t2_temperature": T2, "tail_betas": tail_betas,
                  "teacher_params": _params(t_dir), "student_params": _params(work / "students" / f"ce-s{seeds[0]}")},
        "teacher": {"heldout": teacher_eval, "entropy_nats": entropy},
        "samples": sampling,
        "caches": {n: {"settings": s, "bytes_per_token": info[n]["bytes_per_token"],
                       "total_bytes_per_token": info[n]["total_bytes_per_token"], "cache_wall_s": cache_s[n]}
                   for n, s in {"dense": {"top_k": scale.vocab_size}, **caches}.items()},
        "v1_views": dict(V1_VIEWS),
        "stats_bytes_per_token": stats_caches,
        "calibration": calibration,
        "rows": rows, "headers": headers, "table": table_rows, "goal": goal,
        "t2": {"headers": t2_headers, "table": t2_rows, "goal": goal_t2},
        "calibrated": {"headers": cal_headers, "table": cal_rows},
    }

def _params(run_dir: Path) -> int:
    from transformers import AutoModelForCausalLM

    return sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(str(run_dir / "model")).parameters())


if __name__ == "__main__":
    main()
