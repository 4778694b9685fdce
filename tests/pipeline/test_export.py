"""`chorus export` → `datasets.load_dataset` → `chorus import`: bit-identical round trips."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from chorus import cli
from chorus.commands import cache, export
from chorus.config import CacheConfig, ExportConfig, ImportConfig
from chorus.store import Store, decode_topk

from .conftest import assert_same_cache, read_cache


@pytest.mark.parametrize("fmt", ["parquet", "arrow"])
def test_export_load_dataset_import_round_trips_bit_identically(tmp_path, cached_store, store_copy, fmt):
    import datasets

    out = str(tmp_path / "export")
    files = export.run_export(ExportConfig(store=cached_store, teacher="tiny", out=out, format=fmt))
    ds = datasets.load_dataset(fmt, data_files=files, split="train").with_format("numpy")
    store = Store.open(cached_store, "r")
    m = store.manifest
    assert len(ds) == m.num_rows
    assert set(ds.column_names) == {"row", "input_ids", "segment_ids", "topk_ids", "topk_logprobs", "sample_ids",
                                    "sample_counts", "stats", "tail_logz"}
    arrays, _ = read_cache(cached_store, "tiny")
    np.testing.assert_array_equal(np.stack(ds["stats"]).astype(np.float16), arrays["stats"])  # the statistics (v2)
    np.testing.assert_array_equal(np.stack(ds["tail_logz"]), arrays["tail_logz"])
    ids, logp = decode_topk(arrays, store.teacher_manifest("tiny"))
    np.testing.assert_array_equal(ds["row"], np.arange(m.num_rows))
    np.testing.assert_array_equal(np.stack(ds["input_ids"]), store.read_rows("corpus", "input_ids", 0, m.num_rows))
    np.testing.assert_array_equal(np.stack(ds["topk_ids"]), ids)
    np.testing.assert_array_equal(np.stack(ds["topk_logprobs"]).astype(np.float32), logp)  # plain float16 log-probs
    assert (np.stack(ds["sample_counts"]).sum(-1) == 16).all()
    sidecar = json.load(open(os.path.join(out, "chorus.json")))
    assert sidecar["teacher"]["fingerprint"] == store.teacher_manifest("tiny").fingerprint

    export.run_import(ImportConfig(store=store_copy, src=out))
    assert_same_cache(read_cache(store_copy, "tiny"), read_cache(cached_store, "tiny"))
    imported = Store.open(store_copy, "r").teacher_manifest("tiny")
    assert imported.status == "complete"
    assert imported.fingerprint == store.teacher_manifest("tiny").fingerprint


def test_q8_cache_round_trips_through_export(tmp_path, store_copy, prepared_store, teacher_model):
    import shutil

    cache.run(CacheConfig(store=store_copy, teacher=teacher_model, name="q8", top_k=4, batch_size=8, value_codec="q8"))
    out = str(tmp_path / "export")
    export.run_export(ExportConfig(store=store_copy, teacher="q8", out=out))
    target = str(tmp_path / "target.zarr")
    shutil.copytree(prepared_store, target)
    export.run_import(ImportConfig(store=target, src=out, name="q8-copy"))
    a, ca = read_cache(store_copy, "q8")
    b, cb = read_cache(target, "q8-copy")
    assert_same_cache((a, {s: {**c, "unit": ""} for s, c in ca.items()}), (b, {s: {**c, "unit": ""} for s, c in cb.items()}))


def test_import_into_another_corpus_is_refused(tmp_path, cached_store, store_copy, capsys):
    out = str(tmp_path / "export")
    export.run_export(ExportConfig(store=cached_store, teacher="tiny", out=out))
    path = os.path.join(out, "chorus.json")
    meta = json.load(open(path))
    meta["teacher"]["corpus_fingerprint"] = "0" * 32
    json.dump(meta, open(path, "w"))
    rc = cli.main(["import", "--store", store_copy, "--src", out])
    err = capsys.readouterr().err
    assert rc == 2 and "another corpus" in err and "Traceback" not in err
    assert "tiny" not in Store.open(store_copy, "r").teacher_names()


def test_export_of_an_incomplete_cache_is_refused(tmp_path, store_copy, teacher_model, capsys):
    cache.run(CacheConfig(store=store_copy, teacher=teacher_model, name="half", top_k=2, batch_size=8, shard="0/2"))
    rc = cli.main(["export", "--store", store_copy, "--teacher", "half", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "incomplete" in err


def test_tampered_export_is_refused_before_anything_is_committed(tmp_path, cached_store, store_copy, capsys):
    """One value edited in an exported parquet file: import exits 2 with one line, commits no shard, and a
    rerun refuses again (it never reports the tampered copy as equal to the exported cache)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = str(tmp_path / "export")
    files = export.run_export(ExportConfig(store=cached_store, teacher="tiny", out=out, format="parquet"))
    victim = files[len(files) // 2]
    table = pq.read_table(victim)
    ids = table.column("topk_ids").to_pylist()
    ids[0][0][0] = (ids[0][0][0] + 1) % 300
    table = table.set_column(table.schema.get_field_index("topk_ids"), "topk_ids",
                             pa.array(ids, type=table.schema.field("topk_ids").type))
    pq.write_table(table, victim)
    capsys.readouterr()
    for _ in range(2):
        assert cli.main(["import", "--store", store_copy, "--src", out]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "Traceback" not in err[0]
        st = Store.open(store_copy, "r")
        assert "tiny" not in st.teacher_names() or (not st.commits("teachers/tiny")
                                                    and st.teacher_manifest("tiny").status != "complete")
