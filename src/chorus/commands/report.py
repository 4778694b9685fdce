"""`chorus inspect` and `chorus verify`: what a store holds and whether its bytes are intact.

For a teacher cached with statistics (format v2), inspect also reports per domain the teacher's mean entropy,
mean tail mass (outside its top-k) and mean NLL of the gold next token, over the positions that predict a
real token (the position and the next one both inside a document: segment id > 0). For a teacher with its own
tokenizer (a cross-tokenizer cache) it reports the share of those positions that have a target (coverage): the
statistics are means over the covered ones.
"""

from __future__ import annotations

import json

import numpy as np

from chorus.config import InspectConfig, VerifyConfig
from chorus.errors import ChorusError
from chorus.store.check import problems
from chorus.store.index import verify_corpus
from chorus.store.manifest import CorpusManifest, TeacherManifest, no_target
from chorus.store.targets import STATS_FIELDS
from chorus.store.zarr_store import Store

STATS_ARRAYS = ("stats", "tail_logz")
STATS_MAX_SHARDS = 64  # inspect reads the statistics of at most this many committed shards, evenly spread
NO_STATS = "no statistics (format v1): recache for exact targets"
_LOG_TAIL, _ENTROPY, _GOLD = (STATS_FIELDS.index(f) for f in ("log_tail", "entropy", "gold_logprob"))


def teacher_statistics(store: Store, teacher: TeacherManifest, corpus: CorpusManifest, *,
                       max_shards: int = STATS_MAX_SHARDS) -> dict:
    """Per-domain (and overall) means of entropy, tail mass τ and NLL (−log p(gold)) over the positions t with
    segment_ids[t] > 0 and segment_ids[t + 1] > 0, from at most ``max_shards`` committed shards."""
    unit = f"teachers/{teacher.name}"
    commits = store.commits(unit)
    shards = sorted(commits)
    if len(shards) > max_shards:
        shards = [shards[i] for i in np.unique(np.linspace(0, len(shards) - 1, max_shards).round().astype(int))]
    sums = np.zeros((len(corpus.domains), 3))
    counts = np.zeros(len(corpus.domains), dtype=np.int64)
    reals = np.zeros(len(corpus.domains), dtype=np.int64)
    for shard in shards:
        st = store.read_shard(unit, shard, ["stats"], commit=commits[shard])["stats"][:, :-1].astype(np.float64)
        rows = store.read_shard("corpus", shard, ["segment_ids", "domain"])
        seg, domain = rows["segment_ids"], rows["domain"].astype(np.int64)
        real = (seg[:, :-1] > 0) & (seg[:, 1:] > 0)  # position t predicts token t + 1 of a document
        covered = real & ~no_target(st[..., _ENTROPY])  # a cross-tokenizer teacher's masked positions: no target
        values = np.stack([st[..., _ENTROPY], np.exp(st[..., _LOG_TAIL]), -st[..., _GOLD]], -1)
        np.add.at(sums, domain, np.where(covered[..., None], values, 0.0).sum(1))
        np.add.at(counts, domain, covered.sum(1))
        np.add.at(reals, domain, real.sum(1))

    def means(s: np.ndarray, n: int, r: int) -> dict:
        m = s / max(n, 1)
        return {"positions": int(n), "mean_entropy": float(m[0]), "mean_tail_mass": float(m[1]), "mean_nll": float(m[2]),
                "coverage": float(n / max(r, 1))}

    return {"shards_read": len(shards), "shards_committed": len(commits),
            "domains": {d: means(sums[i], counts[i], reals[i]) for i, d in enumerate(corpus.domains)},
            "all": means(sums.sum(0), int(counts.sum()), int(reals.sum()))}


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
            "format_version": t.format_version,
            "top_k": t.top_k,
            "samples": t.num_samples,
            "value_codec": t.value_codec,
            "temperature": t.temperature,
            "shards_committed": len(store.commits(unit)),
            "bytes_per_token": per_array,
            "total_bytes_per_token": sum(per_array.values()),
            "statistics": None,
            "tokenizer_mapping": t.tokenizer_mapping or None,
        }
        if t.has_stats:
            out["teachers"][name]["statistics"] = {
                "tail_betas": list(t.tail_betas),
                "bytes_per_token": sum(per_array.get(n, 0.0) for n in STATS_ARRAYS),
                **teacher_statistics(store, t, m),
            }
        else:
            out["teachers"][name]["note"] = NO_STATS
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
        _print_mapping(t)
        _print_statistics(t)
    return 0


def _print_mapping(t: dict) -> None:
    mp = t["tokenizer_mapping"]
    if not mp:
        return
    tok, cov = mp["tokenizer"], mp.get("coverage")
    where = f"{100 * cov:.1f}% of positions have a target" if cov is not None else "coverage known once complete"
    unplaced = mp.get("measured", {}).get("unplaced_mass")
    where += f", mean unplaced mass {unplaced:.3f}" if unplaced is not None else ""
    branches = f" with {mp['branches']} branch tokens" if mp.get("branches") else ""
    print(f"  own tokenizer {tok['name']} (vocab {tok['vocab_size']}), mapped by {mp['method']} v{mp['version']}"
          f"{branches}: {where}; elsewhere the hard label")


def _print_statistics(t: dict) -> None:
    st = t["statistics"]
    if st is None:
        print(f"  {t['note']}")
        return
    print(f"  statistics (format v{t['format_version']}, {st['bytes_per_token']:.1f} B/token), over positions that "
          f"predict a real token ({st['shards_read']} of {st['shards_committed']} committed shards):")
    cross = bool(t.get("tokenizer_mapping"))
    print(f"    {'domain':<16} {'positions':>10} {'entropy':>9} {'tail mass':>10} {'teacher NLL':>12}"
          + (f" {'coverage':>9}" if cross else ""))
    for d, r in [*st["domains"].items(), ("(all)", st["all"])]:
        print(f"    {d:<16} {r['positions']:>10,} {r['mean_entropy']:>9.4f} {r['mean_tail_mass']:>10.4f} {r['mean_nll']:>12.4f}"
              + (f" {100 * r['coverage']:>8.1f}%" if cross else ""))


def verify_command(url: str, *, storage_options: dict | None = None) -> int:
    """Structure first (every fact a reader relies on: see ``check``), then every committed chunk's checksum."""
    store = Store.open(url, "r", storage_options)
    bad = list(problems(store))
    units = ["corpus"] + [f"teachers/{n}" for n in store.teacher_names()]
    checked = 0
    if not bad:
        for unit in units:
            checked += len(store.commits(unit))
            bad += verify_corpus(store) if unit == "corpus" else store.verify(unit)
    for line in bad:
        print(f"BAD  {line}")
    print(f"verified {checked} shards in {len(units)} units: {len(bad)} bad")
    if bad:
        fix = "" if "; " in bad[0] else "; rerun the job that wrote it with --overwrite"
        raise ChorusError(f"'{url}' is damaged ({len(bad)} problem(s)); first: {bad[0]}{fix}")
    return 0


def run_inspect(cfg: InspectConfig) -> int:
    return inspect_command(cfg.store, as_json=cfg.json, storage_options=cfg.storage_options)


def run_verify(cfg: VerifyConfig) -> int:
    return verify_command(cfg.store, storage_options=cfg.storage_options)
