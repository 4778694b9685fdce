"""Cross-tokenizer teachers: a teacher with its own tokenizer, mapped onto the store's positions and vocabulary.

Text. Each store token has a *surface*: the bytes it stands for (byte-level BPE: the GPT-2 byte table; SentencePiece
style: "▁" → space, ``<0xNN>`` byte-fallback tokens → that byte; added tokens their content; special tokens none).
A row's segment (a document piece, ``segment_ids`` > 0) is the concatenation of its tokens' surfaces; a tokenizer
that prepends a dummy prefix space ("▁" at a document start) gets that space removed. The teacher tokenizes that
text and its own surfaces must concatenate back to it (or to " " + it: its own dummy prefix); otherwise it is lossy
(a normalizer, unknown characters) and refused with one line. Both sides then know the byte offset where every
token starts and ends.

Positions. A teacher whose tokenizer puts a BOS before every text (Gemma, Llama: it encodes "a" as BOS, a) reads
each piece after its BOS, as it was trained; the store position before a document's first token then reads the
distribution at that BOS. Store position p predicts the store token starting at byte c. Where a teacher token also starts at c (a
*boundary* position), the teacher's next-token distribution after exactly that text exists: the one at the teacher
position just before that token. Where c falls strictly inside a teacher token T starting at byte a, the teacher's
distribution before T is conditioned on the bytes text[a:c] already read: only teacher tokens whose surface extends
them keep their mass, each on the store token the rest of its surface begins with (an *inside* position: an
approximation — it ignores teacher segmentations with a token boundary between a and c — whose error
benchmarks/cross_tokenizer.py measures as bits per character against the teacher's own). A position whose bytes no
teacher token extends, or whose text the teacher does not see (padding, a row's first position, the bytes of a
character a row's edge cuts: the piece is read from its first whole character to its last), has no target: it is cached as the hard label with entropy ``NO_TARGET_ENTROPY`` and the trainer
falls back to the hard label or the other teachers there (distill/targets.py).

Vocabulary (METHOD "first-piece+gold-path+stop+bucket", version 2). A teacher token's probability goes to the store token
its text begins with (its first store piece: the store token with that text, else the longest store token that is a
prefix of it; special tokens by content, EOS to EOS) — when that is the token the store emits whatever text follows.
When a longer store token extends the teacher token's text (the teacher's token is shorter than the store's word, and
the teacher has no token of its own for that longer text), which store token comes next depends on text the teacher
has not predicted yet: that mass is *unplaced* and stays in a bucket of its own, which the statistics and the losses
treat as part of the tail. It never goes to the gold token: a target holds what the teacher said and nothing of the
label. Two lookaheads the forward pass already holds are used. Where the gold store token's text spans several teacher
tokens, the teacher's probability of that whole text along its own tokens (the chain p(t_1)·p(t_2|t_1)···) moves from
t_1's place to the gold token. Where the teacher's actual next token is unplaced, its next position (the same pass)
says how likely its text stops there rather than going on into a longer store token: that share goes to the store
token its text begins with (the gold's, where it spells the gold). ``chorus cache --branches N`` asks the same of the
N most probable other unplaced tokens, with one more token each (cross_targets.branch_stops). The gold statistic is
that chain at every position — the teacher's own probability of the gold token's text, whose last term, when the
gold ends inside a teacher token, is the probability that the teacher's next token strictly extends the gold's bytes
there (the set the next, inside, position normalizes by). So
the gold statistics of a document telescope to the teacher's own log-likelihood of its tokens, and bits per byte
compare across tokenizers (tests/pipeline/test_cross_tokenizer.py checks both against brute force from the teacher).
Tail mass, entropy and tail log-partitions are those of the mapped distribution with the bucket as one atom, so
softening, calibration and pooling stay exact for it. When the teacher's vocabulary is the store's under another id
order (one token table), the teacher reads the store's tokens, every position is a boundary, and the logits are
gathered into the store's order before the same log-softmax as a same-tokenizer teacher: the targets are
bit-identical.
"""

