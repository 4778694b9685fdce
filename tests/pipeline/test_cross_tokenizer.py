"""Cross-tokenizer teachers: mapped onto the store's positions and vocabulary, checked against the teacher's own logits.

Tokenizers are trained here with `tokenizers` (nothing downloaded): the store's byte-level BPE (300 tokens), the same
tokenizer under another id order, a SentencePiece-style BPE ("▁", byte fallback, 420 tokens) and a byte-level BPE of
another size (520 tokens, another segmentation)."""

from __future__ import annotations

import importlib
import json
import os
import shutil

import numpy as np
import pytest
import torch

from chorus.commands import cache
from chorus.config import CacheConfig
from chorus.errors import ChorusError
from chorus.store import Store, decode_stats, decode_topk
from chorus.store.manifest import no_target
from chorus.teacher.cross import METHOD, CrossMap, TokenText
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


def unigram_tokenizer(out: str, texts: list[str], vocab_size: int = 400) -> str:
    """A SentencePiece Unigram configured as Llama-2, Mistral-v0.1 and T5 configure theirs: Metaspace with a dummy
    prefix on the first piece only (``prepend_scheme="first"``), byte fallback, no normalizer. A store row that
    starts mid-word is encoded with that phantom space in front of it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.Unigram(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.UnigramTrainer(vocab_size=vocab_size, unk_token="<unk>",
                                                           special_tokens=["<eos>", "<pad>", "<unk>"],
                                                           show_progress=False))
    spec = json.loads(tok.to_str())
    pieces = spec["model"]["vocab"]
    have = {p for p, _ in pieces}
    pieces += [[f"<0x{b:02X}>", 0.0] for b in range(256) if f"<0x{b:02X}>" not in have]
    spec["model"]["byte_fallback"] = True  # the trainer drops it
    return _save_fast(Tokenizer.from_str(json.dumps(spec)), out)


def bos_tokenizer(src: str, out: str) -> str:
    """The tokenizer in ``src`` with a BOS its post-processor puts before every text, as Gemma's and Llama's do."""
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_file(os.path.join(src, "tokenizer.json"))
    tok.add_special_tokens(["<bos>"])
    bos = tok.token_to_id("<bos>")
    tok.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            bos_token="<bos>").save_pretrained(out)
    return out


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
    uni = unigram_tokenizer(str(root / "uni-tok"), texts)
    bos = bos_tokenizer(bpe, str(root / "bos-tok"))
    return {"permuted": permuted, "perm": perm, "sp": _teacher(str(root / "sp"), sp, 1),
            "bpe520": _teacher(str(root / "bpe520"), bpe, 2), "unigram": _teacher(str(root / "unigram"), uni, 3),
            "bos": _teacher(str(root / "bos"), bos, 4)}


@pytest.fixture(scope="module")
def cross_store(tmp_path_factory, documents, tokenizer_dir, teacher_model, teachers) -> str:
    """A small store (36 documents, rows of 32 tokens) holding the same-tokenizer teacher "tiny" and the
    cross-tokenizer teachers "perm", "sp" and "bpe520" side by side."""
    from chorus.commands import prepare
    from chorus.config import PrepareConfig

    root = tmp_path_factory.mktemp("cross-store")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in documents[:36]))
    url = str(root / "store.zarr")
    prepare.run(PrepareConfig(dataset=str(data), tokenizer=tokenizer_dir, out=url, seq_len=32, domain_field="domain",
                              valid_fraction=0.2, rows_per_shard=8))
    _cache(url, teacher_model, "tiny")
    for name, key in (("perm", "permuted"), ("sp", "sp"), ("bpe520", "bpe520"), ("unigram", "unigram"), ("bos", "bos")):
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


class BruteForce:
    """The teacher itself, asked directly: the probability that its continuation after a context (its own token
    ids) begins with some bytes, summed over every way its vocabulary spells them (depth-first over its tokens,
    one forward pass per branch, float64). It shares nothing with the map: no first pieces, no spreads, no chain."""

    def __init__(self, model, surfaces: list[bytes | None]) -> None:
        self.model, self.surfaces, self._logp = model, surfaces, {}

    def logp(self, ctx: tuple[int, ...]) -> np.ndarray:
        if ctx not in self._logp:
            with torch.inference_mode():
                out = self.model(input_ids=torch.tensor([list(ctx)])).logits[0, -1].double()
            self._logp[ctx] = torch.log_softmax(out, -1).numpy()
        return self._logp[ctx]

    def begins(self, ctx: tuple[int, ...], want: bytes) -> float:
        p = np.exp(self.logp(ctx))
        total = 0.0
        for v, s in enumerate(self.surfaces):
            if not s:
                continue
            if s.startswith(want):
                total += p[v]
            elif want.startswith(s) and p[v] > 1e-12:
                total += p[v] * self.begins(ctx + (v,), want[len(s):])
        return total

    def extends(self, ctx: tuple[int, ...], prefix: bytes) -> float:
        """The teacher's probability that its next token's text strictly extends ``prefix``."""
        p = np.exp(self.logp(ctx))
        return sum(p[v] for v, s in enumerate(self.surfaces) if s and len(s) > len(prefix) and s.startswith(prefix))


def _document_targets(teachers, tokenizer_dir, documents, kind, n_docs=3, chunk_size=None, branches=0, top_k=8):
    """The mapped targets of whole documents in rows of their own, with what a reference needs to read them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from chorus.store import TAIL_BETAS
    from chorus.teacher.cross_targets import cross_targets
    from chorus.teacher.model import load_teacher

    s_tok, t_tok = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(teachers[kind])
    docs = [d["text"] for d in documents[:n_docs]]
    enc = [s_tok(d, add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id] for d in docs]
    cmap = CrossMap(TokenText.of(t_tok, kind), TokenText.of(s_tok, "store"), len(s_tok))
    length = max(len(e) for e in enc) + 1
    ids = np.full((len(docs), length), s_tok.pad_token_id, dtype=np.int64)
    segs = np.zeros((len(docs), length), dtype=np.int64)
    for r, e in enumerate(enc):
        ids[r, : len(e)], segs[r, : len(e)] = e, 1
    teacher = load_teacher(teachers[kind], vocab_size=len(t_tok), device=torch.device("cpu"), dtype=torch.float32,
                           revision=None, trust_remote_code=False, tokenizer_match="cross")
    teacher.chunk_size = chunk_size
    with torch.inference_mode():
        got = cross_targets(teacher, cmap, ids, segs, top_k=top_k, num_samples=0, seed=0, row_start=0, tail_betas=TAIL_BETAS,
                            branches=branches)
    model = AutoModelForCausalLM.from_pretrained(teachers[kind], dtype=torch.float32).eval()
    return docs, enc, cmap, t_tok, got, model


