"""Cross-tokenizer teachers: mapped onto the store's positions and vocabulary, checked against the teacher's own logits.

Tokenizers are trained here with `tokenizers` (nothing downloaded): the store's byte-level BPE (300 tokens), the same
tokenizer under another id order, a SentencePiece-style BPE ("▁", byte fallback, 420 tokens) and a byte-level BPE of
another size (520 tokens, another segmentation)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from chorus.config import CacheConfig
from chorus.errors import ChorusError
from chorus.pipeline import cache
from chorus.pipeline._cross import METHOD, CrossMap, TokenText
from chorus.storage import Store, decode_stats, decode_topk
from chorus.storage._manifest import no_target
from tests.conftest import build_tiny_llama, build_tokenizer

from .conftest import CACHE_ARGS, assert_same_cache, read_cache


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread_for_the_module():
    """The module's fixtures build models and caches before the per-test thread limit applies."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------- tokenizers
def _save_fast(tok, out: str) -> str:
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>").save_pretrained(out)
    return out


def permuted_tokenizer(src: str, out: str, seed: int = 0) -> tuple[str, np.ndarray]:
    """The tokenizer in ``src`` with its ids shuffled: perm[store id] = teacher id."""
    from tokenizers import Tokenizer

    spec = json.loads(open(os.path.join(src, "tokenizer.json")).read())
    n = len(spec["model"]["vocab"])
    perm = np.random.default_rng(seed).permutation(n)
    spec["model"]["vocab"] = {t: int(perm[i]) for t, i in spec["model"]["vocab"].items()}
    for a in spec["added_tokens"]:
        a["id"] = int(perm[a["id"]])
    return _save_fast(Tokenizer.from_str(json.dumps(spec)), out), perm


def sentencepiece_tokenizer(out: str, texts: list[str], vocab_size: int = 420) -> str:
    """A Llama-style BPE: spaces as "▁" with a dummy prefix, byte-fallback tokens <0x00>..<0xFF>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>", "<pad>"],
                                                       show_progress=False))
    spec = json.loads(tok.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    return _save_fast(Tokenizer.from_str(json.dumps(spec)), out)


def _teacher(out: str, tokenizer: str, seed: int) -> str:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer)
    build_tiny_llama(out, len(tok), seed=seed)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def teachers(tmp_path_factory, documents, tokenizer_dir, teacher_model) -> dict:
    """name → teacher directory (tiny random Llama + its tokenizer); "perm": the store id → teacher id permutation."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("cross")
    texts = [d["text"] for d in documents]
    perm_tok, perm = permuted_tokenizer(tokenizer_dir, str(root / "perm-tok"))
    permuted = str(root / "permuted")
    model = AutoModelForCausalLM.from_pretrained(teacher_model, dtype=torch.float32)
    inv = torch.from_numpy(np.argsort(perm))
    with torch.no_grad():  # teacher row perm[u] is the store's row u: the same network in other ids
        for m in (model.get_input_embeddings(), model.get_output_embeddings()):
            m.weight.copy_(m.weight[inv])
    model.save_pretrained(permuted)
    AutoTokenizer.from_pretrained(perm_tok).save_pretrained(permuted)
    sp = sentencepiece_tokenizer(str(root / "sp-tok"), texts)
    bpe = build_tokenizer(str(root / "bpe-tok"), texts, vocab_size=520)
    return {"permuted": permuted, "perm": perm, "sp": _teacher(str(root / "sp"), sp, 1),
            "bpe520": _teacher(str(root / "bpe520"), bpe, 2)}


@pytest.fixture(scope="module")
def cross_store(tmp_path_factory, documents, tokenizer_dir, teacher_model, teachers) -> str:
    """A small store (36 documents, rows of 32 tokens) holding the same-tokenizer teacher "tiny" and the
    cross-tokenizer teachers "perm", "sp" and "bpe520" side by side."""
    from chorus.config import PrepareConfig
    from chorus.pipeline import prepare

    root = tmp_path_factory.mktemp("cross-store")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in documents[:36]))
    url = str(root / "store.zarr")
    prepare.run(PrepareConfig(dataset=str(data), tokenizer=tokenizer_dir, out=url, seq_len=32, domain_field="domain",
                              valid_fraction=0.2, rows_per_shard=8))
    _cache(url, teacher_model, "tiny")
    for name, key in (("perm", "permuted"), ("sp", "sp"), ("bpe520", "bpe520")):
        _cache(url, teachers[key], name)
    return url


