"""The demo's corpus and tokenizer, built from text that ships with every Python install.

Three domains that a small model cannot mistake for one another:

- ``code``: the standard library's own ``.py`` source (tests and site-packages left out),
  cut into chunks at line boundaries;
- ``prose``: the language reference behind ``help()`` (``pydoc_data.topics``, ~465k chars of
  English technical writing), one document per group of paragraphs;
- ``unicode``: the Unicode character-name table (``unicodedata``), one line per code point
  (``U+00E9 LATIN SMALL LETTER E WITH ACUTE é``), 64 consecutive code points per document.
  Structured, highly regular text unlike the other two: a model must learn hex counting and a
  closed vocabulary of names, which neither code nor prose teaches.

Everything is deterministic for a given Python: sorted file lists, fixed caps, evenly spaced picks
(no random sampling). Domains are balanced by *tokens* after the tokenizer is trained, so each
domain contributes the same number of tokens to the store.
"""

from __future__ import annotations

import json
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from chorus.errors import ChorusError

DOMAINS = ("code", "prose", "unicode")
SPECIALS = ("<eos>", "<pad>")
CHUNK_CHARS = 2000  # target size of a code / prose document
UNICODE_BLOCK = 64  # code points per unicode document
# Names generated from a pattern (``CJK UNIFIED IDEOGRAPH-4E00``): tens of thousands of near-identical
# lines that would swamp the table's real names.
_GENERATED = ("CJK UNIFIED IDEOGRAPH-", "CJK COMPATIBILITY IDEOGRAPH-", "TANGUT IDEOGRAPH-", "TANGUT COMPONENT-",
              "KHITAN SMALL SCRIPT CHARACTER-", "NUSHU CHARACTER-", "HANGUL SYLLABLE ", "EGYPTIAN HIEROGLYPH ",
              "CUNEIFORM SIGN ", "ANATOLIAN HIEROGLYPH ", "BAMUM LETTER PHASE-", "LINEAR A SIGN ", "SIGNWRITING ",
              "MEROITIC CURSIVE ", "VARIATION SELECTOR-", "YI SYLLABLE ", "TAG ")
_SKIP_DIRS = {"site-packages", "test", "tests", "idle_test", "__pycache__", "lib2to3"}