from __future__ import annotations

import bisect
import functools
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from chorus.errors import ChorusError
from chorus.store import CROSS_MAPPING_VERSION, byte_level_table, component_types

METHOD = "first-piece+gold-path+stop+bucket"
METHOD_VERSION = CROSS_MAPPING_VERSION
_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@dataclass
class TokenText:
    """One tokenizer's view of text: surfaces per id, how it encodes, its EOS/pad ids."""

    tok: Any  # a transformers fast tokenizer
    surfaces: list[bytes | None]  # None: a special token (no text)
    tokens: list[str | None]  # the raw token strings
    eos_id: int
    pad_id: int
    dummy_prefix: bool  # encoding "a" gives " a": a phantom space at a document start
    bos_id: int | None = None  # its convention puts this BOS before every text (it encodes "a" as BOS, a)

    @classmethod
    def of(cls, tok, name: str) -> TokenText:
        backend = getattr(tok, "backend_tokenizer", None)
        if backend is None:
            raise ChorusError(f"tokenizer '{name}' is not a fast (Rust) tokenizer; cross-tokenizer caching needs "
                              "one to read token offsets: save it with `tokenizers` / PreTrainedTokenizerFast")
        spec = json.loads(backend.to_str())
        kinds = component_types(spec.get("pre_tokenizer")) | component_types(spec.get("decoder"))
        if "WordPiece" in kinds or spec.get("model", {}).get("type") == "WordPiece":
            raise ChorusError(f"tokenizer '{name}' is a WordPiece tokenizer (\"##\" continuations, no exact text); "
                              "cross-tokenizer caching supports byte-level BPE and SentencePiece-style tokenizers")
        byte_level = "ByteLevel" in kinds
        table = byte_level_table() if byte_level else {}
        added = {int(i): t for i, t in tok.added_tokens_decoder.items()}
        size = len(tok)
        surfaces: list[bytes | None] = [None] * size
        tokens: list[str | None] = [None] * size
        for s, i in tok.get_vocab().items():
            if not 0 <= i < size:
                continue
            tokens[i] = s
            if i in added:
                surfaces[i] = None if added[i].special else added[i].content.encode()
            elif byte_level:
                try:
                    surfaces[i] = bytes(table[c] for c in s)
                except KeyError:
                    raise ChorusError(f"tokenizer '{name}': token {s!r} (id {i}) is not in the byte-level alphabet; "
                                      "its text cannot be recovered exactly") from None
            elif (m := _BYTE_FALLBACK.match(s)) and "ByteFallback" in kinds:
                surfaces[i] = bytes([int(m.group(1), 16)])
            else:
                surfaces[i] = s.replace("▁", " ").encode()
        if tok.eos_token_id is None:
            raise ChorusError(f"tokenizer '{name}' has no EOS token; documents cannot be separated: set eos_token")
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        probe = backend.encode("a", add_special_tokens=False).ids
        dummy = b"".join(surfaces[i] or b"" for i in probe) == b" a"
        bos = tok.bos_token_id
        with_specials = backend.encode("a", add_special_tokens=True).ids
        uses_bos = bos is not None and bool(with_specials) and with_specials[0] == bos
        return cls(tok, surfaces, tokens, int(tok.eos_token_id), int(pad), dummy, int(bos) if uses_bos else None)

    def encode(self, text: str) -> list[int]:
        return self.tok.backend_tokenizer.encode(text, add_special_tokens=False).ids


