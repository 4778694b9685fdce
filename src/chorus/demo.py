"""`chorus demo`: the whole pipeline on text shipped with Python, ending in the claim put to the test.

setup (corpus + tokenizer, `prepare`) → three specialist teachers (`train`, CE only, each on the
rows of one domain) → `cache` and `calibrate` each → five students with the same size, steps, rows and seed
(CE only; KD from each single teacher; KD from the calibrated mixture of all three) → `eval`
everything on held-out rows → one table, ``results.json`` and ``results.png``.

Why the ensemble should win at its worst: a student distilled from one specialist inherits that
teacher's blind domains (on them it learns the teacher's poor guesses), while the mixture always
holds one teacher that knows the domain, so the student is never taught by only a blind one.

Every stage calls the command's own recipe (``run(cfg)``) with a config built here, so the demo runs
the same code a user runs. A stage that already finished in ``--out`` with the same settings is
skipped (a record per stage under ``OUT/.demo``), so rerunning the demo reuses its store and teachers.
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import yaml

from chorus import _demo_corpus
from chorus._progress import say
from chorus.config import CacheConfig, CalibrateConfig, DemoConfig, EvalConfig, PrepareConfig, TrainConfig
from chorus.errors import ChorusError
from chorus.storage import fingerprint

DOMAINS = _demo_corpus.DOMAINS
N_STAGES = 7
TRAIN_EVAL_ROWS = 64  # the recipe's own end-of-run check; the report evaluates every held-out row


@dataclass(frozen=True)
class Scale:
    """Every size of the demo. The full and quick runs differ only here."""

    chars_per_domain: int  # raw text read per domain
    tokens_per_domain: int  # cap after balancing (every domain gets the smallest domain's count)
    vocab_size: int
    seq_len: int
    valid_fraction: float
    teacher: dict  # model config (llama), trained from scratch
    student: dict  # the same for every student
    teacher_steps: int
    student_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    top_k: int
    samples: int
    cache_batch: int = 64  # rows per teacher forward pass when caching


def _llama(hidden: int, layers: int, heads: int, seq_len: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": seq_len,
            "tie_word_embeddings": True}


FULL = Scale(chars_per_domain=400_000, tokens_per_domain=100_000, vocab_size=2048, seq_len=128, valid_fraction=0.1,
             teacher=_llama(64, 2, 4, 128), student=_llama(48, 2, 4, 128), teacher_steps=300, student_steps=300,
             batch_size=16, lr=3e-3, warmup_steps=20, top_k=32, samples=8)
QUICK = Scale(chars_per_domain=180_000, tokens_per_domain=45_000, vocab_size=1024, seq_len=64, valid_fraction=0.1,
              teacher=_llama(64, 2, 4, 64), student=_llama(48, 2, 4, 64), teacher_steps=160, student_steps=80,
              batch_size=16, lr=5e-3, warmup_steps=10, top_k=16, samples=8)


# ---------------------------------------------------------------------------------------------- stage records
class _Stages:
    """One record per finished stage under ``OUT/.demo``: the fingerprint of everything the stage's
    output depends on (its settings and the records of the stages it read). Same fingerprint → skip."""

    def __init__(self, out: Path) -> None:
        self.dir = out / ".demo"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    def announce(self, i: int, text: str) -> None:
        """The line a user follows: stage number, time since the start, what runs now."""
        elapsed = int(time.perf_counter() - self.t0)
        say(f"[{i}/{N_STAGES}] {elapsed // 60}:{elapsed % 60:02d} {text} …")

    def key(self, name: str, *parts: Any) -> str:
        return fingerprint("demo-stage", name, *parts)

    def done(self, name: str, key: str) -> bool:
        p = self.dir / f"{name}.json"
        return p.is_file() and json.loads(p.read_text()).get("key") == key

    def started(self, name: str, key: str) -> bool:
        p = self.dir / f"{name}.started.json"
        return p.is_file() and json.loads(p.read_text()).get("key") == key

    def start(self, name: str, key: str) -> None:
        (self.dir / f"{name}.json").unlink(missing_ok=True)
        (self.dir / f"{name}.started.json").write_text(json.dumps({"key": key}))

    def finish(self, name: str, key: str) -> None:
        (self.dir / f"{name}.json").write_text(json.dumps({"key": key}))
        (self.dir / f"{name}.started.json").unlink(missing_ok=True)


def _cfg_key(cfg: Any) -> dict:
    """A config as the settings that decide a stage's output (paths and run-control flags left out)."""
    skip = {"out", "overwrite", "resume", "storage_options", "device", "num_workers", "log_every"}
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip}


