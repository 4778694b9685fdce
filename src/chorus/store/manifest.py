"""On-disk metadata: frozen dataclasses with ``to_dict``/``from_dict`` and a ``format_version``.

Parse errors say "expected X, got Y" and name the field, so a store written by another version or
edited by hand fails loudly instead of being misread. Each record kind lists the format versions it
reads (``FORMAT_VERSIONS``, oldest first; a new record is written at the last): teacher manifests are
at v2 (per-position statistics) and still read v1 caches; the corpus manifest and commit records are v1.
"""

from __future__ import annotations

import dataclasses
import functools
import re
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from chorus.errors import ChorusError

FORMAT_VERSION = 1  # corpus manifest and commit records
TEACHER_FORMAT_VERSION = 2  # teacher manifests: v2 adds per-position statistics (``tail_betas``); v1 caches still read
# cross-tokenizer mapping: v2 keeps the mass the map cannot place in a tail bucket and stores the teacher's own
# probability of the gold text; v1 gave that mass to the gold token (the label inside the target): refused on read
CROSS_MAPPING_VERSION = 2

# A position of a cross-tokenizer teacher with no sound target (the store's token starts inside a teacher token)
# is stored as the hard label (the next token with probability 1) with this entropy, which no distribution has:
# readers recognize the mask by it (distill/targets.py falls back to the hard label or the other teachers).
NO_TARGET_ENTROPY = -1.0
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")  # a cache name is one folder: no '/', no '..'
_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true/false"}


