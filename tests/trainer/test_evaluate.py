"""`chorus eval`: per-domain loss against a dense reference, the required JSON, teachers from their cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from chorus.cli import main as cli_main
from chorus.commands import eval as eval_command
from chorus.config import EvalConfig
from chorus.store import Store
from chorus.student import evaluate
from tests.conftest import build_tiny_llama
from tests.trainer.conftest import bigram_teacher, copy_store, write_teacher


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, vocab_size) -> str:
    return build_tiny_llama(str(tmp_path_factory.mktemp("model")), vocab_size, seed=3)


def _reference_losses(url: str, model_dir: str) -> dict[str, float]:
    """Per-domain mean NLL from the model's own full logits, position by position."""
    from transformers import AutoModelForCausalLM

    store = Store.open(url, "r")
    m = store.manifest
    n = m.num_rows
    split = store.read_rows("corpus", "split", 0, n)
    rows = np.flatnonzero(split == 1)
    ids = torch.from_numpy(store.read_rows("corpus", "input_ids", 0, n)[rows].astype(np.int64))
    segs = torch.from_numpy(store.read_rows("corpus", "segment_ids", 0, n)[rows].astype(np.int64))
    dom = store.read_rows("corpus", "domain", 0, n)[rows]
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logp = torch.log_softmax(model(ids, attention_mask=(segs > 0).long()).logits.float(), -1)
    nll = -logp[:, :-1].gather(2, ids[:, 1:, None])[..., 0]
    ok = (segs[:, :-1] > 0) & (segs[:, 1:] > 0)
    out = {}
    for d, name in enumerate(m.domains):
        mask = ok & torch.from_numpy(dom == d)[:, None]
        if mask.any():
            out[name] = float(nll[mask].mean())
    return out