def _teacher_tokens(cmap: CrossMap, t_tok, doc: str):
    """The teacher's own tokens of a document (its BOS where its convention has one, the text, then EOS) and where
    each starts and ends in the document's bytes (a dummy-prefix space before byte 0)."""
    bos = cmap.teacher_text.bos_id
    t_ids = ([] if bos is None else [bos]) + t_tok(doc, add_special_tokens=False)["input_ids"]
    t_surf = [cmap.teacher_text.surfaces[v] or b"" for v in t_ids]
    phantom = len(b"".join(t_surf)) - len(doc.encode())
    t_end = np.cumsum([len(x) for x in t_surf]) - phantom
    return t_ids + [t_tok.eos_token_id], t_end - np.array([len(x) for x in t_surf]), t_end


@pytest.mark.parametrize("kind", ["sp", "bpe520", "unigram", "bos"])
def test_no_label_mass_enters_a_mapped_target(teachers, tokenizer_dir, documents, kind):
    """Every store token's mapped probability — the gold's included, and its gold statistic — is at most the
    teacher's own probability, by brute force over its tokenizations, that its text goes on with that token's bytes
    (the bytes of the teacher token before an inside position given: that probability over the normalizer, the
    teacher's probability of a token strictly extending them). Giving the label any mass the teacher did not
    give it (the old rule: unplaced mass on the gold token) breaks the bound. Top-k + τ is one distribution."""
    docs, enc, cmap, t_tok, got, model = _document_targets(teachers, tokenizer_dir, documents, kind, n_docs=2)
    brute = BruteForce(model, cmap.teacher_text.surfaces)
    s_surf = cmap.store_text.surfaces
    checked = inside = 0
    worst = 0.0
    for r, doc in enumerate(docs):
        t_ids, t_start, t_end = _teacher_tokens(cmap, t_tok, doc)
        s_start = np.concatenate([[0], np.cumsum([len(s_surf[u]) for u in enc[r][:-1]])])
        ent = got["entropy"][r].numpy()
        tail = np.exp(got["log_tail"][r].double().numpy())
        for i in range(len(enc[r]) - 1):  # position i predicts store token i + 1
            if no_target(ent[i]):
                continue
            top = np.exp(got["topk_logprobs"][r, i].double().numpy())
            assert top.sum() + tail[i] == pytest.approx(1.0, abs=1e-5)
            gold = enc[r][i + 1]
            if gold == cmap.store_text.eos_id:
                continue  # the EOS: a special token, no bytes to spell
            c = int(s_start[i + 1])
            j = int(np.flatnonzero(t_end > c)[0])  # the teacher token holding the gold's first byte
            ctx, prefix = tuple(t_ids[:j]), doc.encode()[max(int(t_start[j]), 0):c] if t_start[j] < c else b""
            if t_start[j] < 0:
                prefix = b" " + doc.encode()[:c]  # the dummy prefix space belongs to the first teacher token
            norm = brute.extends(ctx, prefix) if prefix else 1.0
            inside += bool(prefix)
            ids = got["topk_ids"][r, i].numpy()
            for u, q in [*zip(ids, top), (gold, np.exp(got["gold_logprob"][r, i].item()))]:
                if q < 1e-7 or s_surf[u] is None:
                    continue
                truth = brute.begins(ctx, prefix + s_surf[u]) / norm
                worst = max(worst, q - truth)
                assert q <= truth + 2e-5, (i, u, s_surf[u], q, truth)
                checked += 1
    assert checked > 100 and inside > 0
    print(f"{kind}: {checked} probabilities checked ({inside} inside positions), worst excess {worst:.2e}")


def _placed_by_brute_force(cmap: CrossMap, before: bytes = b"") -> np.ndarray:
    """(V_teacher,) the store id each teacher token's probability goes to at a position ``before`` bytes into it
    (b"": a boundary), -1 where it stays unplaced or does not extend ``before``; from the two vocabularies'
    surfaces by brute force (not cross.py's index): the longest store surface the rest of its text begins with (the
    lowest id among equals), unless a longer store surface extends that rest and the teacher has no token for
    ``before`` + it (the store's next token then depends on text the teacher has not predicted yet)."""
    s_surf, t_surf = cmap.store_text.surfaces, cmap.teacher_text.surfaces
    teacher_has = {s for s in t_surf if s}
    store = [(u, s) for u, s in enumerate(s_surf) if s]
    dest = np.full(len(t_surf), -1)
    for t, text in enumerate(t_surf):
        if not text or not text.startswith(before) or len(text) == len(before):
            continue
        rest = text[len(before):]
        prefixes = [(len(s), -u) for u, s in store if rest.startswith(s)]
        if prefixes and all(before + s in teacher_has for _, s in store if s.startswith(rest) and len(s) > len(rest)):
            dest[t] = -max(prefixes)[1]
    return dest