def _cache(store: str, teacher: str, name: str, **kw) -> None:
    cache.run(CacheConfig(store=store, teacher=teacher, **{**CACHE_ARGS, "name": name, **kw}))


def _real(url: str) -> np.ndarray:
    store = Store.open(url, "r")
    seg = store.read_rows("corpus", "segment_ids", 0, store.manifest.num_rows)
    real = np.zeros(seg.shape, dtype=bool)
    real[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] > 0)
    return real


# ---------------------------------------------------------------------------------------------- exactness
def test_store_tokenizer_under_another_id_order_gives_bit_identical_targets(cross_store):
    """The same network with its vocabulary shuffled, cached through the cross-tokenizer path, writes exactly the
    bytes of the same-tokenizer cache at every real position (ids already mapped back to the store's)."""
    m = Store.open(cross_store, "r").teacher_manifest("perm")
    assert m.cross_tokenizer and m.tokenizer_mapping["vocab"]["permutation"]
    assert m.tokenizer_mapping["coverage"] == 1.0
    ref, _ = read_cache(cross_store, "tiny")
    got, _ = read_cache(cross_store, "perm")
    real = _real(cross_store)
    for name in ("topk_ids", "topk_logprobs", "stats", "tail_logz", "sample_ids", "sample_counts"):
        np.testing.assert_array_equal(got[name][real], ref[name][real], err_msg=name)


def _dense_reference(cmap: CrossMap, logp: np.ndarray, t_ids: list[int], t_surf: list[bytes], phantom: int,
                     s_surf: list[bytes], s_ids: list[int]) -> dict[int, tuple[np.ndarray, float]]:
    """Store position i → (the mapped log-probs over the store vocabulary, the teacher's probability of the gold
    token's text), from the teacher's dense log-probs
    ``logp`` (Mt, Vt) on its own tokens ``t_ids`` (text then EOS), position by position, with the map's tables
    (where each piece of teacher text goes: ``cmap.spreads``) — the rule of _cross.py written out densely."""
    t_end = np.cumsum([len(x) for x in t_surf]) - phantom
    t_start = t_end - np.array([len(x) for x in t_surf])
    s_start = np.concatenate([[0], np.cumsum([len(x) for x in s_surf])])  # store token k starts at s_start[k]
    text_len = int(s_start[-1])
    out = {}

    def add(q: np.ndarray, spread: int, mass: float) -> None:
        ids, w = cmap.spreads[spread]  # spread 0: unplaced (no ids)
        q[ids] += mass * w

    for i in range(len(s_surf)):  # position i predicts store token i + 1 (the EOS after the last text token)
        c, c_end = int(s_start[i + 1]), int(s_start[i + 2]) if i + 2 < len(s_start) else text_len
        j = len(t_surf) if i + 1 == len(s_surf) else int(np.flatnonzero(t_end > c)[0])  # teacher token holding c
        if j == 0:
            continue  # inside the document's first teacher token: nothing predicts it
        cut = 0 if j == len(t_surf) else c - int(t_start[j])
        p = np.exp(logp[j - 1])
        q = np.zeros(cmap.store_vocab)
        z = 1.0
        if cut == 0:
            for v in range(len(p)):
                add(q, cmap.teacher_spread[v], p[v])
            move = cmap.teacher_spread[t_ids[j]]
        else:  # the teacher's distribution given the bytes of its token before the position
            pre = t_surf[j][:cut]
            ext = [v for v in range(len(p)) if len(cmap.teacher_text.surfaces[v] or b"") > cut
                   and cmap.teacher_text.surfaces[v][:cut] == pre]
            z = sum(p[v] for v in ext)
            for v in ext:
                add(q, cmap.spread_id(pre, cmap.teacher_text.surfaces[v][cut:]), p[v] / z)
            move = cmap.spread_id(pre, t_surf[j][cut:])
        b = j if j == len(t_surf) else int(np.flatnonzero(t_end >= c_end)[0])
        last = logp[b - 1, t_ids[b]]
        if b < len(t_surf) and t_end[b] > c_end:  # the gold ends inside T_b: P(the text there starts with its bytes)
            head = t_surf[b][: c_end - int(t_start[b])]
            last = np.log(sum(np.exp(logp[b - 1, v]) for v in range(logp.shape[1])
                              if (cmap.teacher_text.surfaces[v] or b"").startswith(head)))
        gold_text = np.exp(sum(logp[r - 1, t_ids[r]] for r in range(j, b)) + last) / z
        ids, w = cmap.spreads[move]
        removed = np.minimum(gold_text * w, q[ids])
        q[ids] -= removed
        gold = s_ids[i + 1]
        q[gold] += gold_text
        q[gold] += max(0.0, 1.0 - q.sum())  # what the map could not place: the hard label
        with np.errstate(divide="ignore"):
            out[i] = np.log(q / q.sum()), gold_text
    return out


