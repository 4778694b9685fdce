"""Loading a tokenizer and describing it for the manifest (identity = fingerprint, vocabulary = id table)."""

from __future__ import annotations

import os
import tempfile

from chorus.errors import ChorusError, IntegrityError
from chorus.progress import say
from chorus.store import TokenizerInfo, fingerprint
from chorus.store.tokenizer_files import read_tokenizer_files


def load_tokenizer(spec: str, *, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    if spec.startswith((".", "/", "~")) and not os.path.exists(os.path.expanduser(spec)):
        raise ChorusError(f"tokenizer '{spec}' not found: no such directory")
    try:
        return AutoTokenizer.from_pretrained(os.path.expanduser(spec), trust_remote_code=trust_remote_code)
    except Exception as e:  # OSError / HF hub errors / ValueError for unknown types
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ChorusError(f"tokenizer '{spec}' could not be loaded ({first}); pass a local tokenizer directory or a hub id") from None


def vocab_fingerprint(tok) -> str:
    vocab = tok.get_vocab()
    return fingerprint(sorted((int(i), str(t)) for t, i in vocab.items()))


def tokenizer_info(tok, name: str) -> TokenizerInfo:
    """Fingerprint the whole tokenizer: its serialized form when fast, else its vocabulary and class."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = backend.to_str()
    else:
        body = [type(tok).__name__, sorted((int(i), str(t)) for t, i in tok.get_vocab().items())]
    specials = {k: str(v) for k, v in sorted(tok.special_tokens_map.items())}
    eos = tok.eos_token_id
    if eos is None:
        raise ChorusError(f"tokenizer '{name}' has no EOS token; documents cannot be separated: set eos_token and save it")
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    return TokenizerInfo(
        name=os.path.basename(os.path.normpath(name)) if os.path.isdir(os.path.expanduser(name)) else name,
        vocab_size=len(tok),
        fingerprint=fingerprint(body, specials),
        vocab_fingerprint=vocab_fingerprint(tok),
        eos_id=int(eos),
        pad_id=int(pad),
    )


def tokenizer_files(tok) -> dict[str, bytes]:
    """The files ``save_pretrained`` writes for ``tok`` (name → bytes): what a store keeps of its tokenizer."""
    with tempfile.TemporaryDirectory(prefix="chorus-tokenizer-") as d:
        tok.save_pretrained(d)
        files = {}
        for name in sorted(os.listdir(d)):
            path = os.path.join(d, name)
            if os.path.isfile(path):
                with open(path, "rb") as f:
                    files[name] = f.read()
        return files


def store_tokenizer(store, manifest) -> tuple[object | None, str | None]:
    """The store's tokenizer: its own copy (``tokenizer/`` in the store, checksummed), else where `chorus prepare`
    read it from (a directory or hub id, for stores written before the copy existed); only one whose fingerprint
    is the store's. (tokenizer, where it came from) or (None, None)."""
    try:
        got = read_tokenizer_files(store)
    except IntegrityError as e:  # a damaged copy is not used; where prepare read it from may still serve
        say(f"warning: {e}")
        got = None
    if got is not None and got[1] == manifest.tokenizer.fingerprint:
        with tempfile.TemporaryDirectory(prefix="chorus-tokenizer-") as d:
            for name, blob in got[0].items():
                with open(os.path.join(d, name), "wb") as f:
                    f.write(blob)
            tok = load_tokenizer(d)
            if tokenizer_info(tok, d).fingerprint == manifest.tokenizer.fingerprint:
                return tok, f"{store.url}/tokenizer"
    recorded = manifest.source.get("tokenizer")
    name = manifest.tokenizer.name
    candidates = [recorded] if recorded else []
    if name != recorded and (os.path.isdir(os.path.expanduser(name)) or "/" in name):  # a path or an org/name id
        candidates.append(name)
    for spec in candidates:
        try:
            tok = load_tokenizer(spec)
            if tokenizer_info(tok, spec).fingerprint == manifest.tokenizer.fingerprint:
                return tok, spec
        except ChorusError:
            continue
    return None, None
