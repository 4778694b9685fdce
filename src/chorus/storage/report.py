"""`chorus inspect` and `chorus verify`: what a store holds and whether its bytes are intact."""

from __future__ import annotations

import json

from chorus.errors import ChorusError
from chorus.storage._store import Store


def describe(store: Store) -> dict:
    m = store.manifest
    tokens = m.num_rows * m.seq_len
    corpus_commits = store.commits("corpus")
    out = {
        "url": store.url,
        "manifest": m.to_dict(),
        "rows": m.num_rows,
        "tokens": m.num_tokens,
        "shards": {"total": m.num_shards, "committed": len(corpus_commits)},
        "domains": list(m.domains),
        "corpus_bytes_per_token": {n: store.nbytes("corpus", n) / max(tokens, 1) for n in store.array_names("corpus")},
        "teachers": {},
    }
    for name in store.teacher_names():
        t = store.teacher_manifest(name)
        unit = f"teachers/{name}"
        per_array = {n: store.nbytes(unit, n) / max(tokens, 1) for n in store.array_names(unit)}
        out["teachers"][name] = {
            "model": t.model,
            "status": t.status,
            "top_k": t.top_k,
            "samples": t.num_samples,
            "value_codec": t.value_codec,
            "temperature": t.temperature,
            "shards_committed": len(store.commits(unit)),
            "bytes_per_token": per_array,
            "total_bytes_per_token": sum(per_array.values()),
        }
    return out


def inspect_command(url: str, *, as_json: bool = False, storage_options: dict | None = None) -> int:
    info = describe(Store.open(url, "r", storage_options))
    if as_json:
        print(json.dumps(info, indent=2))
        return 0
    m = info["manifest"]
    print(f"store        {info['url']}")
    print(f"format       v{m['format_version']} (chorus {m['created_by']})  fingerprint {m['fingerprint']}")
    print(f"tokenizer    {m['tokenizer']['name']}  vocab {m['tokenizer']['vocab_size']}  fingerprint {m['tokenizer']['fingerprint']}")
    print(f"corpus       {info['rows']} rows x {m['seq_len']} tokens  ({info['tokens']:,} real tokens)  "
          f"shards {info['shards']['committed']}/{info['shards']['total']}  splits {m['split_rows']}")
    print(f"domains      {', '.join(info['domains'])}")
    for name, bpt in info["corpus_bytes_per_token"].items():
        print(f"  corpus/{name:<14} {bpt:8.2f} B/token")
    for name, t in info["teachers"].items():
        print(f"teacher      {name}: {t['model']}  {t['status']}  k={t['top_k']} samples={t['samples']} "
              f"values={t['value_codec']} T={t['temperature']:.3f}  shards {t['shards_committed']}/{info['shards']['total']}  "
              f"{t['total_bytes_per_token']:.1f} B/token")
    return 0


def verify_command(url: str, *, storage_options: dict | None = None) -> int:
    store = Store.open(url, "r", storage_options)
    units = ["corpus"] + [f"teachers/{n}" for n in store.teacher_names()]
    bad, checked = [], 0
    for unit in units:
        checked += len(store.commits(unit))
        bad += store.verify(unit)
    for line in bad:
        print(f"BAD  {line}")
    print(f"verified {checked} shards in {len(units)} units: {len(bad)} bad")
    if bad:
        raise ChorusError(f"{len(bad)} corrupt shard(s) in '{url}'; rerun the job that wrote each with --overwrite")
    return 0
