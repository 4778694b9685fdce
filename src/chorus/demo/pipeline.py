"""`chorus demo`: the whole pipeline on text shipped with Python, ending in the claim put to the test.

setup (corpus + tokenizer, `prepare`) → three specialist teachers (`train`, CE only, each on the
rows of one domain) → `cache` and `calibrate` each → five students with the same size, steps, rows and seed
(CE only; KD from each single teacher; KD from the calibrated mixture of all three) → `eval`
everything on held-out rows → one table, ``results.json`` and ``results.png``.

Why the ensemble should win at its worst: a student distilled from one specialist inherits that
teacher's blind domains (on them it learns the teacher's poor guesses), while the mixture always
holds one teacher that knows the domain, so the student is never taught by only a blind one.

Every stage runs the command itself (``chorus.commands.COMMANDS[name].run(cfg)``) with a config built here, so the demo runs
the same code a user runs. Independent jobs of a stage (three teachers, five students, eight evals)
run side by side in ``workers`` processes. A stage that already finished in ``--out`` with the same
settings is skipped (a record per stage under ``OUT/.demo``), so a rerun reuses the store and teachers.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from chorus.commands import COMMANDS
from chorus.config import (
    BlendConfig,
    CacheConfig,
    CalibrateConfig,
    CompressConfig,
    DemoConfig,
    EvalConfig,
    PrepareConfig,
    TrainConfig,
)
from chorus.demo import corpus as _demo_corpus
from chorus.demo.report import _row, claim, format_table, plot
from chorus.errors import ChorusError
from chorus.progress import say
from chorus.store import Store, complete_teachers, fingerprint, stored_blend

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
    base_steps: int  # the teachers' shared base, trained on every domain
    finetune_steps: int  # each specialist: the base fine-tuned on its domain
    student_steps: int
    batch_size: int
    lr: float
    warmup_steps: int
    top_k: int
    samples: int
    kd_weight: float = 1.0  # every KD student: (1 − kd_weight)·CE + kd_weight·KD
    student_rows: int | None = None  # the distillation set: rows every student trains on (teachers see all)
    cache_batch: int = 64  # rows per teacher forward pass when caching
    # every student's pool operator (with one teacher it is that teacher): the log pool with the blend's per-domain
    # weights and temperatures won benchmarks/ensemble.py and beat the blend's own mixture (docs/measurements.md):
    # a product of specialists keeps only what the domain's expert allows, where a mixture spreads mass over every
    # teacher's modes
    aggregate: str = "geometric"


def _llama(hidden: int, layers: int, heads: int, seq_len: int) -> dict:
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": heads, "num_key_value_heads": heads, "max_position_embeddings": seq_len,
            "tie_word_embeddings": True}


# Shaped like real use: the teachers are a model family several times the student's size (width 128 vs 48:
# 5.3x the parameters at quick scale, 4.6x at full), a base trained on every domain and fine-tuned into one
# specialist per domain; the students learn from a distillation set that is a small part of what the
# teachers saw (student_rows, ~1/8 of the train rows), mixing KD with the hard labels (kd_weight 0.8). Why: on all
# rows the student catches up with the teachers and KD has nothing left to teach (docs/measurements.md).
FULL = Scale(chars_per_domain=400_000, tokens_per_domain=100_000, vocab_size=2048, seq_len=128, valid_fraction=0.1,
             teacher=_llama(128, 2, 4, 128), student=_llama(48, 2, 4, 128), base_steps=400, finetune_steps=120,
             student_steps=300,
             batch_size=16, lr=3e-3, warmup_steps=20, top_k=32, samples=8, kd_weight=0.8, student_rows=600)
QUICK = Scale(chars_per_domain=180_000, tokens_per_domain=45_000, vocab_size=1024, seq_len=64, valid_fraction=0.1,
              teacher=_llama(128, 2, 4, 64), student=_llama(48, 2, 4, 64), base_steps=200, finetune_steps=60,
              student_steps=120, student_rows=240,
              batch_size=16, lr=5e-3, warmup_steps=10, top_k=16, samples=8, kd_weight=0.8)


# ---------------------------------------------------------------------------------------------- stages
class _Stages:
    """One record per finished stage under ``OUT/.demo``: the fingerprint of everything the stage's
    output depends on (its settings and the fingerprints of the stages it read). Same fingerprint and
    output still there → the stage is skipped; a ``.started`` record marks one that was interrupted."""

    def __init__(self, out: Path) -> None:
        self.dir = out / ".demo"
        self.dir.mkdir(parents=True, exist_ok=True)
        self.t0 = time.perf_counter()

    def announce(self, i: int, text: str) -> None:
        """The line a user follows: stage number, time since the start, what runs now."""
        elapsed = int(time.perf_counter() - self.t0)
        say(f"[{i}/{N_STAGES}] {elapsed // 60}:{elapsed % 60:02d} {text}")

    def key(self, name: str, *parts: Any) -> str:
        return fingerprint("demo-stage", name, *parts)

    def _read(self, name: str) -> str | None:
        p = self.dir / f"{name}.json"
        return json.loads(p.read_text()).get("key") if p.is_file() else None

    def done(self, name: str, key: str) -> bool:
        return self._read(name) == key

    def started(self, name: str, key: str) -> bool:
        return self._read(f"{name}.started") == key

    def start(self, name: str, key: str) -> None:
        (self.dir / f"{name}.json").unlink(missing_ok=True)
        (self.dir / f"{name}.started.json").write_text(json.dumps({"key": key}))

    def finish(self, name: str, key: str) -> None:
        (self.dir / f"{name}.json").write_text(json.dumps({"key": key}))
        (self.dir / f"{name}.started.json").unlink(missing_ok=True)


def _cfg_key(cfg: Any) -> dict:
    """A config as the settings that decide a stage's output: paths and run-control flags left out, and so
    are settings at their default, so that a new option (default: the old behaviour) keeps earlier stages."""
    skip = {"out", "overwrite", "resume", "storage_options", "device", "num_workers", "log_every"}
    defaults = {f.name: f.default for f in dataclasses.fields(cfg) if f.default is not dataclasses.MISSING}
    defaults.update({f.name: f.default_factory() for f in dataclasses.fields(cfg)
                     if f.default_factory is not dataclasses.MISSING})
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skip and not (k in defaults and v == defaults[k])}


@dataclass
class _Job:
    """One command run: ``command`` (a name in :data:`chorus.commands.COMMANDS`) on ``config(resume)``, where ``resume`` is true when
    an earlier try with the same key was interrupted (train resumes, cache keeps committed shards)."""

    stage: int
    text: str
    name: str
    key: str
    command: str
    config: Callable[[bool], Any]
    present: Callable[[], bool]  # is the stage's output still there?


def _work(command: str, cfg: Any, threads: int, progress: str | None) -> None:
    """Runs in a worker process (or inline): one command, as `chorus <command>` would run it."""
    torch.set_num_threads(threads)
    if progress is not None:
        os.environ["CHORUS_PROGRESS"] = progress
    COMMANDS[command].run(cfg)


class _Runner:
    """Runs the jobs of a stage, skipping finished ones; independent jobs run side by side in up to
    ``workers`` processes of one torch thread each (only the first shows its progress bar, so two bars
    never fight over one terminal line). Each recipe seeds itself, so results do not depend on it."""

    def __init__(self, stages: _Stages, workers: int, threads: int) -> None:
        self.stages, self.workers, self.threads = stages, workers, threads
        self.pool = None

    def run(self, jobs: list[_Job]) -> None:
        todo = []
        for job in jobs:
            if self.stages.done(job.name, job.key) and job.present():
                self.stages.announce(job.stage, f"{job.text}: done earlier with these settings, reused")
            else:
                todo.append(job)
        if self.workers == 1 or len(todo) == 1:
            for job in todo:
                self._announce(job)
                _work(job.command, self._config(job), self.threads, None)
                self.stages.finish(job.name, job.key)
            return
        self._run_parallel(todo)

    def _announce(self, job: _Job, note: str = "") -> None:
        self.stages.announce(job.stage, f"{job.text}{note} …")

    def _config(self, job: _Job) -> Any:
        cfg = job.config(self.stages.started(job.name, job.key))
        self.stages.start(job.name, job.key)
        return cfg

    def _run_parallel(self, todo: list[_Job]) -> None:
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"))
        shown = os.environ.get("CHORUS_PROGRESS", "auto")
        running: dict = {}  # future → (job, slot)
        queue = list(todo)
        try:
            while queue or running:
                busy = {slot for _, slot in running.values()}
                while queue and len(running) < self.workers:
                    job, slot = queue.pop(0), min(set(range(self.workers)) - busy)
                    busy.add(slot)
                    self._announce(job, "" if slot == 0 else " (in parallel, no progress bar)")
                    fut = self.pool.submit(_work, job.command, self._config(job), self.threads, shown if slot == 0 else "off")
                    running[fut] = (job, slot)
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in finished:
                    job, _ = running.pop(fut)
                    fut.result()  # a recipe's error surfaces here, as the same exception
                    self.stages.finish(job.name, job.key)
        except BaseException:
            self.close(cancel=True)
            raise

    def close(self, cancel: bool = False) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=cancel)
            self.pool = None


def _train_job(r: "_Run", stage: int, text: str, name: str, cfg: TrainConfig, upstream: list) -> _Job:
    out = Path(cfg.out)
    return _Job(stage, text, name, r.stages.key(name, _cfg_key(cfg), upstream), "train",
                lambda resume: dataclasses.replace(cfg, resume=resume, overwrite=not resume),
                lambda: (out / "model" / "chorus.json").is_file())


def _cache_complete(store: str, name: str) -> bool:
    return name in complete_teachers(Store.open(store, "r"))


def _blended(store: str, teachers: list) -> bool:
    return stored_blend(Store.open(store, "r"), list(teachers)) is not None


def _calibrated(store: str, name: str) -> bool:
    st = Store.open(store, "r")
    return name in st.teacher_names() and bool(st.teacher_manifest(name).calibration)


# ---------------------------------------------------------------------------------------------- the command
def run(cfg: DemoConfig) -> dict:
    if cfg.threads < 1:
        raise ChorusError(f"demo key 'threads': expected a positive integer, got {cfg.threads}")
    workers = cfg.workers if cfg.workers is not None else (1 if cfg.quick else min(2, os.cpu_count() or 1))
    if workers < 1:
        raise ChorusError(f"demo key 'workers': expected a positive integer, got {workers}")
    before = torch.get_num_threads()
    # The demo's models are tiny: a second thread gains little, and when anything else competes for the
    # cores (a parallel test worker, the other demo worker) synchronizing threads made steps much slower.
    torch.set_num_threads(cfg.threads)
    out = Path(cfg.out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    stages = _Stages(out)
    r = _Run(cfg, QUICK if cfg.quick else FULL, out, stages, _Runner(stages, workers, cfg.threads))
    try:
        say(f"chorus demo ({'quick' if cfg.quick else 'full'}) → {out}"
            + (f" ({workers} worker processes)" if workers > 1 else ""))
        _setup(r)
        _teachers(r)
        students = _students(r)
        return _report(r, _evaluate_all(r, students))
    finally:
        r.runner.close()
        torch.set_num_threads(before)


@dataclass
class _Run:
    """What every stage of one demo run needs."""

    cfg: DemoConfig
    scale: Scale
    out: Path
    stages: _Stages
    runner: _Runner
    store: str = ""
    tokenizer: str = ""
    domains: list = dataclasses.field(default_factory=list)
    keys: dict = dataclasses.field(default_factory=dict)  # stage fingerprints that later stages depend on

    def train_config(self, model: str, out: Path, steps: int, **kw: Any) -> TrainConfig:
        s = self.scale
        base = dict(store=self.store, student=model, out=str(out), steps=steps, batch_size=s.batch_size, lr=s.lr,
                    warmup_steps=s.warmup_steps, seed=self.cfg.seed, eval_every=0, save_every=0,
                    eval_rows=TRAIN_EVAL_ROWS)
        return TrainConfig(**{**base, **kw})


def _setup(r: _Run) -> None:
    s, stages = r.scale, r.stages
    stages.announce(1, f"building the corpus ({', '.join(DOMAINS)}) and a {s.vocab_size}-id byte-level BPE tokenizer …")
    corpus, tokenizer = _demo_corpus.build(r.out / "corpus", chars_per_domain=s.chars_per_domain,
                                           tokens_per_domain=s.tokens_per_domain, vocab_size=s.vocab_size)
    r.store, r.tokenizer = str(r.out / "store.zarr"), str(tokenizer)

    stages.announce(2, "preparing the store (chorus prepare) …")
    prep = PrepareConfig(dataset=str(corpus), tokenizer=r.tokenizer, out=r.store, seq_len=s.seq_len,
                         domain_field="domain", valid_fraction=s.valid_fraction)
    key = stages.key("prepare", _cfg_key(prep), (r.out / "corpus" / "settings.json").read_text())
    # prepare is idempotent on its own (same inputs → nothing to do); a store from other settings is replaced
    manifest = COMMANDS["prepare"].run(dataclasses.replace(prep, overwrite=not stages.done("prepare", key)))
    stages.finish("prepare", key)
    r.keys["corpus"] = stages.key("corpus", key, manifest.fingerprint)
    r.domains = list(manifest.domains)
    models = r.out / "models"
    models.mkdir(exist_ok=True)
    (models / "teacher.yaml").write_text(yaml.safe_dump(s.teacher, sort_keys=False))
    (models / "student.yaml").write_text(yaml.safe_dump(s.student, sort_keys=False))


def _teachers(r: _Run) -> None:
    """A model family, as teachers come in real use: one base trained on every domain, then fine-tuned
    into a specialist per domain (like a family's coder / writer variants), each several times the
    student's size."""
    s, stages = r.scale, r.stages
    # the teachers never see the students' distillation set: in real use a teacher was trained on other text
    # than the corpus it labels, and a teacher that memorized its rows teaches its students to memorize them
    apart = {"exclude_rows": s.student_rows}
    bcfg = r.train_config(str(r.out / "models" / "teacher.yaml"), r.out / "teachers" / "base", s.base_steps, **apart)
    base = _train_job(r, 3, f"training the teachers' base from scratch on every domain (CE, {s.base_steps} steps)",
                      "teacher-base", bcfg, [r.keys["corpus"], s.teacher])
    r.runner.run([base])
    jobs = []
    for d in r.domains:
        tcfg = r.train_config(str(r.out / "teachers" / "base" / "model"), r.out / "teachers" / d, s.finetune_steps,
                              train_domains=[d], lr=s.lr / 2, **apart)
        jobs.append(_train_job(r, 3, f"fine-tuning the base into teacher {d} on {d} rows (CE, {s.finetune_steps} steps)",
                               f"teacher-{d}", tcfg, [base.key]))
    r.runner.run(jobs)
    r.keys.update({d: job.key for d, job in zip(r.domains, jobs)})

    jobs = []
    for d in r.domains:
        ccfg = CacheConfig(store=r.store, teacher=str(r.out / "teachers" / d / "model"), name=d, tokenizer=r.tokenizer,
                           top_k=s.top_k, samples=s.samples, seed=r.cfg.seed, batch_size=s.cache_batch)
        # an interrupted cache of the same settings keeps its committed shards; anything else is replaced
        jobs.append(_Job(4, f"caching teacher {d} (top-{s.top_k} log-probs + {s.samples} samples per position)",
                         f"cache-{d}", stages.key(f"cache-{d}", _cfg_key(ccfg), r.keys[d]), "cache",
                         lambda resume, c=ccfg: dataclasses.replace(c, overwrite=not resume),
                         lambda d=d: _cache_complete(r.store, d)))
    r.runner.run(jobs)
    r.keys.update({d: job.key for d, job in zip(r.domains, jobs)})

    jobs = []
    for d in r.domains:
        kcfg = CalibrateConfig(store=r.store, teacher=d)
        jobs.append(_Job(5, f"calibrating teacher {d} (temperature fitted on held-out rows)", f"calibrate-{d}",
                         stages.key(f"calibrate-{d}", _cfg_key(kcfg), r.keys[d]), "calibrate",
                         lambda resume, c=kcfg: c, lambda d=d: _calibrated(r.store, d)))
    r.runner.run(jobs)
    r.keys.update({d: job.key for d, job in zip(r.domains, jobs)})

    bcfg = BlendConfig(store=r.store, teachers=list(r.domains))
    job = _Job(5, "fitting the blend (per-domain weights, per-token sharpness) on held-out rows", "blend",
               stages.key("blend", _cfg_key(bcfg), *(r.keys[d] for d in r.domains)), "blend",
               lambda resume, c=bcfg: c, lambda: _blended(r.store, r.domains))
    r.runner.run([job])
    r.keys["blend"] = job.key


def _students(r: _Run) -> list[str]:
    """Five students, identical but for their teachers: none, each one alone, all three pooled."""
    s = r.scale
    students = {"student-ce": [], **{f"student-kd-{d}": [d] for d in r.domains}, "student-ensemble": list(r.domains)}
    jobs = []
    for name, teachers in students.items():
        how = ("CE only" if not teachers else f"KD from teacher {teachers[0]}" if len(teachers) == 1
               else "KD from the fitted blend of all teachers")
        scfg = r.train_config(str(r.out / "models" / "student.yaml"), r.out / "students" / name, s.student_steps,
                              teachers=teachers, kd_weight=s.kd_weight if teachers else 0.0, train_rows=s.student_rows,
                              aggregate=s.aggregate)
        deps = [r.keys["corpus"], s.student, *(r.keys[t] for t in teachers)] + ([r.keys["blend"]] if len(teachers) > 1 else [])
        jobs.append(_train_job(r, 6, f"training {name}: {how}, {s.student_steps} steps", name, scfg, deps))
    r.runner.run(jobs)
    r.keys.update({name: job.key for name, job in zip(students, jobs)})
    _compress(r)
    return list(students)


COMPRESSED = "teacher-base-half"  # the teachers' base compressed to half its parameters by SparseKD


def _compress(r: _Run) -> None:
    """SparseKD on the teachers' base: pruned to half its parameters in two stages, each distilled from the
    fitted blend of the three specialists with the students' steps and rows (chorus compress)."""
    s = r.scale
    train = {"batch_size": s.batch_size, "lr": s.lr, "warmup_steps": s.warmup_steps, "kd_weight": s.kd_weight,
             "train_rows": s.student_rows, "aggregate": s.aggregate, "device": "cpu"}
    ccfg = CompressConfig(store=r.store, model=str(r.out / "teachers" / "base" / "model"), out=str(r.out / "compressed"),
                          teachers=list(r.domains), target_params=0.5, stages=2, steps=s.student_steps,
                          seed=r.cfg.seed, eval_rows=TRAIN_EVAL_ROWS, train=train)
    key = r.stages.key("compress", _cfg_key(ccfg), r.keys["blend"], *(r.keys[d] for d in r.domains))
    job = _Job(6, f"compressing the teachers' base to half its parameters in 2 stages, each distilled from the blend "
                  f"({s.student_steps} steps in all)", "compress", key, "compress",
               lambda resume, c=ccfg: dataclasses.replace(c, overwrite=not resume),
               lambda: (r.out / "compressed" / "results.json").is_file())
    r.runner.run([job])
    r.keys[COMPRESSED] = job.key


def _evaluate_all(r: _Run, students: list[str]) -> list[dict]:
    runs = [("teacher", f"teacher-{d}", d, r.out / "teachers" / d) for d in r.domains]
    runs += [("student", name, name, r.out / "students" / name) for name in students]
    runs += [("pruned", COMPRESSED, COMPRESSED, r.out / "compressed" / "stage-02" / "train")]
    (r.out / "eval").mkdir(exist_ok=True)
    jobs = []
    for _kind, label, key, run_dir in runs:
        ecfg = EvalConfig(store=r.store, model=str(run_dir / "model"), out=str(r.out / "eval" / f"{label}.json"),
                          aggregate=r.scale.aggregate,
                          batch_size=32)
        jobs.append(_Job(7, f"evaluating {label} on every held-out row", f"eval-{label}",
                         r.stages.key(f"eval-{label}", _cfg_key(ecfg), r.keys[key]), "eval",
                         lambda resume, c=ecfg: c, lambda p=Path(ecfg.out): p.is_file()))
    r.runner.run(jobs)
    return [_row(label, kind, json.loads((r.out / "eval" / f"{label}.json").read_text())) for kind, label, _, _ in runs]


def _report(r: _Run, rows: list[dict]) -> dict:
    holds, text = claim(rows)
    results = {"rows": rows, "domains": r.domains, "claim": {"holds": holds, "text": text},
               "settings": {"quick": r.cfg.quick, "seed": r.cfg.seed, **dataclasses.asdict(r.scale)}}
    (r.out / "results.json").write_text(json.dumps(results, indent=1))
    plot(rows, r.domains, r.out / "results.png")
    print(format_table(rows, r.domains), flush=True)
    print(f"\n{'claim holds' if holds else 'claim does not hold'}: " + text.replace("; ", "\n  "), flush=True)
    print(f"finished in {time.perf_counter() - r.stages.t0:.0f} s", flush=True)
    print(f"table: {r.out / 'results.json'}", flush=True)
    print(f"plot:  {r.out / 'results.png'}", flush=True)
    return results
