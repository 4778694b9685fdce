"""Loading a tokenizer and describing it for the manifest (identity = fingerprint, vocabulary = id table)."""

from __future__ import annotations

import os

from chorus.errors import ChorusError
from chorus.storage import TokenizerInfo, fingerprint


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