# ---------------------------------------------------------------------------------------------- stages
def _once(stages: _Stages, name: str, key: str, *, present: Callable[[], bool], work: Callable[[bool], Any],
          reused: str) -> None:
    """Run ``work`` unless this stage finished with the same ``key`` and its output is still there.
    ``work(resume)``: ``resume`` is true when an earlier try with the same key was interrupted."""
    if stages.done(name, key) and present():
        say(f"      reusing {reused} (finished earlier with these settings)")
        return
    resume = stages.started(name, key)
    stages.start(name, key)
    work(resume)
    stages.finish(name, key)


def _train(stages: _Stages, name: str, cfg: TrainConfig, upstream: list[str]) -> str:
    from chorus.trainer import train

    key = stages.key(name, _cfg_key(cfg), upstream)
    # An interrupted run of the same settings resumes from its last checkpoint; anything else starts over.
    _once(stages, name, key, present=lambda: (Path(cfg.out) / "model" / "chorus.json").is_file(),
          work=lambda resume: train.run(dataclasses.replace(cfg, resume=resume, overwrite=not resume)), reused=cfg.out)
    return key


def _calibrated(store: str, name: str) -> bool:
    from chorus.storage import Store

    st = Store.open(store, "r")
    return name in st.teacher_names() and bool(st.teacher_manifest(name).calibration)


def _cache(stages: _Stages, cfg: CacheConfig, upstream: str) -> str:
    from chorus.pipeline import cache
    from chorus.storage import Store
    from chorus.trainer.data import complete_teachers

    key = stages.key(f"cache-{cfg.name}", _cfg_key(cfg), upstream)
    # An interrupted cache of the same settings keeps its committed shards; anything else is replaced.
    _once(stages, f"cache-{cfg.name}", key, present=lambda: cfg.name in complete_teachers(Store.open(cfg.store, "r")),
          work=lambda resume: cache.run(dataclasses.replace(cfg, overwrite=not resume)),
          reused=f"the cache of teacher {cfg.name}")
    return key


def _calibrate(stages: _Stages, cfg: CalibrateConfig, upstream: str) -> str:
    from chorus.trainer import calibrate

    key = stages.key(f"calibrate-{cfg.teacher}", _cfg_key(cfg), upstream)
    _once(stages, f"calibrate-{cfg.teacher}", key, present=lambda: _calibrated(cfg.store, cfg.teacher),
          work=lambda resume: calibrate.run(cfg), reused=f"the temperature of teacher {cfg.teacher}")
    return key


def _evaluate(stages: _Stages, name: str, cfg: EvalConfig, upstream: str) -> dict:
    from chorus.trainer import evaluate

    key = stages.key(f"eval-{name}", _cfg_key(cfg), upstream)
    _once(stages, f"eval-{name}", key, present=lambda: Path(cfg.out).is_file(), work=lambda resume: evaluate.run(cfg),
          reused=f"the metrics of {name}")
    return json.loads(Path(cfg.out).read_text())


# ---------------------------------------------------------------------------------------------- report
def _row(name: str, kind: str, metrics: dict) -> dict:
    per_domain = {}
    for d, v in metrics["per_domain"].items():
        per_domain[d] = float(v["loss"] if isinstance(v, dict) else v)
    worst_domain = max(per_domain, key=per_domain.get)
    return {"name": name, "kind": kind, "per_domain": per_domain, "mean": float(metrics["mean"]),
            "worst": per_domain[worst_domain], "worst_domain": worst_domain, "ece": float(metrics["ece"])}


def format_table(rows: list[dict], domains: list[str]) -> str:
    cols = [*domains, "mean", "worst", "ECE"]
    width = max(len(r["name"]) for r in rows) + 2
    lines = [f"{'model':<{width}}{'kind':<9}" + "".join(f"{c:>9}" for c in cols),
             "-" * (width + 9 + 9 * len(cols))]
    for r in rows:
        vals = [r["per_domain"][d] for d in domains] + [r["mean"], r["worst"], r["ece"]]
        lines.append(f"{r['name']:<{width}}{r['kind']:<9}" + "".join(f"{v:>9.3f}" for v in vals))
    return "\n".join(lines)