def test_eval_json_matches_a_dense_reference(teacher_store, model_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    res = eval_command.run(EvalConfig(store=teacher_store, model=model_dir, out=str(out), batch_size=16, chunk_size=100))
    saved = json.loads(out.read_text())
    assert {"per_domain", "mean", "worst", "ece", "teachers"} <= set(saved)
    assert saved["worst"] == max(saved["per_domain"].values())
    assert saved["mean"] == pytest.approx(np.mean(list(saved["per_domain"].values())))
    ref = _reference_losses(teacher_store, model_dir)
    assert saved["per_domain"].keys() == ref.keys()
    for d in ref:
        assert saved["per_domain"][d] == pytest.approx(ref[d], rel=1e-5)
        assert saved["ppl"][d] == pytest.approx(math.exp(ref[d]), rel=1e-4)
    assert 0 <= saved["ece"] <= 1
    assert set(saved["teachers"]) == {"a", "b", "c"}
    for t in saved["teachers"].values():
        assert t["kl"] > 0 and 0 <= t["top1_agreement"] <= 1
    ens = saved["ensemble"]  # three teachers: diagnostics per domain
    assert set(ens["jsd_per_domain"]) == set(ref) and all(0 < v < math.log(2) for v in ens["jsd_per_domain"].values())
    for ws in ens["weights_per_domain"].values():
        assert sum(ws.values()) == pytest.approx(1.0)
    table = capsys.readouterr().out
    assert "worst" in table and "KL(t||s)" in table and res == saved


def test_teacher_evaluated_from_its_cache(tmp_path, prepared_store, vocab_size):
    url = copy_store(prepared_store, tmp_path / "s.zarr")
    table = bigram_teacher(vocab_size, seed=5, sharpness=1.0)
    write_teacher(url, "full", table, top_k=vocab_size)  # every id cached: the loss is exact
    write_teacher(url, "short", table, top_k=8)  # the gold is often outside: its exact log-prob is cached
    write_teacher(url, "old", table, top_k=8, stats=False)  # format v1: the even-tail estimate
    exact = eval_command.run(EvalConfig(store=url, model="teacher:full"))
    short = eval_command.run(EvalConfig(store=url, model="teacher:short", out=str(tmp_path / "t.json")))
    old = eval_command.run(EvalConfig(store=url, model="teacher:old"))
    # reference: the bigram table's NLL of every held-out next token
    store = Store.open(url, "r")
    n = store.manifest.num_rows
    rows = np.flatnonzero(store.read_rows("corpus", "split", 0, n) == 1)
    ids = store.read_rows("corpus", "input_ids", 0, n)[rows]
    segs = store.read_rows("corpus", "segment_ids", 0, n)[rows]
    ok = (segs[:, :-1] > 0) & (segs[:, 1:] > 0)
    nll = -np.take_along_axis(table(ids[:, :-1]), ids[:, 1:, None], -1)[..., 0]
    assert exact["token_mean"] == pytest.approx(float(nll[ok].mean()), rel=1e-3)
    assert exact["gold_in_topk"] == 1.0
    assert short["token_mean"] == pytest.approx(float(nll[ok].mean()), abs=1e-3)  # exact although k = 8
    assert short["worst"] == max(short["per_domain"].values()) and 0 < short["gold_in_topk"] < 1
    assert old["exact"] is False and "even-tail estimate" in old["note"]
    assert abs(old["token_mean"] - short["token_mean"]) > 0.1  # the v1 guess misses the exact value
    assert json.loads((tmp_path / "t.json").read_text())["source"] == "cache"


def test_cli_eval_of_a_run_directory(teacher_store, model_dir, tmp_path, capsys):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(model_dir, run / "model")
    assert cli_main(["eval", "--store", teacher_store, "--model", str(run), "--teachers", "a", "--max-rows", "8"]) == 0
    out = capsys.readouterr().out
    assert "mean" in out and "ensemble" not in out
    assert cli_main(["eval", "--store", teacher_store, "--model", "teacher:zzz"]) == 2
    assert "no teacher 'zzz'" in capsys.readouterr().err


def _hundred_shard_store(url: str, *, vocab: int = 32000, seq_len: int = 64, rps: int = 512) -> str:
    """100 shards laid out by `prepare`'s writer (one split per shard), rows of 3 interleaved domains, ~10% held
    out by document, with the row index; random tokens (incompressible, like real text after zstd)."""
    from chorus.commands.prepare import _CorpusWriter
    from chorus.store import CorpusManifest, TokenizerInfo, fingerprint
    from chorus.store.index import write_row_index

    rng = np.random.default_rng(0)
    store = Store.open(url, "w")
    writer = _CorpusWriter(store, seq_len, rps, "uint16")
    n = 100 * rps
    for i in range(n):
        writer.add([(rng.integers(2, vocab, seq_len, dtype=np.int32), np.ones(seq_len, np.uint16))], i % 3,
                   int(rng.random() < 0.1))
    split, domain = writer.close()
    tok = TokenizerInfo(name="synthetic", vocab_size=vocab, fingerprint=fingerprint("tok", vocab),
                        vocab_fingerprint=fingerprint("vocab", vocab), eos_id=0, pad_id=1)
    m = CorpusManifest(fingerprint=fingerprint("hundred", n), tokenizer=tok, seq_len=seq_len, num_rows=n,
                       rows_per_shard=rps, domains=("a", "b", "c"), num_tokens=n * seq_len,
                       split_rows={"train": int((split == 0).sum()), "valid": int((split == 1).sum())},
                       source={"synthetic": True}, created_by="test")
    write_row_index(store, split, domain, fingerprint=m.fingerprint)
    store.write_manifest(m)
    assert m.num_shards == 100
    return url


def test_eval_of_256_rows_reads_a_few_shards_and_then_nothing(tmp_path, monkeypatch):
    import fsspec.implementations.local as local

    url = _hundred_shard_store(str(tmp_path / "s.zarr"))
    store = Store.open(url, "r")
    shard_bytes = np.mean([sum(store.fs.size(store.chunk_path("corpus", name, s)) for name in
                               ("input_ids", "segment_ids", "domain", "split")) for s in range(100)])
    read = []
    cat_file = local.LocalFileSystem.cat_file  # every read of an object (``cat`` of many goes through it too)

    def counted(self, path, *a, **kw):
        out = cat_file(self, path, *a, **kw)
        read.append(len(out))
        return out

    monkeypatch.setattr(local.LocalFileSystem, "cat_file", counted)
    model = build_tiny_llama(str(tmp_path / "model"), 32000, seed=1, hidden=16, layers=1)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(model)
    first = evaluate.evaluate_model(student, url, max_rows=256, batch_size=64, teachers=[])
    assert first["rows"] == 256 and set(first["tokens"]) == {"a", "b", "c"}
    print(f"first evaluation read {sum(read):,} bytes = {sum(read) / shard_bytes:.2f} shards' worth")
    assert sum(read) <= 4 * shard_bytes, (sum(read), shard_bytes)  # everything: commits, index, chunks
    read.clear()
    second = evaluate.evaluate_model(student, url, max_rows=256, batch_size=64, teachers=[])
    assert sum(read) < shard_bytes / 100  # the next evaluation reads no chunk: its batches were kept
    assert second == first


def test_eval_pools_the_teachers_with_the_stored_blend(teacher_store, model_dir, tmp_path):
    """The diagnostics show the blend a student was trained on: a fitted blend that gives teacher 'a' all the
    weight in every domain makes the pooled target a's own (top-1 never differs from a's); blend=false pools evenly."""
    from chorus.store import BLEND_KEY

    url = copy_store(teacher_store, tmp_path / "s.zarr")
    store = Store.open(url, "a")
    store.group.attrs[BLEND_KEY] = {
        "teachers": ["a", "b", "c"], "operator": "mixture", "choice": "only-a", "weighting": "none", "beta": 1.0,
        "domain_weights": {d: {"a": 1.0, "b": 0.0, "c": 0.0} for d in store.manifest.domains}}
    fitted = eval_command.run(EvalConfig(store=url, model=model_dir, batch_size=16))["ensemble"]
    even = eval_command.run(EvalConfig(store=url, model=model_dir, batch_size=16, blend=False))["ensemble"]
    assert fitted["blend"] == "only-a" and "blend" not in even
    for d, ws in fitted["weights_per_domain"].items():
        assert ws == pytest.approx({"a": 1.0, "b": 0.0, "c": 0.0}), d
        assert even["weights_per_domain"][d] == pytest.approx({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}), d
    assert fitted["pooled_top1_differs"]["a"] == 0.0 and fitted["pooled_top1_differs"]["b"] > 0
    assert even["pooled_top1_differs"]["a"] > 0
