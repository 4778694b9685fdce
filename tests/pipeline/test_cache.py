"""`chorus cache`: targets against the teacher's own logits, samples, resume, shards, errors, S3."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from chorus import cli
from chorus.commands import cache
from chorus.config import CacheConfig
from chorus.store import (
    TAIL_BETAS,
    Store,
    decode_samples,
    decode_stats,
    decode_topk,
    decode_values,
    encode_values,
    value_params,
)
from tests.store.test_targets import dense_statistics, tail_logz_allowance

from .conftest import CACHE_ARGS, assert_same_cache, chorus_env, cli_args, read_cache


def _corpus_ids(url: str, rows: int | None = None) -> np.ndarray:
    store = Store.open(url, "r")
    m = store.manifest
    return store.read_rows("corpus", "input_ids", 0, rows or m.num_rows)


def _teacher_logprobs(model_dir: str, ids: np.ndarray, vocab: int, batch: int = CACHE_ARGS["batch_size"]) -> torch.Tensor:
    """The dense reference: fp32 log-softmax of the teacher's logits, batched as the cache batches them."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(ids), batch):
            logits = model(input_ids=torch.from_numpy(ids[i: i + batch].astype(np.int64))).logits
            out.append(torch.log_softmax(logits[..., :vocab].float(), dim=-1))
    return torch.cat(out)


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    rc = cli.main(argv)
    err = capsys.readouterr().err
    return rc, err


def _assert_one_line_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("chorus cache: error:")]
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]


# ---------------------------------------------------------------------------------------------- targets
def test_topk_equals_teacher_topk_of_log_softmax(cached_store, teacher_model):
    store = Store.open(cached_store, "r")
    manifest = store.teacher_manifest("tiny")
    vocab = store.manifest.tokenizer.vocab_size
    rows = 64
    arrays = {n: store.read_rows("teachers/tiny", n, 0, rows) for n in ("topk_ids", "topk_logprobs")}
    ids, logp = decode_topk(arrays, manifest)
    ref = _teacher_logprobs(teacher_model, _corpus_ids(cached_store, rows), vocab)
    ref_vals, ref_ids = torch.topk(ref, CACHE_ARGS["top_k"], dim=-1)
    ref_vals, ref_ids = ref_vals.numpy(), ref_ids.numpy()

    differ = ids != ref_ids  # allowed only where the two ids tie exactly in the teacher's distribution
    if differ.any():
        full = ref.numpy()
        r, p, _ = np.nonzero(differ)
        np.testing.assert_array_equal(np.take_along_axis(full[r, p], ids[differ][:, None], 1)[:, 0],
                                      np.take_along_axis(full[r, p], ref_ids[differ][:, None], 1)[:, 0])
    np.testing.assert_array_equal(logp, ref_vals.astype(np.float16).astype(np.float32))  # fp16 rounding, nothing more
    tail_store = 1.0 - np.exp(logp.astype(np.float64)).sum(-1)
    tail_ref = 1.0 - np.exp(ref_vals.astype(np.float64)).sum(-1)
    assert np.abs(tail_store - tail_ref).max() < 1e-3
    assert manifest.status == "complete" and manifest.top_k == 8 and manifest.num_samples == 16


def _assert_statistics_match(url: str, name: str, model_dir: str, rows: int, batch: int) -> tuple[dict, dict, np.ndarray]:
    """The cached statistics of the first ``rows`` rows against the dense ones of the teacher's own fp32 log-softmax;
    returns (decoded, exact, decoded top-k log-probs)."""
    store = Store.open(url, "r")
    manifest = store.teacher_manifest(name)
    assert manifest.format_version == 2 and manifest.tail_betas == TAIL_BETAS
    arrays = {n: store.read_rows(f"teachers/{name}", n, 0, rows) for n in ("topk_ids", "topk_logprobs", "stats", "tail_logz")}
    ids, topk = decode_topk(arrays, manifest)
    got = decode_stats(arrays, manifest, topk[..., -1])
    tokens = _corpus_ids(url, rows)
    ref = _teacher_logprobs(model_dir, tokens, manifest.vocab_size, batch=batch).double().numpy()
    truth = dense_statistics(ref, ids, np.roll(tokens, -1, axis=1).astype(np.int64), TAIL_BETAS)
    for f in ("log_tail", "entropy"):  # fp16 rounding (half an ulp: 2^-11 relative), and fp32 math
        np.testing.assert_allclose(got[f], truth[f], rtol=2.0**-11, atol=2e-6, err_msg=f)
    np.testing.assert_allclose(got["gold_logprob"][:, :-1], truth["gold_logprob"][:, :-1], rtol=2.0**-11, atol=2e-6)
    assert (got["gold_logprob"][:, -1] == 0).all()
    err = np.abs(got["tail_logz"] - truth["tail_logz"])
    allowed = tail_logz_allowance(stored_log_tail=got["log_tail"], true_log_tail=truth["log_tail"], stored_kth=topk[..., -1],
                                  true_tail_max=truth["tail_max"], n_tail=manifest.vocab_size - manifest.top_k,
                                  betas=TAIL_BETAS)
    assert (err <= allowed).all(), float((err - allowed).max())
    return got, truth, topk