def claim(rows: list[dict]) -> tuple[bool, str]:
    """The ensemble student's worst-domain loss against every single-teacher student's."""
    by_name = {r["name"]: r for r in rows}
    ens = by_name["student-ensemble"]["worst"]
    singles = {r["name"]: r["worst"] for r in rows if r["name"].startswith("student-kd-")}
    holds = all(ens < w for w in singles.values())
    detail = ", ".join(f"{n.removeprefix('student-kd-')} {w:.3f}" for n, w in singles.items())
    verb = "beats" if holds else "does NOT beat"
    return holds, f"ensemble student's worst-domain loss {ens:.3f} {verb} every single-teacher student's ({detail})"


def plot(rows: list[dict], domains: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    x = np.arange(len(rows))
    width = 0.8 / len(domains)
    fig, ax = plt.subplots(figsize=(max(8.0, 1.2 * len(rows)), 4.8), dpi=120)
    for j, d in enumerate(domains):
        vals = [r["per_domain"][d] for r in rows]
        worst = [max(r["per_domain"], key=r["per_domain"].get) == d for r in rows]
        ax.bar(x + (j - (len(domains) - 1) / 2) * width, vals, width, label=d, color=f"C{j}",
               edgecolor=["black" if w else "none" for w in worst], linewidth=1.5)
    ens = next((r for r in rows if r["name"] == "student-ensemble"), None)
    if ens is not None:
        ax.axhline(ens["worst"], color="black", linestyle="--", linewidth=1)
    n_teachers = sum(r["kind"] == "teacher" for r in rows)
    ax.axvline(n_teachers - 0.5, color="grey", linewidth=1)
    top = max(max(r["per_domain"].values()) for r in rows)
    ax.text(n_teachers / 2 - 0.5, top * 1.04, "teachers", ha="center", color="grey")
    ax.text((n_teachers + len(rows)) / 2 - 0.5, top * 1.04, "students (same size, steps, rows)", ha="center", color="grey")
    ax.set_ylim(0, top * 1.12)
    ax.set_xticks(x, [r["name"] for r in rows], rotation=20, ha="right")
    for label in ax.get_xticklabels():
        if label.get_text() == "student-ensemble":
            label.set_fontweight("bold")
    ax.set_ylabel("held-out loss (nats/token, lower is better)")
    ax.set_title("chorus demo: per-domain held-out loss (outlined: each model's worst domain)")
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    handles = [Patch(color=f"C{j}", label=d) for j, d in enumerate(domains)]
    handles.append(Line2D([], [], color="black", linestyle="--", linewidth=1, label="ensemble student's worst"))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- recipe
def run(cfg: DemoConfig) -> dict:
    import torch

    if cfg.threads < 1:
        raise ChorusError(f"demo key 'threads': expected a positive integer, got {cfg.threads}")
    before = torch.get_num_threads()
    # The demo's models are tiny: a second thread gains little, and when anything else competes for
    # the cores (a parallel test worker, a browser) synchronizing threads made steps ~10x slower.
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg)
    finally:
        torch.set_num_threads(before)


@dataclass
class _Run:
    """What every stage of one demo run needs."""

    cfg: DemoConfig
    scale: Scale
    out: Path
    stages: _Stages
    store: str = ""
    tokenizer: str = ""
    domains: list = dataclasses.field(default_factory=list)
    keys: dict = dataclasses.field(default_factory=dict)  # stage fingerprints that later stages depend on

    def train_config(self, model: str, out: Path, steps: int, **kw: Any) -> TrainConfig:
        s = self.scale
        return TrainConfig(store=self.store, student=model, out=str(out), steps=steps, batch_size=s.batch_size, lr=s.lr,
                           warmup_steps=s.warmup_steps, seed=self.cfg.seed, eval_every=0, save_every=0,
                           eval_rows=TRAIN_EVAL_ROWS, **kw)


def _run(cfg: DemoConfig) -> dict:
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    r = _Run(cfg, QUICK if cfg.quick else FULL, out, _Stages(out))
    say(f"chorus demo ({'quick' if cfg.quick else 'full'}) → {out}")
    _setup(r)
    _teachers(r)
    students = _students(r)
    rows = _evaluate_all(r, students)
    return _report(r, rows)