@pytest.mark.parametrize("kind", ["sp", "bpe520"])
def test_mapped_targets_match_the_teachers_own_dense_logits(teachers, tokenizer_dir, documents, kind):
    """Whole documents in rows of their own: every mapped target (top-k, gold log-prob, entropy, tail) equals the
    one built position by position from the teacher's own dense logits on its own tokens; the gold-token NLL of
    the mapped targets is measured against the teacher's own NLL per byte of the same text."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chorus.pipeline._cross_targets import cross_targets
    from chorus.pipeline._teacher import load_teacher
    from chorus.storage import TAIL_BETAS

    s_tok, t_tok = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(teachers[kind])
    docs = [d["text"] for d in documents[:3]]
    enc = [s_tok(d, add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id] for d in docs]
    cmap = CrossMap(TokenText.of(t_tok, kind), TokenText.of(s_tok, "store"), len(s_tok))
    length = max(len(e) for e in enc) + 1
    ids = np.full((len(docs), length), s_tok.pad_token_id, dtype=np.int64)
    segs = np.zeros((len(docs), length), dtype=np.int64)
    for r, e in enumerate(enc):
        ids[r, : len(e)], segs[r, : len(e)] = e, 1
    teacher = load_teacher(teachers[kind], vocab_size=len(t_tok), device=torch.device("cpu"), dtype=torch.float32,
                           revision=None, trust_remote_code=False, tokenizer_match="cross")
    with torch.inference_mode():
        got = cross_targets(teacher, cmap, ids, segs, top_k=8, num_samples=0, seed=0, row_start=0, tail_betas=TAIL_BETAS)
    model = AutoModelForCausalLM.from_pretrained(teachers[kind], dtype=torch.float32).eval()
    covered = real = 0
    text_bits = text_bytes = native_bits = native_bytes = 0.0
    for r, doc in enumerate(docs):
        t_ids = t_tok(doc, add_special_tokens=False)["input_ids"] + [t_tok.eos_token_id]
        t_surf = [cmap.teacher_text.surfaces[v] or b"" for v in t_ids[:-1]]
        phantom = len(b"".join(t_surf)) - len(doc.encode())
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([t_ids])).logits[0].double(), -1).numpy()
        native_bits -= sum(logp[k - 1, t_ids[k]] for k in range(1, len(t_ids))) / np.log(2)
        native_bytes += len(doc.encode()) - len(t_surf[0]) + phantom  # the first token has no prediction
        s_surf = [cmap.store_text.surfaces[u] for u in enc[r][:-1]]
        ref = _dense_reference(cmap, logp, t_ids, t_surf, phantom, s_surf, enc[r])
        ent = got["entropy"][r].numpy()
        for i in range(len(enc[r]) - 1):
            real += 1
            if i not in ref:
                assert no_target(ent[i])
                continue
            covered += 1
            want, gold_text = ref[i]
            top = np.sort(want)[::-1][:8]  # in probabilities: fp32 leaves ~1e-8 where the dense sum has exactly 0
            np.testing.assert_allclose(np.exp(got["topk_logprobs"][r, i].numpy()), np.exp(top), atol=1e-6)
            gold = enc[r][i + 1]
            np.testing.assert_allclose(got["gold_logprob"][r, i].item(), want[gold], atol=2e-4)  # fp32 sums
            pw = np.exp(want)
            np.testing.assert_allclose(ent[i], -(pw[pw > 0] * want[pw > 0]).sum(), atol=1e-4)
            text_bits -= np.log2(gold_text)
            text_bytes += len(cmap.store_text.surfaces[gold] or b"")
    assert covered / real > 0.9
    # the teacher's probability of each gold store token's text, chained along the store's positions, against its
    # own NLL on its own tokens: equal if the alignment were exact (the inside-token conditioning is not)
    ratio = (text_bits / text_bytes) / (native_bits / native_bytes)
    print(f"{kind}: coverage {covered / real:.3f}; teacher's gold-text bits/byte along the store's positions "
          f"{text_bits / text_bytes:.3f} vs its own {native_bits / native_bytes:.3f}")
    assert 0.7 < ratio < 1.3


@pytest.mark.parametrize("kind", ["sp", "bpe520"])
def test_other_tokenizers_cache_distributions_with_coverage_recorded(cross_store, kind, capsys):
    from chorus.storage.report import inspect_command, verify_command

    store = Store.open(cross_store, "r")
    m = store.teacher_manifest(kind)
    assert m.cross_tokenizer and m.status == "complete"
    assert m.tokenizer_mapping["method"] == METHOD and m.tokenizer_mapping["tokenizer"]["name"]
    arrays, _ = read_cache(cross_store, kind)
    ids, logp = decode_topk(arrays, m)
    st = decode_stats(arrays, m, logp[..., -1])
    real = _real(cross_store)
    masked = no_target(st["entropy"])
    cov = real & ~masked
    assert cov.sum() / real.sum() == pytest.approx(m.tokenizer_mapping["coverage"])
    assert m.tokenizer_mapping["coverage"] > 0.9
    total = np.exp(logp[cov].astype(np.float64)).sum(-1) + np.exp(st["log_tail"][cov].astype(np.float64))
    np.testing.assert_allclose(total, 1.0, atol=5e-3)  # top-k + exact tail mass: one distribution over the store's
    gold = np.roll(store.read_rows("corpus", "input_ids", 0, store.manifest.num_rows), -1, axis=1)
    assert (ids[masked][:, 0] == gold[masked]).all()  # no target: the hard label
    assert verify_command(cross_store) == 0
    inspect_command(cross_store)
    out = capsys.readouterr().out
    assert f"{100 * m.tokenizer_mapping['coverage']:.1f}% of positions have a target" in out


def test_fingerprint_covers_the_teachers_tokenizer_and_method(cross_store, teachers, tmp_path):
    from chorus.pipeline.cache import _manifest

    m = Store.open(cross_store, "r").teacher_manifest("sp")
    assert m.tokenizer_mapping["version"] >= 1
    corpus = Store.open(cross_store, "r").manifest
    args = (CacheConfig(store=cross_store, teacher=teachers["sp"], **{**CACHE_ARGS, "name": "sp"}), "sp", corpus)

    class T:
        dtype, weights_fingerprint, model_id, revision, device = torch.float32, "w", "sp", "local", torch.device("cpu")

    base = dict(m.tokenizer_mapping)
    fps = {_manifest(*args, T(), m.value_params, cross=c).fingerprint for c in
           (base, {**base, "version": 99}, {**base, "method": "other"},
            {**base, "tokenizer": {**base["tokenizer"], "fingerprint": "x"}})}
    assert len(fps) == 4


def test_lossy_teacher_tokenizer_is_refused(cross_store, tmp_path, teachers):
    from tokenizers import Tokenizer, normalizers

    lossy = str(tmp_path / "lossy")
    shutil.copytree(teachers["bpe520"], lossy)
    tok = Tokenizer.from_file(os.path.join(lossy, "tokenizer.json"))
    tok.normalizer = normalizers.Lowercase()
    tok.save(os.path.join(lossy, "tokenizer.json"))
    url = str(tmp_path / "store.zarr")
    shutil.copytree(cross_store, url)
    with pytest.raises(ChorusError, match="cannot reproduce the store's text"):
        _cache(url, lossy, "lossy")


def test_surfaces_of_both_conventions(teachers, tokenizer_dir):
    from transformers import AutoTokenizer

    sp = TokenText.of(AutoTokenizer.from_pretrained(teachers["sp"]), "sp")
    bl = TokenText.of(AutoTokenizer.from_pretrained(tokenizer_dir), "bl")
    assert sp.dummy_prefix and not bl.dummy_prefix
    text = "the a of def é"
    assert b"".join(sp.surfaces[i] for i in sp.encode(text)) == b" " + text.encode()  # "▁" + byte fallback
    assert b"".join(bl.surfaces[i] for i in bl.encode(text)) == text.encode()


# ---------------------------------------------------------------------------------------------- training
def test_three_teachers_with_two_tokenizers_train_end_to_end(cross_store, tmp_path):
    from chorus.config import TrainConfig
    from chorus.trainer import train
    from tests.trainer.conftest import student_yaml

    student = student_yaml(tmp_path / "student.yaml")
    for op in ("mixture", "geometric"):
        res = train.run(TrainConfig(store=cross_store, student=student, out=str(tmp_path / op), steps=3, batch_size=4,
                                    lr=3e-3, warmup_steps=1, eval_every=0, save_every=0, eval_rows=8, log_every=1,
                                    teachers=["tiny", "bpe520", "sp"], aggregate=op, weighting="confidence"))
        assert np.isfinite(res["eval"]["mean"])


def _arrays(ids: torch.Tensor, dense: torch.Tensor, masked: torch.Tensor, k: int = 4) -> dict:
    """Decoded cache arrays (1, L, ...) of a teacher whose distribution at each position is ``dense`` (L, V), with
    the positions ``masked`` (L,) cached as "no target" the way _cross_targets writes them."""
    from chorus.pipeline._cross_targets import _masked
    from chorus.pipeline._position import position_targets
    from chorus.storage import TAIL_BETAS

    nxt = torch.roll(ids, -1)
    last = torch.arange(len(ids)) == len(ids) - 1
    t = position_targets(dense.log_softmax(-1), nxt, last, None, top_k=k, tail_betas=TAIL_BETAS)
    t["topk_ids"] = t["topk_ids"].to(torch.int32)
    m = _masked(ids[None].numpy(), k, 0, TAIL_BETAS, "cpu")
    return {n: torch.where(masked.view(-1, *[1] * (v.dim() - 1)), m[n], v.to(m[n].dtype))[None] for n, v in t.items()}


def test_trainer_falls_back_to_the_hard_label_or_the_other_teachers():
    """A single teacher's masked positions are the one-hot gold (its KD term is the hard-label CE, exactly); in a
    pool, a teacher without a target at a position gets weight 0 there, so the pooled target is the other's."""
    from types import SimpleNamespace

    from chorus.storage import TAIL_BETAS
    from chorus.trainer.losses import cross_entropy, forward_kl
    from chorus.trainer.sparse import prob_of, to_dense
    from chorus.trainer.targets import TargetBuilder

    torch.manual_seed(0)
    v, length = 12, 6
    ids = torch.randint(0, v, (length,))
    masked = torch.tensor([False, True, False, True, False, False])
    a = _arrays(ids, torch.randn(length, v) * 2, masked)
    b = _arrays(ids, torch.randn(length, v) * 2, torch.zeros(length, dtype=torch.bool))
    select = torch.arange(length - 1)
    gold = torch.roll(ids, -1)[:-1]
    ta, tb = (SimpleNamespace(name=n, temperature=1.0, tail_betas=TAIL_BETAS, tokenizer_mapping={"method": "x"} if n == "a"
                              else {}) for n in "ab")
    one = TargetBuilder([ta], v, warn=False).build({"teachers": {"a": a}}, select, gold, torch.ones(length - 1, 1))
    dense = to_dense(one.pooled)
    for i in range(length - 1):
        if masked[i]:
            assert torch.equal(dense[i], torch.nn.functional.one_hot(gold[i], v).float())
    s_logp = torch.randn(length - 1, v).log_softmax(-1)
    kd = forward_kl(one.pooled, s_logp)
    torch.testing.assert_close(kd[masked[:-1]], cross_entropy(s_logp, gold)[masked[:-1]])
    both = TargetBuilder([ta, tb], v, warn=False).build({"teachers": {"a": a, "b": b}}, select, gold,
                                                        torch.ones(length - 1, 2))
    alone = TargetBuilder([tb], v, warn=False).build({"teachers": {"b": b}}, select, gold, torch.ones(length - 1, 1))
    m = masked[:-1]
    assert (both.weights[m, 0] == 0).all() and (both.weights[~m, 0] > 0).all()
    support = alone.pooled.ids[m]  # b's top-k keep exactly b's probabilities (the tail is spread by the union)
    torch.testing.assert_close(prob_of(both.pooled.rows(m), support), prob_of(alone.pooled.rows(m), support),
                               atol=1e-6, rtol=0)