def _evenly(items: list, n: int) -> list:
    """``n`` items spread evenly over ``items`` (all of them when there are fewer): a fixed,
    representative pick instead of the first ``n`` (which would be one package, one script)."""
    if len(items) <= n:
        return list(items)
    return [items[(i * len(items)) // n] for i in range(n)]


def _chunks(text: str, size: int) -> Iterator[str]:
    """Cut at line boundaries into pieces of about ``size`` characters."""
    buf: list[str] = []
    n = 0
    for line in text.splitlines(keepends=True):
        buf.append(line)
        n += len(line)
        if n >= size:
            yield "".join(buf)
            buf, n = [], 0
    if buf and "".join(buf).strip():
        yield "".join(buf)


def code_documents(max_chars: int) -> list[str]:
    """One chunk from the middle of each of evenly spaced source files (more per file only when the
    budget outgrows the file list): many modules' code rather than a few modules' license headers."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in stdlib.rglob("*.py") if not _SKIP_DIRS.intersection(p.relative_to(stdlib).parts))
    if not files:
        raise ChorusError(f"no standard-library .py files under '{stdlib}'; the demo needs Python's source files")
    n = max(1, max_chars // CHUNK_CHARS)
    per_file = -(-n // len(files))
    docs: list[str] = []
    for f in _evenly(files, n):
        try:
            chunks = [c for c in _chunks(f.read_text(encoding="utf-8"), CHUNK_CHARS) if c.strip()]
        except (UnicodeDecodeError, OSError):
            continue
        mid = len(chunks) // 2
        docs.extend(chunks[max(0, mid - per_file // 2):][:per_file])
    return docs[:n]


def prose_documents(max_chars: int) -> list[str]:
    from pydoc_data.topics import topics

    docs = []
    for name in sorted(topics):
        paragraphs = [p for p in topics[name].split("\n\n") if p.strip()]
        buf: list[str] = []
        n = 0
        for p in paragraphs:
            buf.append(p)
            n += len(p)
            if n >= CHUNK_CHARS:
                docs.append("\n\n".join(buf))
                buf, n = [], 0
        if buf:
            docs.append("\n\n".join(buf))
    return _evenly(docs, max(1, max_chars // CHUNK_CHARS))


def _unicode_line(cp: int) -> str | None:
    ch = chr(cp)
    name = unicodedata.name(ch, None)
    if name is None or name.startswith(_GENERATED):
        return None
    shown = "" if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Zl", "Zp", "Mn", "Me") else " " + ch
    return f"U+{cp:04X} {name}{shown}"


def unicode_documents(max_chars: int) -> list[str]:
    lines = [line for cp in range(sys.maxunicode + 1) if (line := _unicode_line(cp)) is not None]
    blocks = ["\n".join(lines[i:i + UNICODE_BLOCK]) + "\n" for i in range(0, len(lines), UNICODE_BLOCK)]
    per_block = max(1, sum(map(len, blocks)) // len(blocks))
    return _evenly(blocks, max(1, max_chars // per_block))


def domain_documents(max_chars: int) -> dict[str, list[str]]:
    """Every domain's documents, each capped at about ``max_chars`` characters."""
    return {"code": code_documents(max_chars), "prose": prose_documents(max_chars),
            "unicode": unicode_documents(max_chars)}


def train_tokenizer(texts: list[str], vocab_size: int, out_dir: str | Path) -> None:
    """Byte-level BPE (GPT-2 style: any byte sequence is encodable), saved as a ``transformers``
    tokenizer directory that `chorus prepare` and the models load with ``AutoTokenizer``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIALS[0], pad_token=SPECIALS[1])
    fast.save_pretrained(str(out_dir))


def _balance(docs: dict[str, list[str]], tokenizer_dir: Path, max_tokens: int) -> dict[str, list[str]]:
    """Keep documents of each domain up to the same token budget: the smallest domain's total (at most
    ``max_tokens``), so no domain outweighs another in the store. Documents are taken in a low-discrepancy
    order (golden-ratio steps through the list), so what is kept still spans the whole list."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    lengths = {d: [len(ids) + 1 for ids in tok(texts, add_special_tokens=False)["input_ids"]] for d, texts in docs.items()}
    budget = min(max_tokens, *(sum(n) for n in lengths.values()))
    out = {}
    for d, texts in docs.items():
        order = sorted(range(len(texts)), key=lambda i: ((i * 0.6180339887498949) % 1.0, i))
        kept, total = [], 0
        for i in order:
            if total >= budget:
                break
            kept.append(i)
            total += lengths[d][i]
        out[d] = [texts[i] for i in sorted(kept)]
    return out


def build(out_dir: str | Path, *, chars_per_domain: int, tokens_per_domain: int, vocab_size: int) -> tuple[Path, Path]:
    """Write ``corpus.jsonl`` (fields ``text``, ``domain``) and a tokenizer directory under ``out_dir``.

    Reused as is when a previous call with the same settings finished (a ``settings.json`` written last)."""
    out = Path(out_dir)
    corpus, tok_dir, stamp = out / "corpus.jsonl", out / "tokenizer", out / "settings.json"
    settings = {"chars_per_domain": chars_per_domain, "tokens_per_domain": tokens_per_domain,
                "vocab_size": vocab_size, "python": sys.version.split()[0], "unidata": unicodedata.unidata_version,
                "version": 3}
    if stamp.is_file() and json.loads(stamp.read_text()) == settings and corpus.is_file() and tok_dir.is_dir():
        return corpus, tok_dir
    out.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    docs = domain_documents(chars_per_domain)
    train_tokenizer([t for texts in docs.values() for t in texts], vocab_size, tok_dir)
    docs = _balance(docs, tok_dir, tokens_per_domain)
    # Round-robin over domains, so the store's rows (and any "first N held-out rows") mix every domain.
    with open(corpus, "w", encoding="utf-8") as f:
        for i in range(max(map(len, docs.values()))):
            for domain in DOMAINS:
                if i < len(docs[domain]):
                    f.write(json.dumps({"text": docs[domain][i], "domain": domain}, ensure_ascii=False) + "\n")
    stamp.write_text(json.dumps(settings, indent=1))
    return corpus, tok_dir