class StoreIndex:
    """The store's vocabulary by surface: which store token a piece of text starts with, which ones extend it."""

    def __init__(self, store: TokenText) -> None:
        self.by_surface: dict[bytes, tuple[int, bool]] = {}
        self.specials: dict[str, int] = {}
        for u, (s, surf) in enumerate(zip(store.tokens, store.surfaces)):
            if surf is None:
                if s is not None:
                    self.specials.setdefault(s, u)
                continue
            fallback = s is not None and _BYTE_FALLBACK.match(s) is not None
            if surf not in self.by_surface or (self.by_surface[surf][1] and not fallback):
                self.by_surface[surf] = (u, fallback)  # a regular token rather than a byte-fallback one
        self.sorted = sorted(self.by_surface)
        self.longer = _strict_prefix_counts(self.by_surface)  # text → how many store tokens strictly extend it
        self._first: dict[bytes, int] = {}

    def first(self, surf: bytes) -> int:
        """The store token ``surf`` begins with: the one with that surface, else the longest surface prefix
        (-1: none, e.g. a byte a SentencePiece vocabulary without byte fallback cannot spell)."""
        got = self._first.get(surf)
        if got is None:
            got = -1
            for n in range(1, len(surf) + 1):  # longer heads while some store token still starts with the head
                head = surf[:n]
                hit = self.by_surface.get(head)
                if hit is not None:
                    got = hit[0]
                if head not in self.longer:
                    break
            self._first[surf] = got
        return got

    def extending(self, surf: bytes) -> list[tuple[bytes, int]]:
        """(surface, id) of the store tokens whose surface strictly extends ``surf``."""
        out = []
        for i in range(bisect.bisect_right(self.sorted, surf), len(self.sorted)):
            s = self.sorted[i]
            if not s.startswith(surf):
                break
            out.append((s, self.by_surface[s][0]))
        return out


def first_pieces(teacher: TokenText, store: TokenText, index: StoreIndex | None = None) -> np.ndarray:
    """(V_teacher,) int64: the store token each teacher token's text begins with (-1: none; special tokens by
    content, the teacher's EOS to the store's)."""
    index = index or StoreIndex(store)
    out = np.full(len(teacher.surfaces), -1, dtype=np.int64)
    for v, (s, surf) in enumerate(zip(teacher.tokens, teacher.surfaces)):
        if surf is None:
            out[v] = index.specials.get(s, store.eos_id if v == teacher.eos_id else -1) if s is not None else -1
        elif surf:
            out[v] = index.first(surf)
    return out


def _strict_prefix_counts(surfaces) -> dict[bytes, int]:
    """Each text → how many of ``surfaces`` (distinct) strictly extend it."""
    counts: dict[bytes, int] = {}
    for surf in surfaces:
        for j in range(1, len(surf)):
            counts[surf[:j]] = counts.get(surf[:j], 0) + 1
    return counts


def _locked(method):
    """The tables a CrossMap grows (spreads, starting sets, prefixes) are appended to, then indexed: one thread at a
    time, since `chorus cache` aligns the next shard in its reader thread while the main thread maps this one."""
    @functools.wraps(method)
    def run(self, *args):
        with self._lock:
            return method(self, *args)
    return run


