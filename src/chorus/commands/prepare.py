"""`chorus prepare`: tokenize a corpus, pack it into rows of ``seq_len`` tokens, and write a store.

setup (tokenizer, sources, store) → loop (read documents, tokenize in batches, pack per split and
domain, write whole shards) → finish (manifest with a deterministic fingerprint, written last).
A store without a manifest is a half-written one: `prepare` rebuilds it, every reader refuses it.
"""

from __future__ import annotations

import hashlib
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from chorus import __version__
from chorus.config import PrepareConfig
from chorus.corpus.packing import Packer
from chorus.corpus.sources import _files, iter_documents
from chorus.errors import ChorusError
from chorus.progress import Progress, say
from chorus.store import ArraySpec, CorpusManifest, Store, StreamHasher, fingerprint
from chorus.store.index import write_row_index
from chorus.store.tokenizer import load_tokenizer, tokenizer_files, tokenizer_info
from chorus.store.tokenizer_files import has_tokenizer_files, write_tokenizer_files

SPLITS = ("train", "valid")
PACKING = "eos-separated, per split and domain, padded tail row, one split per shard, v2"
TOKENS_PER_SHARD = 1 << 18


def is_valid_doc(text: str, fraction: float) -> bool:
    """Deterministic held-out choice by document: a hash of its text, independent of order and machine."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "little")
    return (h % 1_000_000) < fraction * 1_000_000


def _batches(docs: Iterator[tuple[str, str]], size: int, max_docs: int | None) -> Iterator[list[tuple[str, str]]]:
    batch, seen = [], 0
    for doc in docs:
        if max_docs is not None and seen >= max_docs:
            break
        batch.append(doc)
        seen += 1
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _prefetch(items: Iterator, depth: int = 2) -> Iterator:
    """Run a generator on a background thread so reading overlaps tokenization (which releases the GIL)."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work() -> None:
        try:
            for item in items:
                q.put(item)
            q.put(done)
        except BaseException as e:  # re-raised in the consumer
            q.put(e)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


@dataclass
class _Rows:
    """Rows waiting to fill a shard."""

    ids: list
    segs: list
    domain: list
    split: list

    def __len__(self) -> int:
        return len(self.ids)


class _CorpusWriter:
    """Streams rows into whole shards of the ``corpus`` unit, each shard of one split (rows in emit order): the
    held-out rows fill shards of their own, so an evaluation of a few hundred rows reads a few shards, not a
    slice of every shard. Only the last one or two shards (the splits' leftovers) mix splits. Also keeps
    the split and domain of every row written, for the store's row index."""

    def __init__(self, store: Store, seq_len: int, rows_per_shard: int, seg_dtype: str) -> None:
        self.store, self.rps = store, rows_per_shard
        self.specs = [
            ArraySpec("input_ids", (seq_len,), "int32"),
            ArraySpec("segment_ids", (seq_len,), seg_dtype),
            ArraySpec("domain", (), "uint16"),
            ArraySpec("split", (), "uint8"),
        ]
        store.create_arrays("corpus", self.specs, 0, rows_per_shard)
        self.pending = {s: _Rows([], [], [], []) for s in range(len(SPLITS))}
        self.rows = self.shards = self.tokens = 0
        self.index: list[tuple[np.ndarray, np.ndarray]] = []  # (split, domain) of each shard written

    def add(self, rows: list[tuple[np.ndarray, np.ndarray]], domain: int, split: int) -> None:
        for ids, segs in rows:
            p = self.pending[split]
            p.ids.append(ids)
            p.segs.append(segs)
            p.domain.append(domain)
            p.split.append(split)
            self.tokens += int((segs > 0).sum())
            if len(p) == self.rps:
                self._write(p)
                self.pending[split] = _Rows([], [], [], [])

    def _write(self, p: _Rows) -> None:
        arrays = {
            "input_ids": np.stack(p.ids).astype(np.int32),
            "segment_ids": np.stack(p.segs).astype(self.specs[1].dtype),
            "domain": np.asarray(p.domain, dtype=np.uint16),
            "split": np.asarray(p.split, dtype=np.uint8),
        }
        self.store.resize_rows("corpus", arrays, self.rows + len(p))
        self.store.write_shard("corpus", self.shards, self.rows, arrays)
        self.index.append((arrays["split"], arrays["domain"]))
        self.rows += len(p)
        self.shards += 1

    def close(self) -> tuple[np.ndarray, np.ndarray]:
        """Write the leftovers (only the last shard may be short) and return the row index (split, domain)."""
        rest = _Rows([], [], [], [])
        for p in self.pending.values():
            for mine, theirs in zip((rest.ids, rest.segs, rest.domain, rest.split), (p.ids, p.segs, p.domain, p.split)):
                mine.extend(theirs)
        for lo in range(0, len(rest), self.rps):
            part = slice(lo, lo + self.rps)
            self._write(_Rows(rest.ids[part], rest.segs[part], rest.domain[part], rest.split[part]))
        return np.concatenate([x[0] for x in self.index]), np.concatenate([x[1] for x in self.index])