def _setup(r: _Run) -> None:
    from chorus.pipeline import prepare

    s, stages = r.scale, r.stages
    stages.announce(1, f"building the corpus ({', '.join(DOMAINS)}) and a {s.vocab_size}-id byte-level BPE tokenizer")
    corpus, tokenizer = _demo_corpus.build(r.out / "corpus", chars_per_domain=s.chars_per_domain,
                                           tokens_per_domain=s.tokens_per_domain, vocab_size=s.vocab_size)
    r.store, r.tokenizer = str(r.out / "store.zarr"), str(tokenizer)

    stages.announce(2, "preparing the store (chorus prepare)")
    prep = PrepareConfig(dataset=str(corpus), tokenizer=r.tokenizer, out=r.store, seq_len=s.seq_len,
                         domain_field="domain", valid_fraction=s.valid_fraction)
    key = stages.key("prepare", _cfg_key(prep), (r.out / "corpus" / "settings.json").read_text())
    # prepare is idempotent on its own (same inputs → nothing to do); a store from other settings is replaced
    manifest = prepare.run(dataclasses.replace(prep, overwrite=not stages.done("prepare", key)))
    stages.finish("prepare", key)
    r.keys["corpus"] = stages.key("corpus", key, manifest.fingerprint)
    r.domains = list(manifest.domains)
    models = r.out / "models"
    models.mkdir(exist_ok=True)
    (models / "teacher.yaml").write_text(yaml.safe_dump(s.teacher, sort_keys=False))
    (models / "student.yaml").write_text(yaml.safe_dump(s.student, sort_keys=False))


def _teachers(r: _Run) -> None:
    s, stages = r.scale, r.stages
    for d in r.domains:
        stages.announce(3, f"training teacher {d} from scratch on {d} rows only (CE, {s.teacher_steps} steps)")
        tcfg = r.train_config(str(r.out / "models" / "teacher.yaml"), r.out / "teachers" / d, s.teacher_steps,
                              train_domains=[d])
        r.keys[d] = _train(stages, f"teacher-{d}", tcfg, [r.keys["corpus"], s.teacher])
    for d in r.domains:
        stages.announce(4, f"caching teacher {d} (top-{s.top_k} log-probs + {s.samples} samples per position)")
        ccfg = CacheConfig(store=r.store, teacher=str(r.out / "teachers" / d / "model"), name=d, tokenizer=r.tokenizer,
                           top_k=s.top_k, samples=s.samples, seed=r.cfg.seed, batch_size=s.cache_batch)
        r.keys[d] = _cache(stages, ccfg, r.keys[d])
    for d in r.domains:
        stages.announce(5, f"calibrating teacher {d} (temperature fitted on held-out rows)")
        r.keys[d] = _calibrate(stages, CalibrateConfig(store=r.store, teacher=d), r.keys[d])


def _students(r: _Run) -> dict[str, list[str]]:
    """Five students, identical but for their teachers: none, each one alone, all three pooled."""
    s = r.scale
    students = {"student-ce": [], **{f"student-kd-{d}": [d] for d in r.domains}, "student-ensemble": list(r.domains)}
    for name, teachers in students.items():
        how = ("CE only" if not teachers else f"KD from teacher {teachers[0]}" if len(teachers) == 1
               else "KD from the calibrated mixture of all teachers")
        r.stages.announce(6, f"training {name}: {how}, {s.student_steps} steps")
        scfg = r.train_config(str(r.out / "models" / "student.yaml"), r.out / "students" / name, s.student_steps,
                              teachers=teachers)
        r.keys[name] = _train(r.stages, name, scfg, [r.keys["corpus"], s.student, *(r.keys[t] for t in teachers)])
    return students


def _evaluate_all(r: _Run, students: dict) -> list[dict]:
    rows = []
    (r.out / "eval").mkdir(exist_ok=True)
    runs = [("teacher", f"teacher-{d}", d, r.out / "teachers" / d) for d in r.domains]
    runs += [("student", name, name, r.out / "students" / name) for name in students]
    for kind, label, key, run_dir in runs:
        r.stages.announce(7, f"evaluating {label} on every held-out row")
        ecfg = EvalConfig(store=r.store, model=str(run_dir / "model"), out=str(r.out / "eval" / f"{label}.json"),
                          batch_size=32)
        rows.append(_row(label, kind, _evaluate(r.stages, label, ecfg, r.keys[key])))
    return rows


def _report(r: _Run, rows: list[dict]) -> dict:
    holds, text = claim(rows)
    results = {"rows": rows, "domains": r.domains, "claim": {"holds": holds, "text": text},
               "settings": {"quick": r.cfg.quick, "seed": r.cfg.seed, **dataclasses.asdict(r.scale)}}
    (r.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, r.domains, r.out / "results.png")
    print(format_table(rows, r.domains), flush=True)
    print(f"\n{'claim holds' if holds else 'claim does not hold'}: {text}", flush=True)
    print(f"finished in {time.perf_counter() - r.stages.t0:.0f} s", flush=True)
    print(f"table: {r.out / 'results.json'}", flush=True)
    print(f"plot:  {r.out / 'results.png'}", flush=True)
    return results
