"""Many-teacher ablation: which blend makes the best student.

    python benchmarks/ensemble.py [--quick] [--seeds 0,1]  → table on stdout, JSON in benchmarks/results/ensemble.json

The demo's store and teachers (a model family: one base trained on every domain, fine-tuned into one
specialist per domain; `chorus demo` builds them and this script reuses its output) are distilled into
students of the demo's size, steps and rows, one per cell of

    operator  (mixture / geometric / power α = 0.5)
  × weighting (uniform / fitted per-domain / confidence / agreement / likelihood / context; per-token ones
               on a uniform prior, β = 1, or the blend's fitted β for its own weighting, context β = 0.1)
  × softening (none / fitted: each teacher's calibrated temperature),

plus the demo's default (the log pool on the blend `chorus blend` fitted and stored: per-domain weights and
temperatures) and two references: the CE-only student (0 %) and an "oracle router"
student whose every row is distilled only from its own domain's specialist (100 %). Gap closed =
(CE − x) / (CE − oracle) on the mean held-out loss, per seed, reported as mean ± half-range.
Seeds can run side by side: `--seeds 0` and `--seeds 1` with one `--work` in two processes, then
`--seeds 0,1` gathers their finished cells into the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402
from _common import table, write  # noqa: E402

from chorus import demo  # noqa: E402
from chorus.commands import eval as evaluate  # noqa: E402
from chorus.commands import train  # noqa: E402
from chorus.commands.blend import stored_blend  # noqa: E402
from chorus.config import DemoConfig, EvalConfig, TrainConfig  # noqa: E402
from chorus.store import Store  # noqa: E402

OPERATORS = ("mixture", "geometric", "power")
WEIGHTINGS = ("uniform", "fitted", "confidence", "agreement", "likelihood", "context")
SOFTENING = ("none", "fitted")


def _cells(domains: list[str], blend: dict) -> dict[str, dict]:
    """Every student but CE: name → TrainConfig overrides."""
    cells = {}
    for op in OPERATORS:
        for w in WEIGHTINGS:
            for soft in SOFTENING:
                kw = {"aggregate": op, "alpha": 0.5, "calibrated": soft == "fitted", "blend": False,
                      "weighting": w if w not in ("uniform", "fitted") else "none",
                      "beta": blend["beta"] if w == blend["weighting"] else 0.1 if w == "context" else 1.0}
                if w == "fitted":
                    kw["domain_weights"] = blend["domain_weights"]
                cells[f"{op}/{w}/{soft}"] = kw
    cells["demo default (stored blend, log pool)"] = {"blend": True, "calibrated": True, "aggregate": demo.FULL.aggregate}
    cells["oracle router"] = {"blend": False, "calibrated": False,
                              "domain_weights": {d: {t: float(t == d) for t in domains} for d in domains}}
    return cells


def _student(scale: demo.Scale, store: str, student_yaml: str, out: Path, seed: int, teachers: list[str], **kw) -> dict:
    cfg = TrainConfig(store=store, student=student_yaml, out=str(out), steps=scale.student_steps,
                      batch_size=scale.batch_size, lr=scale.lr, warmup_steps=scale.warmup_steps, seed=seed,
                      eval_every=0, save_every=0, eval_rows=demo.TRAIN_EVAL_ROWS, teachers=teachers,
                      kd_weight=scale.kd_weight if teachers else 0.0, train_rows=scale.student_rows,
                      overwrite=True, **kw)
    train.run(cfg)
    res = evaluate.run(EvalConfig(store=store, model=str(out / "model"), teachers=[], batch_size=32))
    return {"mean": res["mean"], "worst": res["worst"], "ece": res["ece"], "per_domain": res["per_domain"]}


def _pm(xs: list[float], fmt: str = "{:.4f}") -> str:
    return fmt.format(statistics.mean(xs)) + (f" ±{fmt.format((max(xs) - min(xs)) / 2)}" if len(xs) > 1 else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the quick demo's scale (default: also quick; full is long)")
    ap.add_argument("--full", action="store_true", help="the full demo's scale")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--work", default=None, help="working directory (default: a folder under /tmp)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    scale = demo.FULL if args.full else demo.QUICK
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work or f"/tmp/chorus-ensemble-{'full' if args.full else 'quick'}")
    t0 = time.perf_counter()
    results: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        out = work / f"seed{seed}"
        demo.run(DemoConfig(out=str(out), quick=not args.full, seed=seed))  # store, teachers, blend (reused if there)
        store = str(out / "store.zarr")
        domains = list(Store.open(store, "r").manifest.domains)
        blend = stored_blend(Store.open(store, "r"), domains)
        student_yaml = str(out / "models" / "student.yaml")
        runs = {"CE only": {}, **_cells(domains, blend)}
        # a seed's finished cells are kept in its folder: seeds can run in separate processes side by side
        # (--seeds 0 and --seeds 1 with one --work), and a last run over every seed only gathers them
        done_path = out / "ensemble-cells.json"
        done = json.loads(done_path.read_text()) if done_path.is_file() else {}
        for name, kw in runs.items():
            teachers = [] if name == "CE only" else domains
            slug = name.replace("/", "-").replace(" ", "_").replace("(", "").replace(")", "")
            if name not in done:
                print(f"[seed {seed}] {name} …", flush=True)
                done[name] = _student(scale, store, student_yaml, work / "runs" / f"{slug}-{seed}", seed, teachers, **kw)
                done_path.write_text(json.dumps(done))
            results.setdefault(name, {})[seed] = done[name]
    rows, payload = [], {}
    for name, by_seed in results.items():
        gaps = [(results["CE only"][s]["mean"] - r["mean"]) / (results["CE only"][s]["mean"] - results["oracle router"][s]["mean"])
                for s, r in by_seed.items()]
        means, worsts, eces = ([r[k] for r in by_seed.values()] for k in ("mean", "worst", "ece"))
        payload[name] = {"seeds": by_seed, "gap_closed": gaps}
        rows.append([name, _pm(means), _pm(worsts), _pm([100 * e for e in eces], "{:.2f}"),
                     "ref 0%" if name == "CE only" else "ref 100%" if name == "oracle router"
                     else _pm([100 * g for g in gaps], "{:.1f}") + "%"])
    cells = [n for n in results if "/" in n]
    best = min(cells, key=lambda n: statistics.mean(r["mean"] for r in results[n].values()))
    print(table(["student", "mean loss", "worst loss", "ECE (pts)", "gap closed"], rows))
    print(f"best cell by mean loss: {best}")
    path = write("ensemble", {"quick": not args.full, "seeds": seeds, "scale": dataclasses.asdict(scale),
                              "results": payload, "best_cell": best, "wall_s": time.perf_counter() - t0})
    print(f"results → {path}")


if __name__ == "__main__":
    main()