def test_statistics_equal_the_teachers_own_logits(cached_store, teacher_model):
    from transformers import AutoModelForCausalLM

    rows = 64
    got, _, _ = _assert_statistics_match(cached_store, "tiny", teacher_model, rows, CACHE_ARGS["batch_size"])
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32).eval()
    tokens = torch.from_numpy(_corpus_ids(cached_store, rows).astype(np.int64))
    with torch.inference_mode():  # the model's own next-token loss, equal-sized batches: the mean of their means
        nll = np.mean([model(input_ids=x, labels=x).loss.item() for x in tokens.split(8)])
    assert abs(float(-got["gold_logprob"][:, :-1].astype(np.float64).mean()) - nll) < 1e-3


def test_q8_statistics_give_the_true_tail(tmp_path, store_copy, teacher_model):
    """A sharpened teacher (mean entropy ~2 nats) cached with 8-bit values: the tail from the statistics is
    exact to fp16, where 1 − Σ exp of the coarse top-k values is not."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_model)
    with torch.no_grad():
        model.lm_head.weight *= 30.0
    sharp = str(tmp_path / "sharp")
    model.save_pretrained(sharp)
    AutoTokenizer.from_pretrained(teacher_model).save_pretrained(sharp)
    cache.run(CacheConfig(store=store_copy, teacher=sharp, name="q8", top_k=4, batch_size=8, value_codec="q8"))
    got, truth, topk = _assert_statistics_match(store_copy, "q8", sharp, 48, 8)
    assert truth["entropy"].mean() < 3.0 and np.exp(truth["log_tail"]).min() < 0.05  # sharp: small tails exist
    tau_true = np.exp(truth["log_tail"])
    assert (np.abs(np.exp(got["log_tail"]) - tau_true) <= 0.02 * tau_true).all()
    tau_q8 = 1.0 - np.exp(topk.astype(np.float64)).sum(-1)
    assert np.abs(tau_q8 - tau_true).max() > 10 * np.abs(np.exp(got["log_tail"]) - tau_true).max()


def test_samples_sum_to_m_and_follow_the_teacher_distribution(cached_store, teacher_model):
    store = Store.open(cached_store, "r")
    manifest = store.teacher_manifest("tiny")
    vocab = store.manifest.tokenizer.vocab_size
    m = manifest.num_samples
    n = store.manifest.num_rows
    arrays = {k: store.read_rows("teachers/tiny", k, 0, n) for k in ("sample_ids", "sample_counts")}
    sids, counts = decode_samples(arrays, manifest)
    assert (counts.sum(-1) == m).all()
    used = counts > 0
    assert (np.diff(np.where(used, sids, vocab), axis=-1)[used[..., 1:]] > 0).all()  # unique ids, ascending

    p = torch.exp(_teacher_logprobs(teacher_model, _corpus_ids(cached_store), vocab)).double().numpy().reshape(-1, vocab)
    observed = np.zeros(vocab)
    np.add.at(observed, sids.reshape(-1), counts.reshape(-1))
    expected = m * p.sum(0)
    chi2 = ((observed - expected) ** 2 / expected).sum()  # sum of multinomials: E[chi2] <= vocab - 1
    assert chi2 < vocab + 6 * np.sqrt(2 * vocab), chi2

    order = np.argsort(-p, axis=1)  # by rank: the draws favour each position's likely tokens as much as they should
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(vocab)[None, :].repeat(len(p), 0), 1)
    flat_ids, flat_counts = sids.reshape(len(p), -1), counts.reshape(len(p), -1)
    drawn_rank = np.take_along_axis(rank, flat_ids, 1)
    p_sorted = np.take_along_axis(p, order, 1)
    for lo, hi in ((0, 1), (1, 2), (2, 4), (4, 16), (16, 64), (64, vocab)):
        o = flat_counts[(drawn_rank >= lo) & (drawn_rank < hi)].sum()
        q = p_sorted[:, lo:hi].sum(1)
        z = (o - m * q.sum()) / np.sqrt((m * q * (1 - q)).sum())
        assert abs(z) < 5, (lo, hi, z)


def test_padded_embedding_rows_are_dropped(tmp_path, store_copy, tokenizer_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    vocab = len(tok)
    torch.manual_seed(1)
    cfg = LlamaConfig(vocab_size=vocab + 20, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        model.lm_head.weight[vocab:] = 0.0
        model.lm_head.weight[vocab:, 0] = 50.0  # padded rows would dominate the softmax if they were kept
    padded = str(tmp_path / "padded")
    model.save_pretrained(padded)
    tok.save_pretrained(padded)
    cache.run(CacheConfig(store=store_copy, teacher=padded, name="padded", top_k=4, batch_size=8))
    store = Store.open(store_copy, "r")
    ids, logp = decode_topk({n: store.read_rows("teachers/padded", n, 0, 8) for n in ("topk_ids", "topk_logprobs")},
                            store.teacher_manifest("padded"))
    assert ids.max() < vocab
    ref = _teacher_logprobs(padded, _corpus_ids(store_copy, 8), vocab, batch=8)
    np.testing.assert_allclose(logp, torch.topk(ref, 4, -1).values.numpy(), atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("codec", ["fp16", "q8"])
def test_value_codecs_round_trip(codec):
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 7, 300)) * 4
    logp = torch.log_softmax(torch.from_numpy(logits), -1)
    vals = torch.topk(logp, 64, -1).values.float().numpy()
    params = value_params(codec)
    back = decode_values(encode_values(vals, codec, params), codec, params)
    if codec == "fp16":  # delta coding of the bit patterns is lossless: exactly fp16 rounding
        np.testing.assert_array_equal(back, vals.astype(np.float16).astype(np.float32))
    else:  # sqrt-companded 8 bits: fine steps where probability is large
        assert np.abs(np.exp(back) - np.exp(vals)).max() < 0.01
        assert np.abs(back - vals).max() < 0.1
    assert (np.diff(back, axis=-1) <= 0).all()  # still descending


def test_weights_fingerprint_is_deterministic_and_sensitive(teacher_model):
    from transformers import AutoModelForCausalLM

    from chorus.teacher.model import weights_fingerprint

    a = AutoModelForCausalLM.from_pretrained(teacher_model)
    b = AutoModelForCausalLM.from_pretrained(teacher_model)
    assert weights_fingerprint(a) == weights_fingerprint(b)
    with torch.no_grad():
        b.lm_head.weight[-1, -1] += 1.0  # the last element is always sampled
    assert weights_fingerprint(a) != weights_fingerprint(b)


def test_rerun_with_same_arguments_does_nothing(cached_store, teacher_model, capsys):
    before = read_cache(cached_store, "tiny")
    rc, err = _cli(cli_args(cached_store, teacher_model), capsys)
    assert rc == 0, err
    assert "0 of 50 shards to do" in err and "complete" in err and "B/token" in err
    assert_same_cache(before, read_cache(cached_store, "tiny"))


# ---------------------------------------------------------------------------------------------- resume and shards
def test_two_shard_processes_fill_the_same_store_as_one(store_copy, cached_store, teacher_model):
    # worker 1 in a subprocess (started first: it waits for worker 0 to create the cache), worker 0 in this process
    proc = subprocess.Popen([sys.executable, "-m", "chorus", *cli_args(store_copy, teacher_model), "--shard", "1/2"],
                            env=chorus_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        cache.run(CacheConfig(store=store_copy, teacher=teacher_model, shard="0/2", **CACHE_ARGS))
    finally:
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err.decode()
    assert "worker 1/2" in err.decode()
    assert_same_cache(read_cache(store_copy, "tiny"), read_cache(cached_store, "tiny"))
    assert Store.open(store_copy, "r").teacher_manifest("tiny").status == "complete"


@pytest.mark.parametrize("spec, expected", [("1/2", (1, 2)), (" 0 / 3 ", (0, 3)), (None, (0, 1))])
def test_shard_assignment_from_the_flag(spec, expected):
    assert cache.shard_assignment(spec, env={}) == expected


def test_shard_assignment_from_torchrun_env():
    assert cache.shard_assignment(None, env={"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == (3, 4)
    assert cache.shard_assignment("0/2", env={"RANK": "3", "WORLD_SIZE": "4"}) == (0, 2)


@pytest.mark.parametrize("spec", ["2/2", "1", "a/b", "-1/2", "0/0"])
def test_bad_shard_spec_is_refused(cached_store, teacher_model, capsys, spec):
    rc, err = _cli(cli_args(cached_store, teacher_model) + [f"--shard={spec}"], capsys)
    _assert_one_line_error(rc, err, "--shard")


@pytest.mark.slow  # > 20 s on a shared 2-core machine: three interpreters start torch
def test_torchrun_two_workers_on_cpu(store_copy, cached_store, teacher_model):
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    proc = subprocess.run([torchrun, "--nproc_per_node", "2", "--standalone", "-m", "chorus",
                           *cli_args(store_copy, teacher_model)],
                          env=chorus_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "worker 1/2" in proc.stderr and "worker 0/2" in proc.stderr
    assert_same_cache(read_cache(store_copy, "tiny"), read_cache(cached_store, "tiny"))


# ---------------------------------------------------------------------------------------------- errors
def test_tokenizer_with_another_vocabulary_is_refused(tmp_path, store_copy, teacher_model, capsys):
    from transformers import AutoTokenizer

    other = str(tmp_path / "other")
    shutil.copytree(teacher_model, other)
    tok = AutoTokenizer.from_pretrained(teacher_model)
    tok.add_tokens(["<not-in-the-store>"])
    tok.save_pretrained(other)
    rc, err = _cli(cli_args(store_copy, other), capsys)
    _assert_one_line_error(rc, err, "another vocabulary")


def test_tokenizer_with_the_same_vocabulary_is_accepted(tmp_path, store_copy, teacher_model, capsys):
    from tokenizers import normalizers
    from transformers import AutoTokenizer

    other = str(tmp_path / "same-vocab")
    shutil.copytree(teacher_model, other)
    tok = AutoTokenizer.from_pretrained(teacher_model)
    tok.backend_tokenizer.normalizer = normalizers.NFKC()
    tok.save_pretrained(other)
    rc, err = _cli(cli_args(store_copy, other, top_k=2, samples=0, batch_size=50), capsys)
    assert rc == 0, err
    assert "vocabulary is identical" in err


@pytest.mark.parametrize("k", ["0", "-3", "100000"])
def test_top_k_out_of_range_is_refused(cached_store, teacher_model, capsys, k):
    rc, err = _cli(cli_args(cached_store, teacher_model, top_k=k), capsys)
    _assert_one_line_error(rc, err, "--top-k")


def test_missing_teacher_directory_is_refused(cached_store, capsys):
    rc, err = _cli(cli_args(cached_store, "./no/such/teacher"), capsys)
    _assert_one_line_error(rc, err, "teacher './no/such/teacher' not found")


def test_store_without_corpus_is_refused(tmp_path, teacher_model, capsys):
    import zarr

    rc, err = _cli(cli_args(str(tmp_path / "nothing.zarr"), teacher_model), capsys)
    _assert_one_line_error(rc, err, "no chorus store", "chorus prepare")
    zarr.open_group(str(tmp_path / "bare.zarr"), mode="w", zarr_format=3)
    rc, err = _cli(cli_args(str(tmp_path / "bare.zarr"), teacher_model), capsys)
    _assert_one_line_error(rc, err, "chorus prepare")


def test_name_used_by_another_model_is_refused_unless_overwrite(tmp_path, cached_store, teacher_model, tokenizer_dir, capsys):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    store = str(tmp_path / "store.zarr")
    shutil.copytree(cached_store, store)
    other = str(tmp_path / "other-model")
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(7)
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2)).save_pretrained(other)
    tok.save_pretrained(other)
    args = cli_args(store, other, samples=0, batch_size=50)
    rc, err = _cli(args, capsys)
    _assert_one_line_error(rc, err, "other settings", "--overwrite", "weights_fingerprint")
    rc, err = _cli(args + ["--overwrite"], capsys)
    assert rc == 0, err
    m = Store.open(store, "r").teacher_manifest("tiny")
    assert m.model == other and m.status == "complete" and m.num_samples == 0
    assert sorted(Store.open(store, "r").array_names("teachers/tiny")) == ["stats", "tail_logz", "topk_ids", "topk_logprobs"]


def test_a_v1_cache_is_refused_until_overwritten_then_upgraded(tmp_path, cached_store, teacher_model, capsys):
    store = str(tmp_path / "store.zarr")
    shutil.copytree(cached_store, store)
    s = Store.open(store, "a")
    v1 = s.teacher_manifest("tiny").replace(format_version=1, tail_betas=(), fingerprint="a v1 cache")
    s.write_teacher_manifest(v1)  # as format v1 wrote it: no statistics
    assert not Store.open(store, "r").teacher_manifest("tiny").has_stats
    args = cli_args(store, teacher_model, samples=0, batch_size=50)
    rc, err = _cli(args, capsys)
    _assert_one_line_error(rc, err, "other settings", "format_version 1 → 2", "tail_betas", "--overwrite")
    rc, err = _cli(args + ["--overwrite"], capsys)
    assert rc == 0, err
    m = Store.open(store, "r").teacher_manifest("tiny")
    assert m.format_version == 2 and m.has_stats and m.status == "complete"


def test_nan_logits_name_the_row_and_commit_nothing_for_that_shard(tmp_path, store_copy, teacher_model, capsys):
    from transformers import AutoModelForCausalLM

    ids = _corpus_ids(store_copy)
    first_row = {}
    for r, row in enumerate(ids):
        for t in np.unique(row):
            first_row.setdefault(int(t), r)
    token, row = next((t, r) for t, r in sorted(first_row.items(), key=lambda kv: kv[1]) if r >= 20)
    model = AutoModelForCausalLM.from_pretrained(teacher_model)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")  # rows holding this token go NaN from it on
    broken = str(tmp_path / "broken")
    model.save_pretrained(broken)
    shutil.copy(os.path.join(teacher_model, "tokenizer.json"), broken)
    shutil.copy(os.path.join(teacher_model, "tokenizer_config.json"), broken)
    rc, err = _cli(cli_args(store_copy, broken), capsys)
    _assert_one_line_error(rc, err, "NaN or inf", f"row {row} ")  # attention spreads NaN over the whole row
    committed = Store.open(store_copy, "r").commits("teachers/tiny")
    bad_shard = row // 8
    assert bad_shard not in committed
    assert set(range(bad_shard)) <= set(committed)


def test_out_of_memory_suggests_a_smaller_batch_size(store_copy, teacher_model, monkeypatch, capsys):
    from transformers import LlamaForCausalLM

    def oom(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(LlamaForCausalLM, "forward", oom)
    rc, err = _cli(cli_args(store_copy, teacher_model), capsys)
    _assert_one_line_error(rc, err, "out of memory", "--batch-size 2")


# ---------------------------------------------------------------------------------------------- S3
@pytest.fixture
def s3_endpoint(monkeypatch):
    pytest.importorskip("s3fs")
    from moto.server import ThreadedMotoServer

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_SESSION_TOKEN": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    import fsspec

    fsspec.filesystem("s3", client_kwargs={"endpoint_url": url}, skip_instance_cache=True).mkdir("chorus-test")
    yield url
    server.stop()


def test_cache_into_s3_equals_local(s3_endpoint, tmp_path, corpus_file, tokenizer_dir, teacher_model):
    from chorus.commands import prepare
    from chorus.config import PrepareConfig

    opts = {"client_kwargs": {"endpoint_url": s3_endpoint}}
    caches = []
    for url, so in (("s3://chorus-test/store.zarr", opts), (str(tmp_path / "local.zarr"), {})):
        prepare.run(PrepareConfig(dataset=corpus_file, tokenizer=tokenizer_dir, out=url, seq_len=32, domain_field="domain",
                                  valid_fraction=0.2, rows_per_shard=8, max_docs=24, storage_options=so))
        cache.run(CacheConfig(store=url, teacher=teacher_model, storage_options=so, **CACHE_ARGS))
        assert Store.open(url, "r", so).teacher_manifest("tiny").status == "complete"
        caches.append(read_cache(url, "tiny", so))
    assert len(caches[0][1]) > 1  # several shards
    assert_same_cache(*caches)


def test_device_map_placement_gives_the_same_cache(store_copy, cached_store, teacher_model):
    """--device-map auto (accelerate's big-model placement; here every layer lands on the CPU) runs the same
    chunked head on the head's device: the cache is bit-identical to the single-device one."""
    pytest.importorskip("accelerate")
    cache.run(CacheConfig(store=store_copy, teacher=teacher_model, device="cpu", device_map="auto", **CACHE_ARGS))
    assert_same_cache(read_cache(store_copy, "tiny"), read_cache(cached_store, "tiny"))


def test_device_map_without_accelerate_is_one_line(store_copy, teacher_model, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "accelerate", None)  # import fails as if it were not installed
    rc, err = _cli([*cli_args(store_copy, teacher_model), "--device-map", "auto"], capsys)
    _assert_one_line_error(rc, err, "accelerate")