def test_the_store_carries_its_tokenizer_so_a_moved_store_still_maps_teachers(cross_store, documents, tokenizer_dir,
                                                                              teachers, tmp_path):
    """Prepared from a tokenizer directory that is then deleted (a store shared with a team, another machine):
    the store's own copy maps a cross-tokenizer teacher to the same bits as the original store."""
    from chorus.config import PrepareConfig
    from chorus.pipeline import prepare

    tok = tmp_path / "tok"
    shutil.copytree(tokenizer_dir, tok)
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in documents[:36]))
    url = str(tmp_path / "store.zarr")
    prepare.run(PrepareConfig(dataset=str(data), tokenizer=str(tok), out=url, seq_len=32, domain_field="domain",
                              valid_fraction=0.2, rows_per_shard=8))
    shutil.rmtree(tok)
    _cache(url, teachers["sp"], "sp")
    assert_same_cache(read_cache(url, "sp"), read_cache(cross_store, "sp"))


def test_q8_values_keep_the_no_target_positions(cross_store, teachers, tmp_path):
    """With the lossy q8 value code a cross-tokenizer cache keeps its "no target" positions (the hard label, entropy
    flag) and its covered targets within q8's error of the fp16 cache; it trains."""
    from chorus.config import TrainConfig
    from chorus.storage._targets import Q8_RANGE_NATS
    from chorus.trainer import train
    from tests.trainer.conftest import student_yaml

    url = str(tmp_path / "store.zarr")
    shutil.copytree(cross_store, url)
    _cache(url, teachers["sp"], "sp-q8", value_codec="q8")
    store = Store.open(url, "r")
    fp16, q8 = store.teacher_manifest("sp"), store.teacher_manifest("sp-q8")
    assert q8.tokenizer_mapping["coverage"] == pytest.approx(fp16.tokenizer_mapping["coverage"])
    ids16, logp16 = decode_topk(read_cache(url, "sp")[0], fp16)
    arrays, _ = read_cache(url, "sp-q8")
    ids8, logp8 = decode_topk(arrays, q8)
    masked = no_target(decode_stats(arrays, q8, logp8[..., -1])["entropy"])
    real = _real(url)
    assert (masked == no_target(decode_stats(read_cache(url, "sp")[0], fp16, logp16[..., -1])["entropy"])).all()
    assert masked[real].any() and np.isfinite(logp8).all()
    np.testing.assert_array_equal(ids8[masked][:, 0], ids16[masked][:, 0])  # the gold token
    assert (logp8[masked][:, 0] == 0).all()
    cov = real & ~masked
    np.testing.assert_array_equal(ids8[cov], ids16[cov])
    top16, top8 = logp16[cov][..., :4], logp8[cov][..., :4]
    inside = top16 > -Q8_RANGE_NATS  # a mapped distribution may hold fewer than k tokens (-inf): q8 clips at its range
    assert (top8[~inside] == -Q8_RANGE_NATS).all()
    assert np.abs(top8[inside] - top16[inside]).max() < 0.3  # q8's companded error near the top
    res = train.run(TrainConfig(store=url, student=student_yaml(tmp_path / "student.yaml"), out=str(tmp_path / "run"),
                                steps=2, batch_size=4, lr=3e-3, warmup_steps=1, eval_every=0, save_every=0,
                                eval_rows=8, log_every=1, teachers=["sp-q8"]))
    assert np.isfinite(res["eval"]["mean"])
