"""`chorus demo`: the corpus, the report, and one quick end-to-end run that puts the claim to the test.

The end-to-end run is a single test (about a minute on one CPU core): split into several tests, a
parallel runner (pytest -n 2) could run the demo once per worker."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import pytest
import yaml

from chorus import demo
from chorus.config import DemoConfig
from chorus.demo import corpus as _demo_corpus


# ---------------------------------------------------------------------------------------------- corpus
def test_corpus_domains_are_distinct_and_deterministic():
    a = _demo_corpus.domain_documents(20_000)
    b = _demo_corpus.domain_documents(20_000)
    assert a == b
    assert set(a) == set(_demo_corpus.DOMAINS)
    assert all(len(docs) >= 5 for docs in a.values())
    assert all(line.startswith("U+") for doc in a["unicode"] for line in doc.splitlines())
    assert any("def " in doc for doc in a["code"]) and any("statement" in doc for doc in a["prose"])


def test_corpus_is_balanced_by_tokens_and_reused(tmp_path):
    from transformers import AutoTokenizer

    corpus, tok = _demo_corpus.build(tmp_path, chars_per_domain=40_000, tokens_per_domain=4_000, vocab_size=300)
    t = AutoTokenizer.from_pretrained(str(tok))
    assert (t.eos_token, t.pad_token) == ("<eos>", "<pad>") and len(t) == 300
    counts: dict = {}
    for line in corpus.read_text().splitlines():
        doc = json.loads(line)
        counts[doc["domain"]] = counts.get(doc["domain"], 0) + len(t(doc["text"])["input_ids"]) + 1
    assert set(counts) == set(_demo_corpus.DOMAINS)
    assert all(4_000 <= n < 4_000 * 1.5 for n in counts.values()), counts  # the cap, overshot by < 1 document
    mtime = corpus.stat().st_mtime_ns
    _demo_corpus.build(tmp_path, chars_per_domain=40_000, tokens_per_domain=4_000, vocab_size=300)
    assert corpus.stat().st_mtime_ns == mtime


# ---------------------------------------------------------------------------------------------- report
def _fake_rows(ensemble_worst: float) -> list[dict]:
    def row(name, kind, losses):
        per = dict(zip(("code", "prose", "unicode"), losses))
        return {"name": name, "kind": kind, "per_domain": per, "mean": sum(losses) / 3, "worst": max(losses), "ece": 0.01}

    return [row("teacher-code", "teacher", (2.0, 5.0, 6.0)), row("student-kd-code", "student", (2.5, 5.5, 6.5)),
            row("student-kd-prose", "student", (5.5, 2.5, 6.0)), row("student-ensemble", "student", (2.8, 2.9, ensemble_worst))]


def test_claim_puts_every_part_to_the_test():
    assert demo.claim(_fake_rows(3.0))[0]
    holds, text = demo.claim(_fake_rows(6.2))  # beats kd-code (6.5) but not kd-prose (6.0) nor the teacher (6.0)
    assert not holds and "worst 6.200 NOT < every other student's" in text and "NOT < every teacher's worst" in text
    rows = _fake_rows(3.0) + [{"name": "student-ce", "kind": "student", "per_domain": {}, "mean": 3.0, "worst": 3.5,
                               "ece": 0.004}]
    holds, text = demo.claim(rows)  # the ensemble's mean 2.9 beats CE's 3.0, but its ECE 1.0 pts > 0.4 + 0.5
    assert not holds and "mean 2.900 < every other student's" in text and "ECE 1.00 pts NOT <= CE-only's 0.40 + 0.5" in text


def test_table_and_plot(tmp_path):
    rows = _fake_rows(3.0)
    table = demo.format_table(rows, ["code", "prose", "unicode"])
    assert table.splitlines()[0].split() == ["model", "kind", "code", "prose", "unicode", "mean", "worst", "ECE"]
    assert "student-ensemble" in table and "6.500" in table
    demo.plot(rows, ["code", "prose", "unicode"], tmp_path / "p.png")
    assert (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---------------------------------------------------------------------------------------------- end to end
def _check_schema(results: dict) -> None:
    domains = results["domains"]
    assert sorted(domains) == sorted(_demo_corpus.DOMAINS)
    names = [r["name"] for r in results["rows"]]
    assert names == [f"teacher-{d}" for d in domains] + ["student-ce"] + [f"student-kd-{d}" for d in domains] + [
        "student-ensemble", demo.COMPRESSED]
    for r in results["rows"]:
        assert {"name", "kind", "per_domain", "mean", "worst", "ece"} <= set(r)
        kind = "pruned" if r["name"] == demo.COMPRESSED else "teacher" if r["name"].startswith("teacher-") else "student"
        assert r["kind"] == kind
        losses = [r["per_domain"][d] for d in domains]
        assert all(math.isfinite(v) and v > 0 for v in losses)
        assert r["worst"] == pytest.approx(max(losses)) and r["mean"] == pytest.approx(sum(losses) / len(losses))
        assert 0.0 <= r["ece"] <= 1.0


def _check_students_differ_only_in_teachers(out) -> None:
    """Honest comparison: one model config, step count, row stream, seed and loss for every student; the KD
    students share one KD weight; only the ensemble's blend (filled in from the store) differs."""
    configs = {p.parent.name: yaml.safe_load(p.read_text()) for p in sorted((out / "students").glob("*/config.yaml"))}
    assert len(configs) == 5
    blend = ("domain_weights", "weighting", "beta", "teacher_temperatures")
    rest = [{k: v for k, v in c.items() if k not in ("teachers", "out", "kd_weight", *blend)} for c in configs.values()]
    assert all(c == rest[0] for c in rest[1:])
    assert rest[0]["train_domains"] == [] and rest[0]["train_rows"] == demo.QUICK.student_rows
    assert configs["student-ce"]["kd_weight"] == 0.0
    assert {c["kd_weight"] for n, c in configs.items() if n != "student-ce"} == {demo.QUICK.kd_weight}
    assert all(configs[n][k] == configs["student-ce"][k] for n in configs if n != "student-ensemble" for k in blend)
    assert configs["student-ce"]["teachers"] == []
    assert sorted(configs["student-ensemble"]["teachers"]) == sorted(_demo_corpus.DOMAINS)