@dataclass
class CrossMap:
    """Everything fixed for one teacher × store pair (built once per run): where each piece of teacher text goes."""

    teacher_text: TokenText
    store_text: TokenText
    store_vocab: int
    first: np.ndarray = field(init=False)  # (Vt,) the first store piece of each teacher token, -1 none
    permutation: np.ndarray | None = field(init=False, default=None)  # (Vs,) teacher id per store id: one token table

    def __post_init__(self) -> None:
        self._lock = threading.RLock()
        self.index = StoreIndex(self.store_text)
        self.first = first_pieces(self.teacher_text, self.store_text, self.index)
        self.permutation = self._permutation()
        self._teacher_surfaces = {x for x in self.teacher_text.surfaces if x}
        # the teacher's surfaces sorted, with their ids: the tokens whose text starts with a given text are one range
        order = sorted((surf, v) for v, surf in enumerate(self.teacher_text.surfaces) if surf)
        self._sorted = [surf for surf, _ in order]
        self._sorted_ids = np.array([v for _, v in order], dtype=np.int64)
        self._store_spreads: dict[int, int] = {}  # store id → the spread that puts everything on it
        self.spreads: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0))]  # 0: nowhere
        # at a boundary position: special tokens by content, the others as spread_id with nothing before
        self.teacher_spread = np.array([self._store_spread(int(u)) for u in self.first], dtype=np.int64)
        self.teacher_spread[self._sorted_ids] = self._spreads_after(b"", self._sorted_ids)
        self.starting: list[np.ndarray] = [np.zeros(0, np.int64)]  # 0: none
        self._starting_ids: dict = {}
        self.prefixes: dict[bytes, int] = {b"": 0}  # prefix → id (0: none, a boundary position)
        self.extensions: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0, np.int64))]
        self._destinations: dict = {}
        self._placed_extensions: dict[int, tuple[np.ndarray, ...]] = {}
        self.store_bytes = np.array([len(x or b"") for x in self.store_text.surfaces], dtype=np.int64)
        # what this process's batches measured (cross_targets): real positions, covered ones, inside ones, and over
        # the covered: −Σ log (the teacher's probability of the gold token's text), its bytes, Σ unplaced mass
        self.measured = {"positions": 0, "covered": 0, "inside": 0, "gold_text_nats": 0.0, "gold_bytes": 0,
                         "unplaced_mass": 0.0}

    def _permutation(self) -> np.ndarray | None:
        """The store id ↔ teacher id permutation when both tokenizers have one token table (same token strings
        with the same text), else None."""
        if len(self.first) != self.store_vocab:
            return None
        by_token = {t: u for u, t in enumerate(self.store_text.tokens) if t is not None}
        perm = np.full(self.store_vocab, -1, dtype=np.int64)
        for v, t in enumerate(self.teacher_text.tokens):
            u = by_token.get(t)
            if u is None or self.teacher_text.surfaces[v] != self.store_text.surfaces[u] or perm[u] >= 0:
                return None
            perm[u] = v
        return perm

    def _store_spread(self, u: int) -> int:
        """The spread that puts all of a token's mass on store id ``u`` (0 for u < 0: nowhere), one per store id."""
        if u < 0:
            return 0
        got = self._store_spreads.get(u)
        if got is None:
            self.spreads.append((np.array([u]), np.ones(1)))
            got = self._store_spreads[u] = len(self.spreads) - 1
        return got

    def _range(self, text: bytes, strict: bool) -> tuple[int, int]:
        """The range of ``_sorted`` whose surfaces start with ``text`` (``strict``: and are longer than it)."""
        lo = (bisect.bisect_right if strict else bisect.bisect_left)(self._sorted, text)
        end = text.rstrip(b"\xff")
        hi = bisect.bisect_left(self._sorted, end[:-1] + bytes([end[-1] + 1]), lo) if end else len(self._sorted)
        return lo, hi

    def _exact(self, text: bytes) -> tuple[int, int]:
        return bisect.bisect_left(self._sorted, text), bisect.bisect_right(self._sorted, text)

    @_locked
    def spread_id(self, before: bytes, rest: bytes) -> int:
        """Where the teacher's mass for a token whose text is ``before`` + ``rest`` goes, the position being after
        ``before``: the store token ``rest`` begins with — unless a longer store token extends ``rest`` whose text
        (after ``before``) the teacher has no token of its own for. Then the store may emit that longer token, and
        which one depends on text the teacher has not predicted yet: the mass is *unplaced* (id 0) and stays in the
        unplaced bucket (see cross_targets.project). An id into ``spreads`` ((ids, weights); 0: unplaced)."""
        lo, hi = self._exact(before + rest)
        if lo == hi:
            raise ValueError(f"no teacher token has the text {before + rest!r}")
        v = self._sorted_ids[lo]  # tokens of one text have one rest, so one spread
        if not before:
            return int(self.teacher_spread[v])
        tids, spreads = self.extensions[self.prefix_id(before)]  # one rule: _spreads_after's
        return int(spreads[np.searchsorted(tids, v)])

    @_locked
    def starting_id(self, text: bytes) -> int:
        """An id into ``starting`` for the teacher tokens whose text strictly extends ``text``: the same set as the
        normalizer of the next (inside) position, so the chain telescopes to the teacher's own token log-probs."""
        if text not in self._starting_ids:
            lo, hi = self._range(text, strict=True)
            self.starting.append(np.sort(self._sorted_ids[lo:hi]))
            self._starting_ids[text] = len(self.starting) - 1
        return self._starting_ids[text]

    @_locked
    def continuing_id(self, surface: bytes) -> int:
        """An id into ``starting`` for the teacher tokens that could carry text ending in ``surface`` (the rest of
        an unplaced teacher token) on into a longer store token that extends it (their text starts with the rest of
        one, or is a prefix of it): the complement of their mass, at the teacher's next position, is its probability
        that the store's token there is the one ``surface`` begins with (0: no longer store token)."""
        key = ("continuing", surface)
        if key not in self._starting_ids:
            rests = [longer[len(surface):] for longer, _ in self.index.extending(surface)] if surface else []
            shorter = {r[:n] for r in rests for n in range(1, len(r))} & self._teacher_surfaces
            # of the sorted surfaces: those that start with a rest, and those that are one of its shorter prefixes
            ranges = [self._range(r, strict=False) for r in rests] + [self._exact(x) for x in shorter]
            cover = np.zeros(len(self._sorted) + 1, dtype=np.int64)
            if ranges:
                lo, hi = np.array(ranges, dtype=np.int64).T
                np.add.at(cover, lo, 1)
                np.add.at(cover, hi, -1)
            ids = self._sorted_ids[np.cumsum(cover[:-1]) > 0]
            if not len(ids):
                self._starting_ids[key] = 0
            else:
                self.starting.append(np.sort(ids))
                self._starting_ids[key] = len(self.starting) - 1
        return self._starting_ids[key]

    def outside(self, set_id: int) -> np.ndarray:
        """The teacher ids not in ``starting[set_id]``, sorted: where a set holds most of the vocabulary, the
        teacher's probability of a token outside it is a sum over fewer ids. Not kept: the sets already are."""
        keep = np.ones(len(self.teacher_spread), dtype=bool)
        keep[self.starting[set_id]] = False
        return np.flatnonzero(keep)

    @_locked
    def prefix_id(self, prefix: bytes) -> int:
        """An id for the teacher tokens that extend ``prefix`` (0 when none does: no target)."""
        if prefix in self.prefixes:
            return self.prefixes[prefix]
        lo, hi = self._range(prefix, strict=True)
        if lo == hi:
            self.prefixes[prefix] = 0
            return 0
        tids = np.sort(self._sorted_ids[lo:hi])
        self.extensions.append((tids, self._spreads_after(prefix, tids)))
        self.prefixes[prefix] = len(self.extensions) - 1
        return self.prefixes[prefix]

    def _spreads_after(self, before: bytes, tids: np.ndarray) -> np.ndarray:
        """:meth:`spread_id` of every teacher token ``tids`` (all of those that strictly extend ``before``) at once.
        A store token ``s`` is one the teacher has a token for after ``before`` exactly when ``s`` is the rest of one
        of them, so a rest is unplaced when more store tokens extend it than those rests do."""
        n, surfaces = len(before), self.teacher_text.surfaces
        rests = [surfaces[v][n:] for v in tids]
        covered = _strict_prefix_counts(r for r in set(rests) if r in self.index.by_surface)
        first, longer, spread = self.index.first, self.index.longer, self._store_spread
        return np.array([0 if longer.get(r, 0) > covered.get(r, 0) else spread(first(r)) for r in rests], np.int64)

    def triples(self, spread_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(entry index, store id, weight) of the spreads ``spread_ids`` (one entry per id), concatenated."""
        parts = [self.spreads[i] for i in spread_ids]
        lens = np.array([len(p[0]) for p in parts], dtype=np.int64)
        if not lens.sum():
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0)
        return (np.repeat(np.arange(len(parts)), lens), np.concatenate([p[0] for p in parts]),
                np.concatenate([p[1] for p in parts]))

    def placed_extensions(self, prefix_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(teacher ids, store ids, weights) of the placed extensions of ``prefix_id``, then the teacher ids of all of
        them (the normalizer's); once per prefix: a short prefix has tens of thousands of extensions."""
        got = self._placed_extensions.get(prefix_id)
        if got is None:
            tids, spreads = self.extensions[prefix_id]
            entry, sids, w = self.triples(spreads)
            got = self._placed_extensions[prefix_id] = (tids[entry], sids, w.astype(np.float32), tids)
        return got

    def destinations(self, device):
        """(Vt,) where each teacher token's probability goes at a boundary position: the store id its text begins
        with, or ``store_vocab`` (a column the caller keeps for the bucket) for an unplaced token: q[dest[t]] += p[t]."""
        key = str(device)
        if key not in self._destinations:
            import torch

            v, u, w = self.triples(self.teacher_spread)
            if len(np.unique(v)) != len(v) or not np.all(w == 1.0):  # every spread is one id, weight 1 (spread_id)
                raise AssertionError("a teacher token placed on several store ids")
            dest = np.full(len(self.teacher_spread), self.store_vocab, np.int64)
            dest[v] = u
            self._destinations[key] = torch.from_numpy(dest).to(device)
        return self._destinations[key]

    def branch_candidates(self, device):
        """The teacher ids branch-token lookahead may ask about: unplaced at a boundary position, with a store token
        their text begins with (cross_targets.branch_stops)."""
        key = ("branch", str(device))
        if key not in self._destinations:
            import torch

            ids = [v for v, (spread, surf) in enumerate(zip(self.teacher_spread, self.teacher_text.surfaces))
                   if spread == 0 and surf and self.index.first(surf) >= 0]
            cand = torch.tensor(ids, dtype=torch.long, device=device)
            column = torch.full((len(self.teacher_spread),), -1, dtype=torch.long, device=device)
            column[cand] = torch.arange(len(cand), device=device)
            self._destinations[key] = (cand, column)
        return self._destinations[key][0]

    def branch_column(self, device):
        """(Vt,) each teacher id's column in :meth:`branch_candidates` (-1: not one)."""
        self.branch_candidates(device)
        return self._destinations[("branch", str(device))][1]

    def measurements(self) -> dict:
        """What :attr:`measured` says, as rates: coverage, the share of covered positions inside a teacher token,
        the teacher's bits per byte of the gold text along the store's positions (compare with its own bits per
        byte on its own tokens: the alignment's error), the mean mass the map could not place (the bucket)."""
        m = self.measured
        return {"positions": m["positions"], "coverage": m["covered"] / max(m["positions"], 1),
                "inside_share": m["inside"] / max(m["covered"], 1),
                "gold_text_bits_per_byte": m["gold_text_nats"] / np.log(2) / max(m["gold_bytes"], 1),
                "unplaced_mass": m["unplaced_mass"] / max(m["covered"], 1)}

    def summary(self) -> dict:
        mapped = self.first >= 0
        same = sum(1 for s, m in zip(self.teacher_text.surfaces, self.first)
                   if s is not None and m >= 0 and s == self.store_text.surfaces[m])
        placed = int((self.teacher_spread > 0).sum())
        return {"teacher_vocab": len(self.first), "mapped_tokens": int(mapped.sum()), "same_text_tokens": same,
                "placed_tokens": placed, "permutation": self.permutation is not None,
                "bos": self.teacher_text.bos_id is not None}