def _check(name: str, tp: Any, value: Any) -> Any:
    """Coerce ``value`` to annotation ``tp`` or raise ``expected X, got Y`` naming ``name``."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _check(name, inner[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ChorusError(f"manifest field '{name}': expected a mapping, got {value!r}")
        return tp.from_dict(value)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ChorusError(f"manifest field '{name}': expected a list, got {value!r}")
        return tuple(_check(f"{name}[{i}]", args[0], v) for i, v in enumerate(value))
    if origin is dict:
        if not isinstance(value, dict):
            raise ChorusError(f"manifest field '{name}': expected a mapping, got {value!r}")
        return {str(k): _check(f"{name}.{k}", args[1], v) for k, v in value.items()}
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in _SCALARS and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ChorusError(f"manifest field '{name}': expected {_SCALARS[tp]}, got {value!r}")
    return value


@functools.cache
def _hints(cls: type) -> dict:
    """Resolved field annotations, once per class (``get_type_hints`` is slow per call: docs/measurements.md)."""
    return typing.get_type_hints(cls)


class _Record:
    """``to_dict``/``from_dict`` for frozen dataclasses of plain fields."""

    KIND: ClassVar[str] = ""
    FORMAT_VERSIONS: ClassVar[tuple[int, ...]] = (FORMAT_VERSION,)  # what ``from_dict`` accepts, oldest first

    def to_dict(self) -> dict:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if dataclasses.is_dataclass(v):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            out[f.name] = v
        return out

    @classmethod
    def from_dict(cls, data: dict) -> Any:
        if not isinstance(data, dict):
            raise ChorusError(f"{cls.KIND or cls.__name__}: expected a mapping, got {type(data).__name__}")
        hints = _hints(cls)
        version = data.get("format_version", cls.FORMAT_VERSIONS[0])  # none recorded: the oldest
        if type(version) is not int or version not in cls.FORMAT_VERSIONS:
            expected = " or ".join(str(v) for v in cls.FORMAT_VERSIONS)
            raise ChorusError(
                f"{cls.KIND}: expected format_version {expected}, got {version!r}; "
                "this store was written by another chorus version: upgrade chorus or rebuild the store"
            )
        kwargs = {}
        for f in dataclasses.fields(cls):
            if f.name == "format_version":
                kwargs[f.name] = version  # also when absent: the field's default is the newest version
            elif f.name in data:
                kwargs[f.name] = _check(f"{cls.KIND}.{f.name}", hints[f.name], data[f.name])
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise ChorusError(f"{cls.KIND}: required field '{f.name}' is missing")
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Any:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class TokenizerInfo(_Record):
    KIND: ClassVar[str] = "tokenizer"
    name: str
    vocab_size: int  # ids are in [0, vocab_size): len(tokenizer), added tokens included
    fingerprint: str  # the whole tokenizer (vocab, merges, normalizer, special tokens)
    vocab_fingerprint: str  # the id <-> token table only
    eos_id: int
    pad_id: int


@dataclass(frozen=True)
class CorpusManifest(_Record):
    """Root attribute ``chorus`` of a store."""

    KIND: ClassVar[str] = "corpus manifest"
    fingerprint: str
    tokenizer: TokenizerInfo
    seq_len: int
    num_rows: int
    rows_per_shard: int
    domains: tuple[str, ...]
    num_tokens: int  # non-padding tokens
    split_rows: dict[str, int]  # rows per split name ("train", "valid")
    source: dict[str, Any]  # how it was made: dataset, fields, valid_fraction, max_docs
    created_by: str  # chorus version
    format_version: int = FORMAT_VERSION

    @property
    def num_shards(self) -> int:
        return -(-self.num_rows // self.rows_per_shard)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        start = shard * self.rows_per_shard
        return start, min(start + self.rows_per_shard, self.num_rows)


@dataclass(frozen=True)
class TeacherManifest(_Record):
    """Attribute ``chorus`` of ``teachers/<name>``."""

    KIND: ClassVar[str] = "teacher manifest"
    name: str
    model: str  # local path or hub id as given
    revision: str
    weights_fingerprint: str
    dtype: str
    device: str
    top_k: int
    num_samples: int  # M draws per position (0: no samples)
    seed: int
    value_codec: str  # "fp16" | "q8": how topk_logprobs are stored (see store/targets.py)
    value_params: dict[str, Any]  # codec parameters readers need (q8: step)
    corpus_fingerprint: str
    tokenizer_fingerprint: str
    vocab_size: int  # the tokenizer's: padded embedding rows were dropped before the softmax
    fingerprint: str  # of corpus, tokenizer, teacher weights and target settings
    created_by: str
    status: str = "incomplete"  # "complete" once every shard is committed
    temperature: float = 1.0  # fitted by `chorus calibrate` (1.0: uncalibrated)
    calibration: dict[str, Any] = field(default_factory=dict)
    tail_betas: tuple[float, ...] = ()  # grid of the cached tail_logz statistics; () = no statistics (a v1 cache)
    # a teacher with its own tokenizer (teacher/cross.py): {"tokenizer": its TokenizerInfo, "method", "version",
    # "vocab": map summary, "coverage": covered / real positions once complete}; {} = the store's tokenizer
    tokenizer_mapping: dict[str, Any] = field(default_factory=dict)
    format_version: int = TEACHER_FORMAT_VERSION

    FORMAT_VERSIONS: ClassVar[tuple[int, ...]] = (1, TEACHER_FORMAT_VERSION)

    def __post_init__(self) -> None:
        if not NAME_PATTERN.match(self.name) or ".." in self.name:
            raise ChorusError(f"{self.KIND} field 'name': expected letters, digits, '.', '_' and '-' (one folder, "
                              f"no '/' or '..'), got {self.name!r}")
        if self.format_version < 2 and self.tail_betas:
            raise ChorusError(f"{self.KIND}: format_version 1 has no statistics, got tail_betas {list(self.tail_betas)}")

    @property
    def has_stats(self) -> bool:
        """Whether the cache holds per-position statistics (``stats``, ``tail_logz``: format v2)."""
        return bool(self.tail_betas)

    @property
    def cross_tokenizer(self) -> bool:
        """Whether the teacher read the text with its own tokenizer (targets mapped onto the store's vocabulary)."""
        return bool(self.tokenizer_mapping)


def no_target(entropy: Any) -> Any:
    """Where the cached ``entropy`` marks "no target" (numpy or torch, any shape): see ``NO_TARGET_ENTROPY``."""
    return entropy < NO_TARGET_ENTROPY / 2


@dataclass(frozen=True)
class ShardCommit(_Record):
    """``<unit>/_commits/<shard>.json``: written create-only after the shard's chunks, so readers trust it."""

    KIND: ClassVar[str] = "commit record"
    unit: str
    shard: int
    row_start: int
    row_stop: int
    checksums: dict[str, str]  # array name -> checksum of the chunk bytes its writer encoded
    fingerprint: str = ""  # the unit's cache fingerprint when written ("": the corpus, or a record before 0.1.1)
    format_version: int = FORMAT_VERSION