def _stop_share(cmap: CrossMap, rest: bytes, p_after: np.ndarray) -> tuple[int, float]:
    """An unplaced teacher token whose text (after the bytes seen) is ``rest``, and the teacher's next-token
    probabilities after it → (the store id ``rest`` begins with, the teacher's probability that its next token does
    not carry the text on into a longer store surface extending ``rest``); by brute force over both vocabularies."""
    s_surf, t_surf = cmap.store_text.surfaces, cmap.teacher_text.surfaces
    begins = [(len(s), -u) for u, s in enumerate(s_surf) if s and rest.startswith(s)]
    longer = [s for s in s_surf if s and len(s) > len(rest) and s.startswith(rest)]
    goes_on = [bool(c) and any((rest + c).startswith(s) or s.startswith(rest + c) for s in longer) for c in t_surf]
    if not begins or not longer:
        return -1, 0.0
    return -max(begins)[1], 1.0 - float(p_after[np.array(goes_on)].sum())


@pytest.mark.parametrize("kind,branches", [("sp", 0), ("bpe520", 0), ("unigram", 0), ("bos", 0), ("unigram", 40),
                                           ("sp", 3)])
def test_mapped_targets_hold_all_the_mass_the_map_places(teachers, tokenizer_dir, documents, kind, branches,
                                                         monkeypatch):
    """Every store id but the gold's and the next teacher token's first piece (the two the lookahead adjusts) holds
    exactly the teacher's float64 probability of the teacher tokens placed on it (:func:`_placed_by_brute_force`); at
    a position inside a teacher token, over the teacher's probability of a token strictly extending the bytes seen.
    Where that next token is unplaced, the store id its text begins with also holds the share of it after which the
    teacher's text stops (:func:`_stop_share`, from its logits one position on). With ``branches``, so does each of
    the that many most probable other unplaced tokens at a boundary position, asked with a forward pass of its own
    (the cache's reads them as branch tokens of one tree-masked pass). The top-k misses none larger than its last. The no-label bound cannot see placed mass lost to the bucket (3 % of it went unnoticed); this test
    does. The ("sp", 3) case sums every continuing set over the ids outside it (a large vocabulary's short texts)."""
    if (kind, branches) == ("sp", 3):
        monkeypatch.setattr(importlib.import_module("chorus.teacher.cross_targets"), "OUTSIDE_SHARE", 0.0)
    docs, enc, cmap, t_tok, got, model = _document_targets(teachers, tokenizer_dir, documents, kind, n_docs=2,
                                                           branches=branches, top_k=64 + 236 * bool(branches))
    s_surf, t_surf = cmap.store_text.surfaces, cmap.teacher_text.surfaces
    specials = {u for u, s in enumerate(s_surf) if s is None}
    brute = BruteForce(model, t_surf)
    spelled = np.array([bool(t) and any(t.startswith(s) for s in s_surf if s) for t in t_surf])
    placed_by: dict[bytes, np.ndarray] = {}
    checked, stopped, branched, positions = 0, 0, 0, {"boundary": 0, "inside": 0}
    for r, doc in enumerate(docs):
        t_ids, t_start, t_end = _teacher_tokens(cmap, t_tok, doc)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([t_ids])).logits[0].double(), -1).numpy()
        s_start = np.concatenate([[0], np.cumsum([len(s_surf[u]) for u in enc[r][:-1]])])
        ent = got["entropy"][r].numpy()
        text = doc.encode()
        for i in range(len(enc[r]) - 1):  # position i predicts store token i + 1
            c = int(s_start[i + 1])
            j = next((j for j in range(len(t_start)) if t_end[j] > c and t_end[j] > t_start[j]), 0)  # holds byte c
            if no_target(ent[i]) or j == 0:
                continue  # no target, the EOS, or the teacher's first token (no prediction)
            before = (b" " + text[:c]) if t_start[j] < 0 else text[int(t_start[j]):c]
            if before not in placed_by:
                placed_by[before] = _placed_by_brute_force(cmap, before)
            dest = placed_by[before]
            p = np.exp(logp[j - 1, : len(dest)])
            extends = np.array([bool(s) and s.startswith(before) and len(s) > len(before) for s in t_surf])
            norm = p[extends].sum() if before else 1.0
            truth = np.bincount(dest[dest >= 0], weights=p[dest >= 0], minlength=len(s_surf)) / norm
            stops_at = -1
            if dest[t_ids[j]] < 0:  # unplaced: the share after which the store's token ends where its text does
                stops_at, stop = _stop_share(cmap, t_surf[t_ids[j]][len(before):], np.exp(logp[j, : len(dest)]))
                if stops_at >= 0:
                    truth[stops_at] += p[t_ids[j]] / norm * stop
            if branches and not before:  # the most probable other unplaced tokens, each asked where its text stops
                cand = np.flatnonzero((dest < 0) & spelled)
                cand = cand[cand != t_ids[j]]
                cand = cand[np.argsort(-p[cand], kind="stable")]
                if len(cand) > branches and p[cand[branches - 1]] - p[cand[branches]] < 1e-5 * p[cand[branches]]:
                    continue  # a tie at the cut: float32 logits may pick either
                for t in cand[:branches]:
                    at, stop = _stop_share(cmap, t_surf[t], np.exp(brute.logp(tuple(t_ids[:j]) + (int(t),))))
                    truth[at] += p[t] * stop
                    branched += 1
            skip = {enc[r][i + 1], int(dest[t_ids[j]])} | specials
            ids = got["topk_ids"][r, i].numpy()
            values = np.exp(got["topk_logprobs"][r, i].double().numpy())
            keep = np.array([int(u) not in skip for u in ids]) & (values > 0)
            ok = np.isclose(values[keep], truth[ids[keep]], rtol=2e-4, atol=1e-7)
            assert ok.all(), (i, before, ids[keep][~ok][:3], values[keep][~ok][:3], truth[ids[keep]][~ok][:3])
            checked += int(keep.sum())
            stopped += int((ids[keep] == stops_at).sum())
            missed = [u for u in np.flatnonzero(truth > values[-1] * (1 + 2e-4) + 1e-7) if u not in skip and u not in ids]
            assert not missed, (i, before, missed)
            positions["inside" if before else "boundary"] += 1
    assert positions["boundary"] > 20 and positions["inside"] > 0 and checked > 100, positions
    # the Unigram's tokens are often shorter than the store's: the kind whose unplaced next tokens stop short of the
    # gold (in the others the store id they stop on is the gold's, which the no-label bound checks)
    assert stopped > 0 or kind != "unigram"
    assert branched > 50 or not branches
    print(f"{kind}: {checked} placed probabilities equal the teacher's at {positions} positions ({stopped} with a "
          "stopped unplaced token)")


