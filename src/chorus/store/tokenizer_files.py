"""The store's own copy of its tokenizer: ``tokenizer/`` holds the files `chorus prepare` tokenized with, so a store
shared by a team (on object storage, on another machine) carries what reads it back into text: a teacher with
another tokenizer is mapped through it (``chorus cache``) and a trained student is saved with it (``chorus train``),
without the directory or hub id the preparer happened to use.

``tokenizer/index.json`` is written last (a store without it has no copy: stores of older versions, or a prepare that
stopped early): the tokenizer's fingerprint (the manifest's) and each file's checksum, checked on every read.
"""

from __future__ import annotations

import json
import posixpath

from chorus.errors import ChorusError, IntegrityError
from chorus.store.fingerprint import checksum, matches
from chorus.store.zarr_store import Store

TOKENIZER_DIR = "tokenizer"
INDEX = "index.json"


def write_tokenizer_files(store: Store, files: dict[str, bytes], *, fingerprint: str) -> None:
    """Write (replacing any) the tokenizer's ``files`` (name → bytes, flat names), then the index that lists them."""
    root = f"{store.root}/{TOKENIZER_DIR}"
    if store.fs.exists(root):
        store.fs.rm(root, recursive=True)
    for name in files:
        if not name or name != posixpath.basename(name) or name == INDEX or name.startswith("."):
            raise ChorusError(f"tokenizer file name {name!r} cannot be stored; expected a plain file name")
    for name, blob in sorted(files.items()):
        store.put_whole(f"{root}/{name}", blob)
    index = {"fingerprint": fingerprint, "files": {name: checksum(blob) for name, blob in sorted(files.items())}}
    store.put_whole(f"{root}/{INDEX}", json.dumps(index, indent=1, sort_keys=True).encode())


def has_tokenizer_files(store: Store) -> bool:
    """Whether the store has a copy (its index exists; nothing is read or checked)."""
    return store.fs.exists(f"{store.root}/{TOKENIZER_DIR}/{INDEX}")


def read_tokenizer_files(store: Store) -> tuple[dict[str, bytes], str] | None:
    """(files, fingerprint) of the store's copy, every checksum verified; None when the store has no copy."""
    root = f"{store.root}/{TOKENIZER_DIR}"
    try:
        raw = store.fs.cat_file(f"{root}/{INDEX}")
    except FileNotFoundError:
        return None
    fix = f"`chorus prepare --overwrite` writes it again (or remove {root}: the directory prepare read is used then)"
    try:
        index = json.loads(raw)
        wanted, fingerprint = dict(index["files"]), str(index["fingerprint"])
    except (ValueError, KeyError, TypeError) as e:
        raise IntegrityError(f"{root}/{INDEX} is unreadable ({e}); {fix}") from None
    files = {}
    for name, expected in sorted(wanted.items()):
        try:
            blob = store.fs.cat_file(f"{root}/{name}")
        except FileNotFoundError:
            raise IntegrityError(f"the store's tokenizer file {root}/{name} is missing; {fix}") from None
        if not matches(blob, expected):
            raise IntegrityError(f"the store's tokenizer file {root}/{name} does not match its checksum; {fix}")
        files[name] = blob
    return files, fingerprint


def tokenizer_problems(store: Store, fingerprint: str) -> list[str]:
    """For ``chorus verify``: what is wrong with the store's copy of its tokenizer (nothing when it has none)."""
    try:
        got = read_tokenizer_files(store)
    except IntegrityError as e:
        return [str(e)]
    if got is not None and got[1] != fingerprint:
        return [f"the store's tokenizer copy is of tokenizer {got[1]}, its corpus of {fingerprint}; "
                f"`chorus prepare --overwrite` writes it again"]
    return []


def byte_level_table() -> dict[str, int]:
    """GPT-2's byte ↔ printable-unicode table (inverse): the character of a byte-level token → its byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars, n = list(keep), 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(keep, chars)}


def component_types(node) -> set[str]:
    """Every component ``type`` in a tokenizer.json subtree (Sequence members included)."""
    if isinstance(node, dict):
        return ({node["type"]} if isinstance(node.get("type"), str) else set()).union(*map(component_types, node.values()))
    if isinstance(node, list):
        return set().union(*map(component_types, node)) if node else set()
    return set()


def tokenizer_vocabulary(tokenizer_json: bytes | str) -> dict[str, int]:
    """Token string → id of a ``tokenizer.json`` (its model's vocabulary and its added tokens): what two tokenizers
    must share for one's ids to mean the other's text."""
    spec = json.loads(tokenizer_json)
    vocab = spec.get("model", {}).get("vocab", {})
    out = dict(vocab) if isinstance(vocab, dict) else {p[0]: i for i, p in enumerate(vocab)}
    out.update({a["content"]: a["id"] for a in spec.get("added_tokens", [])})
    return out


def store_vocabulary(store: Store) -> dict[str, int] | None:
    """:func:`tokenizer_vocabulary` of the store's copy of its tokenizer (None: no copy)."""
    got = read_tokenizer_files(store)
    if got is None or "tokenizer.json" not in got[0]:
        return None
    return tokenizer_vocabulary(got[0]["tokenizer.json"])


def token_byte_lengths(store: Store, vocab_size: int) -> list[int] | None:
    """(V,) how many bytes of text each store token stands for (special tokens 0), read from the store's copy of its
    ``tokenizer.json``: bits per byte need them, to compare models whose tokens differ. None: no copy."""
    got = read_tokenizer_files(store)
    if got is None or "tokenizer.json" not in got[0]:
        return None
    spec = json.loads(got[0]["tokenizer.json"])
    kinds = component_types(spec.get("pre_tokenizer")) | component_types(spec.get("decoder"))
    table = byte_level_table() if "ByteLevel" in kinds else None
    vocab = spec.get("model", {}).get("vocab", {})
    pairs = vocab.items() if isinstance(vocab, dict) else ((p[0], i) for i, p in enumerate(vocab))  # BPE / Unigram
    out = [0] * vocab_size
    for piece, i in pairs:
        if not 0 <= i < vocab_size:
            continue
        if table is not None and all(c in table for c in piece):
            out[i] = len(piece)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">") and "ByteFallback" in kinds:
            out[i] = 1
        else:
            out[i] = len(piece.replace("▁", " ").encode())
    for added in spec.get("added_tokens", []):
        if 0 <= added["id"] < vocab_size:
            out[added["id"]] = 0 if added.get("special") else len(added["content"].encode())
    return out
