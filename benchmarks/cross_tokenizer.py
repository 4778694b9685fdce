"""Cross-tokenizer distillation: a teacher of another tokenizer, cached into the store's vocabulary.

    python benchmarks/cross_tokenizer.py [--quick] [--seeds 0,1]  → table on stdout, JSON in benchmarks/results/cross_tokenizer.json

The demo's corpus (code, prose, Unicode names; nothing downloaded) is prepared twice: with a SentencePiece-style BPE
("sp": "▁" spaces, dummy prefix, byte fallback, the finer one) and with a byte-level BPE ("bl": GPT-2 style, a larger
vocabulary, the coarser one). Two teachers of one architecture, steps and rows are trained with CE, one per store.
In each store, its own teacher is cached natively ("same") and the other store's teacher through `chorus cache`'s
cross-tokenizer mapping ("cross"); both directions are measured: a coarse teacher into a fine store (bl → sp) and a
fine teacher into a coarse store (sp → bl). Students of one size, steps and rows train on each store: CE only, KD
from the same-tokenizer teacher, KD from the cross-tokenizer teacher. Reported, on held-out rows:

- coverage: the share of real positions where the cross teacher's target exists (else the hard label), and the
  share of those inside one of its tokens (the prefix-conditioned approximation, see teacher/cross.py);
- bits per byte of the gold text: each teacher natively on its own tokens, and the cross teacher's gold statistics
  (over covered positions, divided by the bytes of those positions' gold tokens: the teacher's own probability of
  the gold text, chained along its tokens; the mass the map cannot place stays in a tail bucket);
- gap closed = (CE − cross) / (CE − same-tokenizer KD) on the students' mean held-out loss, per seed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
from _common import table, write  # noqa: E402

from chorus.commands import (
    cache,  # noqa: E402
    prepare,  # noqa: E402
    train,  # noqa: E402
)
from chorus.config import CacheConfig, PrepareConfig, TrainConfig  # noqa: E402
from chorus.demo import corpus as _demo_corpus  # noqa: E402
from chorus.store import Store  # noqa: E402
from chorus.store.manifest import no_target  # noqa: E402
from chorus.teacher.alignment import align  # noqa: E402
from chorus.teacher.cross import CrossMap, TokenText  # noqa: E402


@dataclass(frozen=True)
class Scale:
    chars_per_domain: int
    vocab_sp: int
    vocab_bl: int
    seq_len: int
    teacher_hidden: int
    student_hidden: int
    teacher_steps: int
    student_steps: int
    student_rows: int
    batch_size: int = 16
    lr: float = 5e-3
    kd_weight: float = 0.8
    top_k: int = 16


QUICK = Scale(chars_per_domain=60_000, vocab_sp=768, vocab_bl=1024, seq_len=64, teacher_hidden=96, student_hidden=32,
              teacher_steps=200, student_steps=120, student_rows=160)
FULL = Scale(chars_per_domain=200_000, vocab_sp=1536, vocab_bl=2048, seq_len=128, teacher_hidden=128, student_hidden=48,
             teacher_steps=400, student_steps=300, student_rows=400)


def _llama_yaml(path: Path, hidden: int, seq_len: int) -> str:
    path.write_text(f"model_type: llama\nhidden_size: {hidden}\nintermediate_size: {4 * hidden}\nnum_hidden_layers: 2\n"
                    f"num_attention_heads: 4\nnum_key_value_heads: 4\nmax_position_embeddings: {4 * seq_len}\n"
                    "tie_word_embeddings: false\n")
    return str(path)


def sentencepiece_tokenizer(texts: list[str], vocab_size: int, out: Path) -> str:
    """Llama-style BPE: "▁" for spaces with a dummy prefix, byte-fallback tokens <0x00>..<0xFF>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size - 256, show_progress=False, limit_alphabet=160,
                                                       special_tokens=list(_demo_corpus.SPECIALS)))
    spec = json.loads(tok.to_str())
    for b in range(256):
        spec["model"]["vocab"].setdefault(f"<0x{b:02X}>", len(spec["model"]["vocab"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
                                   eos_token=_demo_corpus.SPECIALS[0], pad_token=_demo_corpus.SPECIALS[1])
    fast.save_pretrained(str(out))
    return str(out)


def _valid_rows(store: Store) -> np.ndarray:
    m = store.manifest
    if "split" in store.array_names("corpus"):
        return np.flatnonzero(store.read_rows("corpus", "split", 0, m.num_rows) == 1)
    return np.arange(m.split_rows.get("train", 0), m.num_rows)


def bits_per_byte(url: str, name: str, teacher_tokenizer: str | None = None, *, held_out: bool = True) -> dict:
    """Held-out rows of ``url``: Σ −log₂ p(gold) / Σ bytes of the gold tokens over the positions with a target, the
    share of real positions that have one and (``teacher_tokenizer``: a cross teacher's) the share of those inside
    one of its tokens, with the bits per byte of each kind."""
    store = Store.open(url, "r")
    m = store.manifest
    rows = _valid_rows(store) if held_out else np.arange(m.num_rows)
    ids = store.read_rows("corpus", "input_ids", 0, m.num_rows)[rows]
    seg = store.read_rows("corpus", "segment_ids", 0, m.num_rows)[rows]
    stats = store.read_rows(f"teachers/{name}", "stats", 0, m.num_rows)[rows].astype(np.float64)
    text = TokenText.of(_load_tok(m.source["tokenizer"]), "store")
    nbytes = np.array([len(s or b"") for s in text.surfaces])
    real = np.zeros(seg.shape, dtype=bool)
    real[:, :-1] = (seg[:, :-1] > 0) & (seg[:, 1:] > 0)
    covered = real & ~no_target(stats[..., 1])
    gold_bytes = nbytes[np.roll(ids, -1, axis=1)]

    def bpb(sel: np.ndarray) -> float:
        return float(-stats[..., 2][sel].sum() / math.log(2) / max(gold_bytes[sel].sum(), 1))

    out = {"coverage": float(covered.sum() / max(real.sum(), 1)), "bits_per_byte": bpb(covered), "positions": int(real.sum())}
    if teacher_tokenizer:
        cmap = CrossMap(TokenText.of(_load_tok(teacher_tokenizer), "teacher"), text, m.tokenizer.vocab_size)
        inside = align(ids, seg, cmap, row_start=0).prefix > 0
        out |= {"inside_share": float((covered & inside).sum() / max(covered.sum(), 1)),
                "bits_per_byte_boundary": bpb(covered & ~inside), "bits_per_byte_inside": bpb(covered & inside)}
    return out


def _load_tok(spec: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(spec)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small corpus, short runs (minutes on a laptop CPU)")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--work", default=None, help="working directory (default /tmp/chorus-cross-{quick,full})")
    args = ap.parse_args()
    s = QUICK if args.quick else FULL
    seeds = [int(x) for x in args.seeds.split(",")]
    work = Path(args.work or f"/tmp/chorus-cross-{'quick' if args.quick else 'full'}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    t0 = time.perf_counter()

    # ---- corpus, tokenizers, stores
    docs = _demo_corpus.domain_documents(s.chars_per_domain)
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for d, texts in docs.items() for t in texts))
    texts = [t for ts in docs.values() for t in ts]
    toks = {"sp": sentencepiece_tokenizer(texts, s.vocab_sp, work / "tok-sp"), "bl": str(work / "tok-bl")}
    _demo_corpus.train_tokenizer(texts, s.vocab_bl, work / "tok-bl")
    stores = {k: str(work / f"store-{k}.zarr") for k in toks}
    for k, tok in toks.items():
        prepare.run(PrepareConfig(dataset=str(corpus), tokenizer=tok, out=stores[k], seq_len=s.seq_len,
                                  domain_field="domain", valid_fraction=0.1))

    def cfg(store: str, model: str, out: Path, steps: int, seed: int = 0, **kw) -> TrainConfig:
        return TrainConfig(store=store, student=model, out=str(out), steps=steps, batch_size=s.batch_size, lr=s.lr,
                           warmup_steps=10, seed=seed, eval_every=0, save_every=0, log_every=max(steps // 4, 1),
                           eval_rows=10_000, **kw)

    # ---- teachers: one architecture, steps and seed, each on its own store (CE)
    teacher_yaml = _llama_yaml(work / "teacher.yaml", s.teacher_hidden, s.seq_len)
    for k in toks:
        train.run(cfg(stores[k], teacher_yaml, work / f"teacher-{k}", s.teacher_steps))
    t_teachers = time.perf_counter() - t0

    # ---- caches: in each store its own teacher (same) and the other's (cross)
    other = {"sp": "bl", "bl": "sp"}
    cache_s, held_out, coverage_all = {}, {}, {}
    for k in toks:
        for name, src in (("same", k), ("cross", other[k])):
            t = time.perf_counter()
            cache.run(CacheConfig(store=stores[k], teacher=str(work / f"teacher-{src}" / "model"), name=name,
                                  top_k=s.top_k, batch_size=32))
            cache_s[f"{src}→{k}"] = time.perf_counter() - t
    for k in toks:
        held_out[f"{other[k]} teacher, native"] = bits_per_byte(stores[other[k]], "same")
        held_out[f"{other[k]} teacher → {k} store"] = bits_per_byte(stores[k], "cross", toks[other[k]])
        coverage_all[f"{other[k]}→{k}"] = Store.open(stores[k], "r").teacher_manifest("cross").tokenizer_mapping
        coverage_all[f"{other[k]}→{k}"]["native_bits_per_byte_all_rows"] = \
            bits_per_byte(stores[other[k]], "same", held_out=False)["bits_per_byte"]

    # ---- students on each store
    student_yaml = _llama_yaml(work / "student.yaml", s.student_hidden, s.seq_len)
    cells = {"CE only": {"kd_weight": 0.0}, "KD same tokenizer": {"teachers": ["same"], "kd_weight": s.kd_weight},
             "KD cross tokenizer": {"teachers": ["cross"], "kd_weight": s.kd_weight}}
    losses = {k: {c: [] for c in cells} for k in toks}
    for seed in seeds:
        for k in toks:
            for name, kw in cells.items():
                out = work / "students" / f"{k}-{name.replace(' ', '-')}-{seed}"
                res = train.run(cfg(stores[k], student_yaml, out, s.student_steps, seed=seed, train_rows=s.student_rows,
                                    **kw))
                losses[k][name].append(res["eval"]["mean"])
    gaps = {f"{other[k]}→{k}": [(ce - x) / (ce - same) if ce != same else float("nan") for ce, same, x in
                                zip(losses[k]["CE only"], losses[k]["KD same tokenizer"], losses[k]["KD cross tokenizer"])]
            for k in toks}

    # ---- report
    rows = [[f"store {k}: {name}", *(f"{v:.4f}" for v in vals), f"{statistics.mean(vals):.4f}"]
            for k in toks for name, vals in losses[k].items()]
    print(table(["student (held-out loss)", *(f"seed {x}" for x in seeds), "mean"], rows))
    print()
    print(table(["targets (held-out)", "coverage", "inside-token share", "bits/byte", "boundary", "inside"],
                [[k, f"{100 * v['coverage']:.1f}%", f"{100 * v['inside_share']:.1f}%" if "inside_share" in v else "-",
                  f"{v['bits_per_byte']:.4f}", f"{v.get('bits_per_byte_boundary', float('nan')):.4f}",
                  f"{v.get('bits_per_byte_inside', float('nan')):.4f}"] for k, v in held_out.items()]))
    print()
    print(table(["all rows", "teacher's own bits/byte", "its gold-text bits/byte at store positions",
                 "unplaced mass (tail bucket)"],
                [[d, f"{v['native_bits_per_byte_all_rows']:.4f}", f"{v['measured']['gold_text_bits_per_byte']:.4f}",
                  f"{v['measured']['unplaced_mass']:.3f}"] for d, v in coverage_all.items()]))
    print()
    for d, g in gaps.items():
        print(f"{d}: gap closed by the cross-tokenizer student {', '.join(f'{100 * x:.1f}%' for x in g)} "
              f"(mean {100 * statistics.mean(g):.1f}%)")
    path = write("cross_tokenizer", {
        "quick": args.quick, "seeds": seeds, "scale": asdict(s), "mapping": coverage_all, "held_out": held_out,
        "student_loss": losses, "gap_closed": gaps, "gap_closed_mean": {d: statistics.mean(g) for d, g in gaps.items()},
        "cache_seconds": cache_s, "teacher_seconds": t_teachers, "total_seconds": time.perf_counter() - t0})
    print(f"→ {path}")


if __name__ == "__main__":
    main()