@pytest.mark.parametrize("kind", ["sp", "unigram"])
def test_positions_waiting_across_head_chunks_get_the_same_targets(teachers, tokenizer_dir, documents, kind):
    """The mapped pass keeps a position whose chain or lookahead reads a later teacher position until that position's
    chunk is done. With head chunks of CHUNK_ALIGN positions (most gold texts then cross a chunk's end) every target
    and statistic is the one-chunk pass's, which the brute-force tests check, bit for bit (aligned chunks: the head's
    GEMM gives the same bits)."""
    from chorus.teacher.model import CHUNK_ALIGN

    whole = _document_targets(teachers, tokenizer_dir, documents, kind)[4]
    small = _document_targets(teachers, tokenizer_dir, documents, kind, chunk_size=CHUNK_ALIGN)[4]
    assert set(whole) == set(small)
    for k in whole:
        torch.testing.assert_close(small[k], whole[k], rtol=0, atol=0, equal_nan=True, msg=k)


@pytest.mark.parametrize("kind", ["sp", "bpe520", "unigram", "bos"])
def test_gold_statistics_give_the_teachers_own_bits_per_byte(teachers, tokenizer_dir, documents, kind):
    """Chained along a document's store positions, the stored gold log-probs are the teacher's own log-likelihood
    of its own tokens (from the first store token that starts where a predicted teacher token starts), to float
    precision: the statistic blend, calibrate and ``eval teacher:`` read is the teacher's, not the label's."""
    docs, enc, cmap, t_tok, got, model = _document_targets(teachers, tokenizer_dir, documents, kind)
    stored_bits = own_bits = 0.0
    for r, doc in enumerate(docs):
        t_ids, t_start, _ = _teacher_tokens(cmap, t_tok, doc)
        with torch.inference_mode():
            logp = torch.log_softmax(model(input_ids=torch.tensor([t_ids])).logits[0].double(), -1).numpy()
        s_start = np.cumsum([0] + [len(cmap.store_text.surfaces[u]) for u in enc[r][:-2]])  # of store tokens 0..n-1
        j, i = next((j, int(np.flatnonzero(s_start == t_start[j])[0])) for j in range(1, len(t_start))
                    if t_start[j] in s_start[1:])  # teacher token j and store token i start at one byte
        own_bits -= sum(logp[k - 1, t_ids[k]] for k in range(j, len(t_ids))) / np.log(2)
        ent, gold = got["entropy"][r].numpy(), got["gold_logprob"][r].double().numpy()
        assert not no_target(ent[i - 1:len(enc[r]) - 1]).any()  # position i - 1 predicts store token i
        stored_bits -= gold[i - 1:len(enc[r]) - 1].sum() / np.log(2)
    print(f"{kind}: stored gold statistics {stored_bits:.2f} bits, the teacher's own {own_bits:.2f}")
    assert stored_bits == pytest.approx(own_bits, rel=1e-4)  # exact but for float32 sums


@pytest.mark.parametrize("kind", ["sp", "bpe520", "unigram", "bos"])
def test_other_tokenizers_cache_distributions_with_coverage_recorded(cross_store, kind, capsys):
    from chorus.commands.report import inspect_command, verify_command

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
    from chorus.commands.cache import _manifest

    m = Store.open(cross_store, "r").teacher_manifest("sp")
    assert m.tokenizer_mapping["version"] >= 1
    corpus = Store.open(cross_store, "r").manifest
    args = (CacheConfig(store=cross_store, teacher=teachers["sp"], **{**CACHE_ARGS, "name": "sp"}), "sp", corpus)

    class T:
        dtype, weights_fingerprint, model_id, revision, device = torch.float32, "w", "sp", "local", torch.device("cpu")

    base = dict(m.tokenizer_mapping)
    fps = {_manifest(*args, T(), m.value_params, cross=c).fingerprint for c in
           (base, {**base, "version": 99}, {**base, "method": "other"},
            {**base, "tokenizer": {**base["tokenizer"], "fingerprint": "x"}}, {**base, "branches": 2})}
    assert len(fps) == 5


