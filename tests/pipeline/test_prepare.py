"""`chorus prepare`: deterministic packing and fingerprints, and one-line errors for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from chorus.cli import main
from chorus.commands import prepare
from chorus.config import PrepareConfig
from chorus.errors import ChorusError
from chorus.store import Store


def _prepare(corpus, tok, out, **kw):
    kw.setdefault("seq_len", 32)
    kw.setdefault("domain_field", "domain")
    kw.setdefault("rows_per_shard", 8)
    return prepare.run(PrepareConfig(dataset=str(corpus), tokenizer=tok, out=str(out), **kw))


def _arrays(url: str) -> dict[str, np.ndarray]:
    s = Store.open(url, "r")
    n = s.manifest.num_rows
    return {name: s.read_rows("corpus", name, 0, n) for name in ("input_ids", "segment_ids", "domain", "split")}


def test_packing_is_exact_and_reversible(prepared_store, documents, tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    store = Store.open(prepared_store, "r")
    m = store.manifest
    a = _arrays(prepared_store)
    assert a["input_ids"].shape == (m.num_rows, 32) and m.domains == ("code", "prose", "names")
    assert m.split_rows["train"] + m.split_rows["valid"] == m.num_rows and m.split_rows["valid"] > 0
    # every document of each (split, domain) stream comes back, in order, from the real tokens of its rows
    for split in (0, 1):
        for d, name in enumerate(m.domains):
            rows = (a["split"] == split) & (a["domain"] == d)
            real = a["segment_ids"][rows] > 0
            stream = a["input_ids"][rows][real]
            docs = [x for x in documents if x["domain"] == name and prepare.is_valid_doc(x["text"], 0.2) == bool(split)]
            expected = np.concatenate([tok(x["text"], add_special_tokens=False)["input_ids"] + [m.tokenizer.eos_id] for x in docs])
            np.testing.assert_array_equal(stream, expected)
    assert m.num_tokens == int((a["segment_ids"] > 0).sum())
    # padding only at the end of a row, segment ids restart at 1 in every row
    segs = a["segment_ids"].astype(np.int64)
    assert (segs[:, 0] == 1).all()
    assert (np.diff(segs, axis=1) >= 0)[segs[:, 1:] > 0].all()


def test_same_inputs_same_fingerprint_and_bytes(tmp_path, corpus_file, tokenizer_dir):
    m1 = _prepare(corpus_file, tokenizer_dir, tmp_path / "a.zarr")
    m2 = _prepare(corpus_file, tokenizer_dir, tmp_path / "b.zarr")
    assert m1.fingerprint == m2.fingerprint
    a, b = _arrays(str(tmp_path / "a.zarr")), _arrays(str(tmp_path / "b.zarr"))
    for name in a:
        assert a[name].tobytes() == b[name].tobytes()
    sa, sb = Store.open(str(tmp_path / "a.zarr")), Store.open(str(tmp_path / "b.zarr"))
    assert sa.commits("corpus") == {k: v.replace() for k, v in sb.commits("corpus").items()}  # same checksums


def test_one_character_changes_the_fingerprint(tmp_path, documents, corpus_file, tokenizer_dir):
    changed = [dict(d) for d in documents]
    changed[7]["text"] = changed[7]["text"][:-1] + ("x" if changed[7]["text"][-1] != "x" else "y")
    path = tmp_path / "changed.jsonl"
    path.write_text("".join(json.dumps(d) + "\n" for d in changed))
    base = _prepare(corpus_file, tokenizer_dir, tmp_path / "a.zarr")
    assert _prepare(path, tokenizer_dir, tmp_path / "b.zarr").fingerprint != base.fingerprint
    assert _prepare(corpus_file, tokenizer_dir, tmp_path / "c.zarr", seq_len=31).fingerprint != base.fingerprint


def test_rerun_is_a_no_op_and_a_different_corpus_is_refused(tmp_path, corpus_file, tokenizer_dir):
    out = tmp_path / "s.zarr"
    first = _prepare(corpus_file, tokenizer_dir, out)
    assert _prepare(corpus_file, tokenizer_dir, out).fingerprint == first.fingerprint
    with pytest.raises(ChorusError, match="exists with another corpus.*--overwrite"):
        _prepare(corpus_file, tokenizer_dir, out, seq_len=16)
    assert Store.open(str(out)).manifest.fingerprint == first.fingerprint  # untouched
    assert _prepare(corpus_file, tokenizer_dir, out, seq_len=16, overwrite=True).seq_len == 16


def test_one_domain_per_file_and_formats(tmp_path, documents, tokenizer_dir):
    import pyarrow as pa
    import pyarrow.parquet as pq

    d = tmp_path / "dir"
    d.mkdir()
    code = [x for x in documents if x["domain"] == "code"]
    prose = [x for x in documents if x["domain"] == "prose"]
    names = [x for x in documents if x["domain"] == "names"]
    (d / "code.jsonl").write_text("".join(json.dumps({"text": x["text"]}) + "\n" for x in code))
    pq.write_table(pa.table({"text": [x["text"] for x in prose]}), d / "prose.parquet")
    (d / "names.txt").write_text("\n\n".join(x["text"] for x in names))
    m = _prepare(d, tokenizer_dir, tmp_path / "s.zarr", domain_field=None, valid_fraction=0.0)
    assert m.domains == ("code", "names", "prose")  # sorted file order
    a = _arrays(str(tmp_path / "s.zarr"))
    assert set(np.unique(a["domain"])) == {0, 1, 2}


def test_memory_and_s3_outputs_match_local(tmp_path, corpus_file, tokenizer_dir, s3_bucket):
    local = _prepare(corpus_file, tokenizer_dir, tmp_path / "s.zarr", rows_per_shard=64)
    mem_url = f"memory://prep-{uuid.uuid4().hex}"
    assert _prepare(corpus_file, tokenizer_dir, mem_url, rows_per_shard=64).fingerprint == local.fingerprint
    bucket, opts = s3_bucket
    s3 = prepare.run(PrepareConfig(dataset=corpus_file, tokenizer=tokenizer_dir, out=f"{bucket}/s.zarr", seq_len=32,
                                   domain_field="domain", rows_per_shard=64, storage_options=opts))
    assert s3.fingerprint == local.fingerprint
    s = Store.open(f"{bucket}/s.zarr", "r", opts)
    np.testing.assert_array_equal(s.read_rows("corpus", "input_ids", 0, s.manifest.num_rows),
                                  _arrays(str(tmp_path / "s.zarr"))["input_ids"])


def test_cli_error_is_one_line_without_traceback(tmp_path, tokenizer_dir):
    """The real process: exit code 2, one line on stderr, no traceback."""
    proc = subprocess.run([sys.executable, "-m", "chorus", "prepare", "--dataset", str(tmp_path / "nope.jsonl"),
                           "--tokenizer", tokenizer_dir, "--out", str(tmp_path / "o.zarr")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"chorus prepare: error: dataset '{tmp_path / 'nope.jsonl'}' not found: no such file or directory"]


@pytest.mark.parametrize(
    "case,expect",
    [
        ("missing_file", "not found: no such file"),
        ("empty", "has no documents"),
        ("no_field", "text field 'body' not in dataset"),
        ("bad_tokenizer", "tokenizer './no/such/tok' not found"),
        ("seq_len", "--seq-len must be at least 2"),
        ("bad_url", "cannot use store URL 'nosuchproto://b/s': Protocol not known"),
        ("exists", "exists with another corpus"),
        ("bad_key", "unknown prepare config key 'seq_lenn'"),
        ("bad_value", "prepare key 'seq_len': expected an integer, got 'abc'"),
    ],
)
def test_bad_input_is_one_line_and_nothing_marked_complete(tmp_path, corpus_file, tokenizer_dir, case, expect, capsys):
    out = tmp_path / "out.zarr"
    args = {"--dataset": corpus_file, "--tokenizer": tokenizer_dir, "--out": str(out), "--seq-len": "32"}
    extra = []
    if case == "missing_file":
        args["--dataset"] = str(tmp_path / "nope.jsonl")
    elif case == "empty":
        (tmp_path / "empty.jsonl").write_text("")
        args["--dataset"] = str(tmp_path / "empty.jsonl")
    elif case == "no_field":
        args["--text-field"] = "body"
    elif case == "bad_tokenizer":
        args["--tokenizer"] = "./no/such/tok"
    elif case == "seq_len":
        args["--seq-len"] = "1"
    elif case == "bad_url":
        args["--out"] = "nosuchproto://b/s"
    elif case == "exists":
        _prepare(corpus_file, tokenizer_dir, out)
        args["--seq-len"] = "16"
    elif case == "bad_key":
        extra = ["seq_lenn=3"]
    elif case == "bad_value":
        args["--seq-len"] = "abc"
    code = main(["prepare", *[x for kv in args.items() for x in kv], *extra])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = [line for line in err.strip().splitlines() if line.strip() and not line.startswith("prepare")]
    assert len(lines) == 1 and expect in lines[0], err
    if case != "exists" and Path(out).exists():
        with pytest.raises(ChorusError):  # half-written: no manifest, so no reader accepts it
            _ = Store.open(str(out), "r").manifest


def test_shards_hold_one_split_and_the_row_index_is_written(prepared_store):
    from chorus.store.index import read_row_index

    store = Store.open(prepared_store, "r")
    m = store.manifest
    a = _arrays(prepared_store)
    rps = m.rows_per_shard
    mixed = [s for s in range(m.num_shards) if len(np.unique(a["split"][s * rps:(s + 1) * rps])) > 1]
    assert set(mixed) <= {m.num_shards - 2, m.num_shards - 1}  # only the splits' leftovers, at the end
    split, domain = read_row_index(store, m)
    np.testing.assert_array_equal(split, a["split"])
    np.testing.assert_array_equal(domain, a["domain"])


def test_a_rerun_on_unchanged_files_does_not_tokenize(tmp_path, corpus_file, tokenizer_dir, monkeypatch):
    out = tmp_path / "s.zarr"
    first = _prepare(corpus_file, tokenizer_dir, out)

    def no_build(*a, **kw):
        raise AssertionError("re-tokenized")

    monkeypatch.setattr(prepare, "_build", no_build)
    assert _prepare(corpus_file, tokenizer_dir, out).fingerprint == first.fingerprint
    with pytest.raises(AssertionError, match="re-tokenized"):  # other settings: compared the slow way
        _prepare(corpus_file, tokenizer_dir, out, valid_fraction=0.3)


def test_the_store_keeps_a_checked_copy_of_its_tokenizer(tmp_path, corpus_file, tokenizer_dir, s3_bucket, capsys):
    """The copy reloads to the same fingerprint with the original gone, also from S3; a damaged copy is named by
    verify and not used (the directory prepare read is used instead, with a warning)."""
    import shutil

    from chorus.commands.report import verify_command
    from chorus.store.tokenizer import load_tokenizer, store_tokenizer, tokenizer_info

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    text = "def return import class while yield lambda"
    want = load_tokenizer(str(tok)).encode(text)
    url = str(tmp_path / "s.zarr")
    m = _prepare(corpus_file, str(tok), url)
    bucket, opts = s3_bucket
    prepare.run(PrepareConfig(dataset=corpus_file, tokenizer=str(tok), out=f"{bucket}/tok.zarr", seq_len=32,
                              domain_field="domain", rows_per_shard=8, storage_options=opts))
    shutil.rmtree(tok)
    for store in (Store.open(url, "r"), Store.open(f"{bucket}/tok.zarr", "r", opts)):
        loaded, source = store_tokenizer(store, m)
        assert source == f"{store.url}/tokenizer"
        assert tokenizer_info(loaded, "x").fingerprint == m.tokenizer.fingerprint and loaded.encode(text) == want
    assert verify_command(url) == 0
    raw = bytearray((tmp_path / "s.zarr" / "tokenizer" / "tokenizer.json").read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    (tmp_path / "s.zarr" / "tokenizer" / "tokenizer.json").write_bytes(bytes(raw))
    capsys.readouterr()
    assert main(["verify", url]) == 2 and "tokenizer.json" in capsys.readouterr().err
    shutil.copytree(tokenizer_dir, tok)  # where prepare read it: used instead of the damaged copy
    loaded, source = store_tokenizer(Store.open(url, "r"), m)
    assert source == str(tok) and loaded.encode(text) == want
    assert "does not match its checksum" in capsys.readouterr().err


def test_rerunning_prepare_adds_the_tokenizer_copy_to_an_older_store(tmp_path, corpus_file, tokenizer_dir, capsys):
    import shutil

    from chorus.store.tokenizer import store_tokenizer

    url = str(tmp_path / "s.zarr")
    m = _prepare(corpus_file, tokenizer_dir, url)
    shutil.rmtree(tmp_path / "s.zarr" / "tokenizer")  # as a store prepared before the copy existed
    assert store_tokenizer(Store.open(url, "r"), m)[1] == tokenizer_dir
    capsys.readouterr()
    assert _prepare(corpus_file, tokenizer_dir, url).fingerprint == m.fingerprint
    assert "nothing to do; added a copy of its tokenizer" in capsys.readouterr().err
    assert store_tokenizer(Store.open(url, "r"), m)[1] == f"{url}/tokenizer"
    _prepare(corpus_file, tokenizer_dir, url)
    assert "added" not in capsys.readouterr().err
