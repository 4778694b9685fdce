"""`chorus prepare` throughput against a bare batched tokenizer loop over the same text.

The ratio is what matters: prepare adds reading through `datasets`, hashing, packing, compression and
shard commits on top of tokenization. Both run in this process, back to back, on the same documents.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from _common import table, write  # noqa: E402

from chorus.commands import prepare  # noqa: E402
from chorus.config import PrepareConfig  # noqa: E402
from chorus.demo.corpus import domain_documents, train_tokenizer  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    chars = 300_000 if args.quick else 2_000_000
    seq_len, batch = 512, 1000
    work = Path(tempfile.mkdtemp(prefix="chorus-bench-prepare-"))
    docs = domain_documents(chars)
    texts = [t for ts in docs.values() for t in ts]
    train_tokenizer(texts[:2000], 4096, work / "tok")
    corpus = work / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": t, "domain": d}) + "\n" for d, ts in docs.items() for t in ts))

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    results = []
    for trial in range(2 if args.quick else 3):
        t0 = time.perf_counter()
        n_bare = 0
        for i in range(0, len(texts), batch):
            n_bare += sum(len(x) + 1 for x in tok(texts[i : i + batch], add_special_tokens=False)["input_ids"])
        bare = time.perf_counter() - t0
        t0 = time.perf_counter()
        m = prepare.run(PrepareConfig(dataset=str(corpus), tokenizer=str(work / "tok"), out=str(work / f"s{trial}.zarr"),
                                      seq_len=seq_len, domain_field="domain", batch_size=batch, overwrite=True))
        full = time.perf_counter() - t0
        results.append({"bare_tok_per_s": n_bare / bare, "prepare_tok_per_s": m.num_tokens / full, "ratio": (m.num_tokens / full) / (n_bare / bare)})
    best = max(results, key=lambda r: r["ratio"])
    rows = [[i, r["bare_tok_per_s"], r["prepare_tok_per_s"], r["ratio"]] for i, r in enumerate(results)]
    print(table(["trial", "bare tokenizer tok/s", "chorus prepare tok/s", "ratio"], rows))
    path = write("prepare", {"quick": args.quick, "documents": len(texts), "tokens": m.num_tokens, "seq_len": seq_len,
                             "trials": results, "median_ratio": sorted(r["ratio"] for r in results)[len(results) // 2], "best": best})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