def test_branch_tokens_place_part_of_the_bucket_and_leave_the_statistics(cross_store, teachers, tmp_path, capsys):
    """`chorus cache --branches 8`: the manifest records it (in the fingerprint), the mean unplaced mass measured over
    the store falls, and the gold statistic — the teacher's own probability of the text — stays what it was."""
    url = str(tmp_path / "store.zarr")
    shutil.copytree(cross_store, url)
    _cache(url, teachers["unigram"], "unigram-b8", branches=8)
    store = Store.open(url, "r")
    plain, branched = store.teacher_manifest("unigram"), store.teacher_manifest("unigram-b8")
    assert (plain.tokenizer_mapping["branches"], branched.tokenizer_mapping["branches"]) == (0, 8)
    before, after = (m.tokenizer_mapping["measured"]["unplaced_mass"] for m in (plain, branched))
    print(f"unplaced mass {before:.4f} -> {after:.4f} with 8 branch tokens")
    assert after < 0.8 * before
    stats = []
    for name, m in (("unigram", plain), ("unigram-b8", branched)):
        arrays, _ = read_cache(url, name)
        stats.append(decode_stats(arrays, m, decode_topk(arrays, m)[1][..., -1])["gold_logprob"])
    np.testing.assert_allclose(stats[1], stats[0], rtol=1e-3, atol=1e-3)  # fp16 storage
    from chorus.commands.report import inspect_command

    capsys.readouterr()
    inspect_command(url)
    assert f"with 8 branch tokens: {100 * branched.tokenizer_mapping['coverage']:.1f}% of positions have a target, " \
           f"mean unplaced mass {after:.3f}" in capsys.readouterr().out


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
    assert "lossy" not in Store.open(url, "r").teacher_names()  # refused by the pre-check: nothing written


def test_every_row_is_checked_before_the_first_forward_pass(cross_store, tmp_path, teachers, monkeypatch):
    """A row the teacher's tokenizer cannot reproduce near the end of the store stops the cache before the teacher
    runs once: no forward pass, no unit, no shard."""
    from tokenizers import Tokenizer, normalizers

    from chorus.teacher import model as _teacher

    lossy = str(tmp_path / "lossy")
    shutil.copytree(teachers["bpe520"], lossy)
    tok = Tokenizer.from_file(os.path.join(lossy, "tokenizer.json"))
    tok.normalizer = normalizers.Replace("LATIN", "latin")  # only rows of the "names" domain break
    tok.save(os.path.join(lossy, "tokenizer.json"))
    url = str(tmp_path / "store.zarr")
    shutil.copytree(cross_store, url)
    calls = []
    real = _teacher.Teacher.hidden_states
    monkeypatch.setattr(_teacher.Teacher, "hidden_states", lambda self, x: calls.append(x.shape) or real(self, x))
    with pytest.raises(ChorusError, match="cannot reproduce the store's text"):
        _cache(url, lossy, "lossy")
    assert calls == [] and "lossy" not in Store.open(url, "r").teacher_names()


def test_a_teacher_with_a_shorter_context_reads_long_rows_in_overlapping_windows(teachers):
    """Rows longer than the teacher's context run in windows of at most that many tokens: every position's hidden
    state is the model's own on a suffix of the row ending there, at least half the context long — found by brute
    force over every suffix length — and the first window's positions see the whole row before them."""
    from chorus.teacher.cross_targets import windowed_hidden_states
    from chorus.teacher.model import load_teacher

    vocab = json.loads(open(os.path.join(teachers["sp"], "config.json")).read())["vocab_size"]
    teacher = load_teacher(teachers["sp"], vocab_size=vocab, device=torch.device("cpu"), dtype=torch.float32,
                           revision=None, trust_remote_code=False, tokenizer_match="cross")
    x = torch.randint(3, vocab, (2, 37), generator=torch.Generator().manual_seed(0))
    limit = 10
    seen = []
    real = teacher.hidden_states
    teacher.hidden_states = lambda ids: seen.append(ids.shape[1]) or real(ids)
    with torch.inference_mode():
        got = windowed_hidden_states(teacher, x, limit)
        assert got.shape[:2] == x.shape and max(seen) <= limit
        torch.testing.assert_close(got[:, :limit], real(x[:, :limit]), rtol=0, atol=0)
        for p in range(limit, x.shape[1]):
            lengths = [c for c in range(1, limit + 1) if p + 1 >= c and torch.allclose(
                real(x[:, p + 1 - c: p + 1])[:, -1], got[:, p], atol=1e-5)]
            assert lengths and min(lengths) >= limit // 2 + 1, (p, lengths)


def test_long_rows_in_teacher_tokens_cache_to_the_end(cross_store, tmp_path, teachers):
    """A teacher whose context (24 positions) is shorter than rows in its own tokens caches every shard (it used to
    stop with "prepare a store with a shorter seq_len"), with the coverage of the same teacher without the limit."""
    short = str(tmp_path / "short")
    shutil.copytree(teachers["unigram"], short)
    cfg_path = os.path.join(short, "config.json")
    cfg = json.loads(open(cfg_path).read())
    cfg["max_position_embeddings"] = 24
    open(cfg_path, "w").write(json.dumps(cfg))
    url = str(tmp_path / "store.zarr")
    shutil.copytree(cross_store, url)
    _cache(url, short, "short")
    store = Store.open(url, "r")
    m, full = store.teacher_manifest("short"), store.teacher_manifest("unigram")
    assert m.status == "complete"
    assert m.tokenizer_mapping["coverage"] == pytest.approx(full.tokenizer_mapping["coverage"])