def _build(cfg: PrepareConfig, store: Store | None, tok, tok_info) -> tuple[str, int, int, int, dict, list[str]]:
    """Read, tokenize and pack everything, and write the row index last. With ``store=None`` nothing is
    written (fingerprint only)."""
    rps = cfg.rows_per_shard or max(1, TOKENS_PER_SHARD // cfg.seq_len)
    seg_dtype = "uint16" if cfg.seq_len < 65536 else "uint32"
    writer = _CorpusWriter(store, cfg.seq_len, rps, seg_dtype) if store is not None else None
    text_hash, rows_hash = StreamHasher(), StreamHasher()
    domains: dict[str, int] = {}
    packers: dict[tuple[int, int], Packer] = {}
    split_rows = {s: 0 for s in SPLITS}
    docs = 0

    def emit(rows: list, domain: int, split: int) -> None:
        split_rows[SPLITS[split]] += len(rows)
        for ids, segs in rows:
            rows_hash.update_array(ids)
            rows_hash.update_array(segs.astype(np.int64))
        if writer is not None:
            writer.add(rows, domain, split)

    stream = iter_documents(cfg.dataset, text_field=cfg.text_field, domain_field=cfg.domain_field, split=cfg.split)
    with Progress("prepare", unit="docs") as bar:
        for batch in _prefetch(_batches(stream, cfg.batch_size, cfg.max_docs)):
            encoded = tok([text for _, text in batch], add_special_tokens=False)["input_ids"]
            for (domain_name, text), ids in zip(batch, encoded):
                text_hash.update_text(domain_name)
                text_hash.update_text(text)
                d = domains.setdefault(domain_name, len(domains))
                s = int(is_valid_doc(text, cfg.valid_fraction))
                packer = packers.setdefault((s, d), Packer(cfg.seq_len, tok_info.eos_id, tok_info.pad_id))
                emit(packer.add(ids), d, s)
            docs += len(batch)
            bar.update(len(batch), tokens=sum(len(x) + 1 for x in encoded))
        for (s, d), packer in sorted(packers.items()):
            emit(packer.flush(), d, s)
    if docs == 0:
        raise ChorusError(f"dataset '{cfg.dataset}' has no documents with text in field '{cfg.text_field}'")
    index = writer.close() if writer is not None else None
    settings = {"seq_len": cfg.seq_len, "valid_fraction": cfg.valid_fraction, "max_docs": cfg.max_docs,
                "packing": PACKING, "rows_per_shard": rps}
    fp = fingerprint("corpus", tok_info.fingerprint, settings, text_hash.hexdigest(), rows_hash.hexdigest())
    num_rows = sum(split_rows.values())
    tokens = writer.tokens if writer is not None else 0
    if index is not None:  # after every corpus shard is committed, before the manifest
        write_row_index(store, *index, fingerprint=fp)
    return fp, num_rows, rps, tokens, split_rows, list(domains)


def _inputs_fingerprint(cfg: PrepareConfig, tok_info) -> str | None:
    """What decides the store, without reading the text: settings, tokenizer and, for local files, each file's
    path, size and modification time (as `make` does). None for a hub dataset (no cheap identity): a rerun
    then re-tokenizes to compare the corpus fingerprint. A file edited in place keeping size and mtime is not
    seen: pass --overwrite."""
    path = Path(os.path.expanduser(cfg.dataset))
    if not path.exists():
        return None
    files = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in _files(path)]
    return fingerprint("prepare inputs", PACKING, tok_info.fingerprint, files, cfg.text_field, cfg.domain_field,
                       cfg.split, cfg.seq_len, cfg.valid_fraction, cfg.max_docs,
                       cfg.rows_per_shard or max(1, TOKENS_PER_SHARD // cfg.seq_len))


def _tokenizer_source(spec: str) -> str:
    """Where the tokenizer was read from (an absolute path for a directory, else the hub id): `chorus train`
    saves it with the model it outputs."""
    path = os.path.expanduser(spec)
    return os.path.abspath(path) if os.path.isdir(path) else spec


def run(cfg: PrepareConfig) -> CorpusManifest:
    if cfg.seq_len < 2:
        raise ChorusError(f"--seq-len must be at least 2 (a row needs an input and a next token), got {cfg.seq_len}")
    if not 0.0 <= cfg.valid_fraction < 1.0:
        raise ChorusError(f"--valid-fraction must be in [0, 1), got {cfg.valid_fraction}")
    if cfg.batch_size < 1:
        raise ChorusError(f"--batch-size must be a positive integer, got {cfg.batch_size}")
    if cfg.rows_per_shard is not None and cfg.rows_per_shard < 1:
        raise ChorusError(f"--rows-per-shard must be a positive integer, got {cfg.rows_per_shard}")
    if cfg.max_docs is not None and cfg.max_docs < 1:
        raise ChorusError(f"--max-docs must be a positive integer, got {cfg.max_docs}")
    tok = load_tokenizer(cfg.tokenizer)
    tok_info = tokenizer_info(tok, cfg.tokenizer)

    inputs = _inputs_fingerprint(cfg, tok_info)
    if Store.exists(cfg.out, cfg.storage_options) and not cfg.overwrite:
        existing = Store.open(cfg.out, "r", cfg.storage_options)
        if existing.group.attrs.get("chorus") is not None:  # a finished store: same inputs → nothing to do
            old = existing.manifest
            if not (inputs is not None and old.source.get("inputs") == inputs):  # else same files: no re-tokenizing
                fp, *_ = _build(cfg, None, tok, tok_info)
                if fp != old.fingerprint:
                    raise ChorusError(
                        f"store '{cfg.out}' exists with another corpus (fingerprint {old.fingerprint}, new {fp}); "
                        "pass --overwrite to replace it and every teacher cache in it, or choose another --out"
                    )
            added = ""
            if not has_tokenizer_files(existing) and tok_info.fingerprint == old.tokenizer.fingerprint:
                # prepared before stores kept their tokenizer: the copy is added, nothing else changes
                write_tokenizer_files(Store.open(cfg.out, "a", cfg.storage_options), tokenizer_files(tok),
                                      fingerprint=tok_info.fingerprint)
                added = "; added a copy of its tokenizer"
            say(f"store '{cfg.out}' is already prepared from these inputs ({old.num_rows} rows); nothing to do{added}")
            return old
    store = Store.open(cfg.out, "w", cfg.storage_options)
    fp, num_rows, rps, tokens, split_rows, domains = _build(cfg, store, tok, tok_info)
    if cfg.valid_fraction > 0 and split_rows["valid"] == 0:
        say("warning: no document was held out for validation; raise --valid-fraction for held-out metrics")
    manifest = CorpusManifest(
        fingerprint=fp,
        tokenizer=tok_info,
        seq_len=cfg.seq_len,
        num_rows=num_rows,
        rows_per_shard=rps,
        domains=tuple(domains),
        num_tokens=tokens,
        split_rows=split_rows,
        source={"dataset": cfg.dataset, "text_field": cfg.text_field, "domain_field": cfg.domain_field,
                "split": cfg.split, "valid_fraction": cfg.valid_fraction, "max_docs": cfg.max_docs,
                "tokenizer": _tokenizer_source(cfg.tokenizer), "inputs": inputs},
        created_by=__version__,
    )
    write_tokenizer_files(store, tokenizer_files(tok), fingerprint=tok_info.fingerprint)  # the store reads back alone
    store.write_manifest(manifest)  # last: only now is the store a store
    say(f"prepared {num_rows} rows x {cfg.seq_len} tokens ({tokens:,} real tokens, {len(domains)} domains: "
        f"{', '.join(domains)}; splits {split_rows}) → {cfg.out}")
    return manifest