def _demo(out) -> subprocess.CompletedProcess:
    """`chorus demo --quick` as a user runs it: a fresh process."""
    res = subprocess.run([sys.executable, "-m", "chorus", "demo", "--quick", "--out", str(out)], capture_output=True,
                         text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return res


def _check_same_in_a_fresh_process(out, tmp_path) -> None:
    """The ensemble student, trained inside this pytest worker after whatever ran here before, trained again from
    its own config.yaml in a fresh interpreter: the same weights, byte for byte, and the same evaluation. (An
    earlier chorus gave other numbers in-process than in a fresh process; see docs/results.md.)"""
    run = out / "students" / "student-ensemble"
    again = tmp_path / "again"
    cmd = [sys.executable, "-m", "chorus"]
    res = subprocess.run([*cmd, "train", "--config", str(run / "config.yaml"), "--out", str(again)],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    weights = sorted(p.name for p in (run / "model").glob("*.safetensors"))
    assert weights and weights == sorted(p.name for p in (again / "model").glob("*.safetensors"))
    for name in weights:
        assert (run / "model" / name).read_bytes() == (again / "model" / name).read_bytes(), name
    ours = json.loads((out / "eval" / "student-ensemble.json").read_text())
    res = subprocess.run([*cmd, "eval", "--store", str(out / "store.zarr"), "--model", str(again / "model"),
                          "--aggregate", demo.QUICK.aggregate, "--batch-size", "32", "--out", str(tmp_path / "e.json")],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    theirs = json.loads((tmp_path / "e.json").read_text())
    assert {k: v for k, v in theirs.items() if k != "model"} == {k: v for k, v in ours.items() if k != "model"}


def test_quick_demo_puts_the_claim_to_the_test(tmp_path, capsys):
    """The quick demo runs here, in this pytest worker, after the other tests it ran (item 8 of issue 24: the same
    config gives the same numbers in any process); its rerun runs as a user runs it, in a fresh process."""
    out = tmp_path / "demo"
    t0 = time.perf_counter()
    results = demo.run(DemoConfig(out=str(out), quick=True))
    first_run = time.perf_counter() - t0
    captured = capsys.readouterr()
    assert json.loads((out / "results.json").read_text()) == json.loads(json.dumps(results))
    rows = {r["name"]: r for r in results["rows"]}
    domains = results["domains"]

    # The scenario the claim rests on: every teacher is the best teacher on its own domain.
    for d in domains:
        own = rows[f"teacher-{d}"]["per_domain"][d]
        assert all(own < rows[f"teacher-{o}"]["per_domain"][d] for o in domains if o != d), (d, rows)
    # The claim: at its worst domain, the ensemble student beats every single-teacher student.
    ens = rows["student-ensemble"]["worst"]
    singles = {n: r["worst"] for n, r in rows.items() if n.startswith("student-kd-")}
    assert len(singles) == 3 and all(ens < w for w in singles.values()), (ens, singles)
    assert results["claim"]["holds"]
    # ... and beats plain training (CE only) and every single-teacher student on worst and mean, is about as
    # calibrated as CE, and beats every teacher at its worst.
    ce = rows["student-ce"]
    e = rows["student-ensemble"]
    assert e["worst"] < ce["worst"] and e["mean"] < ce["mean"], (e, ce)
    assert all(e["mean"] < r["mean"] for n, r in rows.items() if n.startswith("student-kd-")), rows
    # The goal is ECE within 0.5 points of CE's: measured on seed 0 standalone +0.13 points (1.79 vs 1.66);
    # an earlier version measured −0.2 standalone and +0.8 inside this suite (the environment moves the last digits),
    # so the suite asserts it at the 1.5-point level.
    assert e["ece"] <= ce["ece"] + 0.015, (e["ece"], ce["ece"])
    assert all(e["worst"] < rows[f"teacher-{d}"]["worst"] for d in domains)
    # The fitted blend beats the uniform mixture on held-out pooled gold NLL in every domain.
    from chorus.store import Store, stored_blend

    report = stored_blend(Store.open(str(out / "store.zarr"), "r"), list(domains))["report"]["heldout_nll_per_domain"]
    fitted = [k for k in report if k != "uniform" and k != "confidence"]
    for d in domains:
        assert min(report[k][d] for k in fitted) < report["uniform"][d], (d, report)

    _check_schema(results)
    _check_students_differ_only_in_teachers(out)
    _check_same_in_a_fresh_process(out, tmp_path)
    png = out / "results.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    last = captured.out.strip().splitlines()[-2:]
    assert last == [f"table: {out / 'results.json'}", f"plot:  {png}"]
    assert "student-ensemble" in captured.out and "[7/7]" in captured.err

    # A rerun reuses every finished stage: no model is trained again and it takes a fraction of the time.
    weights = sorted(out.glob("*/*/model/*.safetensors"))
    assert len(weights) == 9  # the teachers' base, three specialists, five students
    before = [p.stat().st_mtime_ns for p in weights]
    t0 = time.perf_counter()
    _demo(out)
    assert [p.stat().st_mtime_ns for p in weights] == before
    assert time.perf_counter() - t0 < first_run / 2
    assert json.loads((out / "results.json").read_text())["rows"] == results["rows"]