def test_surfaces_of_both_conventions(teachers, tokenizer_dir):
    from transformers import AutoTokenizer

    sp = TokenText.of(AutoTokenizer.from_pretrained(teachers["sp"]), "sp")
    bl = TokenText.of(AutoTokenizer.from_pretrained(tokenizer_dir), "bl")
    assert sp.dummy_prefix and not bl.dummy_prefix
    text = "the a of def é"
    assert b"".join(sp.surfaces[i] for i in sp.encode(text)) == b" " + text.encode()  # "▁" + byte fallback
    assert b"".join(bl.surfaces[i] for i in bl.encode(text)) == text.encode()



def _vocab(rng, n: int, extra: list[bytes]) -> TokenText:
    """A vocabulary of random surfaces over an alphabet with the bytes 0xfe and 0xff (the top of the byte order,
    where a text's range in sorted order ends), repeated surfaces included, then two special tokens."""
    alphabet = [b"a", b"b", b"\xfe", b"\xff"]
    surfaces: list[bytes | None] = [b"".join(rng.choice(alphabet, rng.integers(1, 5))) for _ in range(n)] + extra
    surfaces += [None, None]
    tokens = [repr(x) for x in surfaces[:-2]] + ["<eos>", "<pad>"]
    return TokenText(None, surfaces, tokens, eos_id=len(surfaces) - 2, pad_id=len(surfaces) - 1, dummy_prefix=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_maps_tables_against_their_definitions(seed):
    """Every table the map builds (the first store piece, where each teacher token's mass goes after some text,
    the extensions of a prefix, the starting and continuing sets) against its definition, written out by brute
    force over every pair of surfaces."""
    rng = np.random.default_rng(seed)
    teacher, store = _vocab(rng, 60, []), _vocab(rng, 40, [b"a", b"b", b"\xfe", b"\xff"])
    cmap = CrossMap(teacher, store, len(store.surfaces))
    t_surf = [(v, x) for v, x in enumerate(teacher.surfaces) if x]
    s_surf = {x for x in store.surfaces if x}

    def spread(i: int) -> list[int]:
        return sorted(cmap.spreads[i][0].tolist())

    def first(text: bytes) -> list[int]:  # the longest store surface the text starts with
        best = max((x for x in s_surf if text.startswith(x)), key=len, default=None)
        return [] if best is None else [store.surfaces.index(best)]

    def placed(before: bytes, rest: bytes) -> list[int]:  # unplaced: a longer store token the teacher cannot spell
        longer = [x for x in s_surf if x.startswith(rest) and x != rest]
        return [] if any(before + x not in {s for _, s in t_surf} for x in longer) else first(rest)

    texts = sorted({x[:j] for _, x in t_surf for j in range(1, len(x) + 1)} | {b"\xff\xff\xff", b"ab\xff"})
    for text in texts:
        assert cmap.starting[cmap.starting_id(text)].tolist() == [v for v, x in t_surf
                                                                 if x.startswith(text) and x != text]
        rests = [x[len(text):] for x in s_surf if x.startswith(text) and x != text]
        assert cmap.starting[cmap.continuing_id(text)].tolist() == sorted(
            v for v, x in t_surf if any(x.startswith(r) or (r.startswith(x) and r != x) for r in rests))
        assert ([cmap.index.first(text)] if cmap.index.first(text) >= 0 else []) == first(text)
        ext = [(v, x[len(text):]) for v, x in t_surf if x.startswith(text) and x != text]
        pid = cmap.prefix_id(text)
        if not ext:
            assert pid == 0
            continue
        tids, spreads = cmap.extensions[pid]
        assert tids.tolist() == [v for v, _ in ext]
        assert [spread(i) for i in spreads] == [placed(text, rest) for _, rest in ext]
        assert [spread(cmap.spread_id(text, rest)) for _, rest in ext] == [placed(text, rest) for _, rest in ext]
    assert [spread(cmap.teacher_spread[v]) for v, _ in t_surf] == [placed(b"", x) for _, x in t_surf]

# ---------------------------------------------------------------------------------------------- training
def test_three_teachers_with_two_tokenizers_train_end_to_end(cross_store, tmp_path):
    from chorus.commands import train
    from chorus.config import TrainConfig
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
    from chorus.store import TAIL_BETAS
    from chorus.teacher.cross_targets import _masked
    from chorus.teacher.position import position_targets

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

    from chorus.distill.losses import cross_entropy, forward_kl
    from chorus.distill.sparse import prob_of, to_dense
    from chorus.distill.targets import TargetBuilder
    from chorus.store import TAIL_BETAS

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
    from chorus.commands import prepare
    from chorus.config import PrepareConfig

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
    from chorus.commands import train
    from chorus.config import TrainConfig
    from chorus.store.targets import Q8_RANGE_NATS
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


def test_a_cache_of_the_old_mapping_is_refused_with_one_line(cross_store, tmp_path):
    """A cross-tokenizer cache of mapping version 1 (the unplaced mass on the gold token) is refused by every reader
    that joins teachers, naming the teacher and the fix; a one-token-table (permutation) cache never held the label."""
    from chorus.store import check_teachers, complete_teachers

    url = str(tmp_path / "store.zarr")
    shutil.copytree(cross_store, url)
    store = Store.open(url, "r+")
    for name in ("sp", "perm"):
        m = store.teacher_manifest(name)
        store.write_teacher_manifest(m.replace(tokenizer_mapping={**m.tokenizer_mapping, "version": 1}))
    store = Store.open(url, "r")
    with pytest.raises(ChorusError, match="teacher 'sp' is a cross-tokenizer cache of mapping version 1.*--overwrite"):
        check_teachers(store, ["tiny", "sp"])
    assert check_teachers(store, ["perm"])[0].name == "perm"
    assert "sp" not in complete_teachers(store) and "perm" in complete_teachers(store)


@pytest.mark.parametrize("kind", ["store", "sp", "unigram"])
def test_token_byte_lengths_spell_the_text(teachers, tokenizer_dir, documents, tmp_path, kind):
    """The bytes per token that bits per byte divide by, read from the store's copy of ``tokenizer.json``, add up to
    the UTF-8 length of the text itself (plus the dummy-prefix space of a SentencePiece-style tokenizer), for a
    byte-level BPE and for a "▁" + byte-fallback one (text outside its vocabulary spelled in <0xNN> pieces)."""
    from transformers import AutoTokenizer

    from chorus.store import token_byte_lengths
    from chorus.store.tokenizer_files import write_tokenizer_files

    path = tokenizer_dir if kind == "store" else teachers[kind]
    tok = AutoTokenizer.from_pretrained(path)
    store = Store.open(str(tmp_path / "s.zarr"), "w")
    write_tokenizer_files(store, {"tokenizer.json": open(os.path.join(path, "tokenizer.json"), "rb").read()},
                          fingerprint="x")
    lengths = token_byte_lengths(store, len(tok))
    for text in [d["text"] for d in documents[:20]] + ["é€ 字 def\n\tx"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert sum(lengths[i] for i in ids) == len(text.encode()) + (kind != "store"), text
    assert lengths[tok.eos_token_id] == 0


def test_eval_reports_bits_per_byte_for_teachers_of_any_tokenizer(cross_store, capsys):
    """``eval teacher:NAME`` reports bits per byte beside nats per token: the same network under another id order
    gives the same bits per byte, and a teacher of another tokenizer is scored on the text's bytes from its own gold
    statistics: on the held-out rows, within 10 % of what its cache pass measured over the whole corpus."""
    from chorus.commands import eval as evaluate
    from chorus.config import EvalConfig

    got = {n: evaluate.run(EvalConfig(store=cross_store, model=f"teacher:{n}")) for n in ("tiny", "perm", "sp")}
    assert got["tiny"]["bpb_mean"] == pytest.approx(got["perm"]["bpb_mean"], rel=1e-4)
    for r in got.values():
        assert set(r["bits_per_byte"]) == set(r["per_domain"]) and r["bpb_worst"] == max(r["bits_per_byte"].values())
    whole = Store.open(cross_store, "r").teacher_manifest("sp").tokenizer_mapping["measured"]["gold_text_bits_per_byte"]
    held_out = sum(r * n for r, n in zip(got["sp"]["bits_per_byte"].values(), got["sp"]["tokens"].values())) / sum(
        got["sp"]["tokens"].values())
    assert held_out == pytest.approx(whole, rel=0.1)
    assert "bits/byte" in capsys.readouterr().out


def test_a_teacher_without_a_token_for_the_text_is_named_for_that(teachers, tokenizer_dir, documents, tmp_path):
    """A Unigram teacher without byte fallback turns characters it lacks into its unknown token: refused with one line
    that names the characters at the byte where they are — not its dummy-prefix space, which is not what differs."""
    from transformers import AutoTokenizer

    from chorus.teacher.alignment import _segment_text

    spec = json.loads(open(os.path.join(teachers["unigram"], "tokenizer.json")).read())
    spec["model"]["byte_fallback"] = False
    from tokenizers import Tokenizer

    no_fallback = _save_fast(Tokenizer.from_str(json.dumps(spec)), str(tmp_path / "tok"))
    teacher = TokenText.of(AutoTokenizer.from_pretrained(no_fallback), "t")
    store = TokenText.of(AutoTokenizer.from_pretrained(tokenizer_dir), "s")
    assert teacher.dummy_prefix
    text = "ncoding the 字 of"  # a row that starts mid-word: the teacher encodes it with a phantom space
    surfaces = [store.surfaces[i] for i in store.encode(text)]
    with pytest.raises(ChorusError, match=r"byte 12: b'\\xe5.*no token for some of these characters"):
        _segment_text(surfaces, store, teacher, row=7)
    assert _segment_text([store.surfaces[i] for i in store.encode("ncoding the of")], store, teacher, 7) is not None


@pytest.mark.parametrize("shift", [0.0, 80.0, -40.0])
def test_boundary_mass_against_float64(shift):
    """The placed mass and log-partition of the mapped pass equal float64 ones, for logits exp() takes unshifted
    and for rows it must shift (a largest logit past either end of UNSHIFTED_LOGITS): a row whose exp overflows or
    flushes to zero is caught here, whichever branch it takes."""
    from chorus.teacher.cross_targets import UNSHIFTED_LOGITS, boundary_mass

    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 5000, generator=g, dtype=torch.float64) * 4 + shift
    z[0, :10] += 25.0  # one row with a peak: a large logit among small ones
    dest = torch.randint(0, 301, (5000,), generator=g)
    q, lse = boundary_mass(z.float().T.contiguous(), dest, 301)  # the head's logits: one column a position
    with torch.inference_mode():  # the cache's path: the exps in a buffer kept across chunks, here a larger one
        buffers = {"exp": torch.full((6 * 6000,), float("nan"))}
        q_buf, lse_buf = boundary_mass(z.float().T.contiguous(), dest, 301, buffers)
    assert torch.equal(q_buf, q) and torch.equal(lse_buf, lse)
    ref_lse = torch.logsumexp(z, -1)
    ref = torch.zeros(6, 301, dtype=torch.float64).index_add_(1, dest, torch.exp(z - ref_lse[:, None]))
    tops = z.float().amax(-1)
    unshifted = bool(((tops > UNSHIFTED_LOGITS[0]) & (tops < UNSHIFTED_LOGITS[1])).all())
    assert unshifted == (shift == 0.0)  # both branches run
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(q.double(), ref, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("kind", ["sp", "bpe520"])
def test_a_row_cut_inside_a_character_keeps_the_targets_of_its_whole_characters(teachers, tokenizer_dir, kind):
    """A row that starts or ends inside a UTF-8 character (byte-level store tokens split one) is read from its first
    whole character to its last: every position there gets the target it gets in a row cut at that character's
    boundary (the teacher reads the same text), the tokens holding cut bytes none. Before, the whole piece had none."""
    from transformers import AutoTokenizer

    from chorus.store import TAIL_BETAS
    from chorus.teacher.cross_targets import cross_targets
    from chorus.teacher.model import load_teacher

    s_tok, t_tok = AutoTokenizer.from_pretrained(tokenizer_dir), AutoTokenizer.from_pretrained(teachers[kind])
    cmap = CrossMap(TokenText.of(t_tok, kind), TokenText.of(s_tok, "store"), len(s_tok))
    teacher = load_teacher(teachers[kind], vocab_size=len(t_tok), device=torch.device("cpu"), dtype=torch.float32,
                           revision=None, trust_remote_code=False, tokenizer_match="cross")
    enc = s_tok("the model 😀 reads the data ✓ of the cat 😀 and the dog", add_special_tokens=False)["input_ids"]
    surf = [cmap.store_text.surfaces[u] for u in enc]
    starts_char = [not 0x80 <= s[0] < 0xC0 for s in surf]
    assert not all(starts_char)  # the store's byte-level BPE splits the emoji: the case under test

    def targets(ids: list[int]) -> dict:
        with torch.inference_mode():
            got = cross_targets(teacher, cmap, np.array([ids]), np.ones((1, len(ids)), np.int64), top_k=8,
                                num_samples=0, seed=0, row_start=0, tail_betas=TAIL_BETAS)
        return {k: v[0] for k, v in got.items()}

    checked = 0
    for a in (k for k in range(1, len(enc)) if not starts_char[k]):  # a row starting inside a character
        b = next(k for k in range(a, len(enc)) if starts_char[k])  # ... and one starting at its next boundary
        cut, whole = targets(enc[a:]), targets(enc[b:])
        assert no_target(cut["entropy"][: b - a].numpy()).all()
        for k in cut:  # (the last position predicts no token of the row)
            torch.testing.assert_close(cut[k][b - a:-1], whole[k][:-1], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
        checked += int((~no_target(whole["entropy"].numpy())).sum())
    for e in (k for k in range(1, len(enc)) if not starts_char[k]):  # a row ending inside a character
        b = max(k for k in range(e) if starts_char[k])  # ... and the same row ending before that character
        cut, whole = targets(enc[:e]), targets(enc[:b])
        assert no_target(cut["entropy"][b - 1:].numpy()).all()
        for k in cut:
            torch.testing.assert_close(cut[k][: b - 1], whole[k][: b - 1], rtol=1e-5, atol=1e-6, equal_nan=True, msg=k)
        checked += int((~no_target(whole["entropy"][: b - 1].numpy())).sum())
    assert checked > 50


def test_a_branch_token_reads_what_a_forward_pass_of_its_own_reads(teachers):
    """Branch tokens of one tree-masked pass over two rows' cached keys (several per row, padded rows) have the final
    hidden states of a plain forward pass over their row up to their position, then the token."""
    from transformers import AutoTokenizer, DynamicCache

    from chorus.teacher.cross_targets import _with_cache, branch_hidden_states
    from chorus.teacher.model import load_teacher

    t_tok = AutoTokenizer.from_pretrained(teachers["unigram"])
    teacher = load_teacher(teachers["unigram"], vocab_size=len(t_tok), device=torch.device("cpu"), dtype=torch.float32,
                           revision=None, trust_remote_code=False, tokenizer_match="cross")
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.integers(3, len(t_tok), (2, 24)))
    cache = DynamicCache()
    with torch.inference_mode():
        teacher.hidden_states(x, **_with_cache(teacher, cache))
        src = np.array([0, 3, 3, 11, 23, 24 + 5, 24 + 6, 24 + 20])  # flat positions; two branches after position 3
        tok = rng.integers(3, len(t_tok), len(src))
        got = branch_hidden_states(teacher, cache, 2, 24, src, tok, pad=0)
        for k, (s, t) in enumerate(zip(src, tok)):
            r, i = divmod(int(s), 24)
            want = teacher.hidden_states(torch.cat([x[r, : i + 1], torch.tensor([t])])[None])[0, -1]
            torch.testing.assert_close(got[k], want, rtol=1e-5, atol=1e-5, msg=f"branch {k} after position {i} of row {r}")
