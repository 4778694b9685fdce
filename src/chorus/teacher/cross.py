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
        self.longest = max((len(s) for s in self.by_surface), default=0)
        self.sorted = sorted(self.by_surface)
        self._first: dict[bytes, int] = {}

    def first(self, surf: bytes) -> int:
        """The store token ``surf`` begins with: the one with that surface, else the longest surface prefix
        (-1: none, e.g. a byte a SentencePiece vocabulary without byte fallback cannot spell)."""
        got = self._first.get(surf)
        if got is None:
            got = -1
            for n in range(min(len(surf), self.longest), 0, -1):
                if surf[:n] in self.by_surface:
                    got = self.by_surface[surf[:n]][0]
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
        self.spreads: list[tuple[np.ndarray, np.ndarray]] = [(np.zeros(0, np.int64), np.zeros(0))]  # 0: nowhere
        self._spread_ids: dict[tuple, int] = {}
        self.teacher_spread = np.array([self._token_spread(v) for v in range(len(self.first))], dtype=np.int64)
        self._by_prefix: dict[bytes, list[int]] | None = None
        self._by_surface: dict[bytes, list[int]] = {}
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

    def _token_spread(self, v: int) -> int:
        surf = self.teacher_text.surfaces[v]
        if surf is None:
            u = int(self.first[v])
            return 0 if u < 0 else self._register(("special", u), np.array([u]), np.ones(1))
        return self.spread_id(b"", surf) if surf else 0

    def _register(self, key: tuple, ids: np.ndarray, weights: np.ndarray) -> int:
        self.spreads.append((ids, weights))
        self._spread_ids[key] = len(self.spreads) - 1
        return self._spread_ids[key]

    @_locked
    def spread_id(self, before: bytes, rest: bytes) -> int:
        """Where the teacher's mass for a token whose text is ``before`` + ``rest`` goes, the position being after
        ``before``: the store token ``rest`` begins with — unless a longer store token extends ``rest`` whose text
        (after ``before``) the teacher has no token of its own for. Then the store may emit that longer token, and
        which one depends on text the teacher has not predicted yet: the mass is *unplaced* (id 0) and stays in the
        unplaced bucket (see cross_targets.project). An id into ``spreads`` ((ids, weights); 0: unplaced)."""
        key = (before, rest)
        if key in self._spread_ids:
            return self._spread_ids[key]
        first = self.index.first(rest)
        if first < 0 or any(before + s not in self._teacher_surfaces for s, _ in self.index.extending(rest)):
            self._spread_ids[key] = 0
            return 0
        return self._register(key, np.array([first]), np.ones(1))

    def _index_prefixes(self) -> dict:
        if self._by_prefix is None:  # every (teacher token, cut inside it): built once, on the first inside position
            self._by_prefix = {}
            for v, surf in enumerate(self.teacher_text.surfaces):
                for j in range(1, len(surf or b"")):
                    self._by_prefix.setdefault(surf[:j], []).append(v)
            self._by_surface = {}
            for v, surf in enumerate(self.teacher_text.surfaces):
                if surf:
                    self._by_surface.setdefault(surf, []).append(v)
        return self._by_prefix

    @_locked
    def starting_id(self, text: bytes) -> int:
        """An id into ``starting`` for the teacher tokens whose text strictly extends ``text``: the same set as the
        normalizer of the next (inside) position, so the chain telescopes to the teacher's own token log-probs."""
        if text not in self._starting_ids:
            by_prefix = self._index_prefixes()
            ids = np.array(sorted(by_prefix.get(text, [])), dtype=np.int64)
            self.starting.append(ids)
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
            by_prefix = self._index_prefixes()
            ids: set[int] = set()
            for longer, _ in self.index.extending(surface) if surface else ():
                rest = longer[len(surface):]
                ids.update(by_prefix.get(rest, []), self._by_surface.get(rest, []))
                for n in range(1, len(rest)):
                    ids.update(self._by_surface.get(rest[:n], []))
            if not ids:
                self._starting_ids[key] = 0
            else:
                self.starting.append(np.array(sorted(ids), dtype=np.int64))
                self._starting_ids[key] = len(self.starting) - 1
        return self._starting_ids[key]

    @_locked
    def prefix_id(self, prefix: bytes) -> int:
        """An id for the teacher tokens that extend ``prefix`` (0 when none does: no target)."""
        if prefix in self.prefixes:
            return self.prefixes[prefix]
        self._index_prefixes()
        ext = [(v, self.spread_id(prefix, self.teacher_text.surfaces[v][len(prefix):]))
               for v in self._by_prefix.get(prefix, [])]
        if not ext:
            self.prefixes[prefix] = 0
            return 0
        self.extensions.append((np.array([v for v, _ in ext], np.int64), np.array([i for _, i in ext], np.int64)))
        self.prefixes[prefix] = len(self.extensions) - 1
        return self.prefixes[prefix]

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
        with, or ``store_vocab`` (a column the caller discards) for an unplaced token: q[:, dest[t]] += p[:, t]."""
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


@dataclass
class Alignment:
    """One batch's teacher input and where each store position's target comes from.

    teacher_ids (B, Lt) the teacher's rows (right-padded); per store position (B, L): ``tpos`` the teacher position
    (in its row) whose next-token distribution the target comes from, or -1 (masked); ``prefix`` 0 where the store
    token starts where the teacher's next token does, else the id (CrossMap.prefix_id) of the bytes of that teacher
    token before it (the position lies inside it); ``move`` the spread (CrossMap.spread_id) that holds the mass of
    the teacher's actual next token (after the prefix); ``tend``: the gold chain sums the teacher's log-probs of its own next tokens at
    positions tpos .. tend-1 (through the teacher token holding the gold store token's last byte; where the gold
    token ends inside that token, its last term is the probability that the teacher's text there starts with the
    gold's remaining bytes: ``ends``)."""

    teacher_ids: np.ndarray
    tpos: np.ndarray
    tend: np.ndarray
    move: np.ndarray
    prefix: np.ndarray
    ends: np.ndarray  # > 0 where the gold token ends inside a teacher token: CrossMap.starting id of its bytes so far
    # where the teacher's actual next token (its text after the prefix) is unplaced: CrossMap.continuing_id of that
    # text (0: none) and the store id it begins with, which gets the share of it after which the text stops
    cont: np.ndarray
    after: np.ndarray
    real: np.ndarray  # (B, L) bool: the position predicts a real token (segment[t] > 0 and segment[t + 1] > 0)


def _whole_characters(text: bytes) -> tuple[int, int]:
    """(bytes before the first, bytes after the last whole UTF-8 character) of a piece a row cut mid-character."""
    lead = 0
    while lead < min(3, len(text)) and 0x80 <= text[lead] < 0xC0:
        lead += 1
    for back in range(1, min(4, len(text) - lead) + 1):  # the last lead byte and whether its character is whole
        b = text[-back]
        if b < 0x80 or b >= 0xC0:
            size = 1 if b < 0x80 else 2 if b < 0xE0 else 3 if b < 0xF0 else 4
            return lead, back if size > back else 0
    return lead, 0


def _segment_text(surfaces: list[bytes], store: TokenText, teacher: TokenText, row: int):
    """A piece's text → (text bytes, store starts, store ends, teacher ids, teacher surfaces, teacher starts, ends),
    or None when it is no readable text. A piece a row cuts inside a UTF-8 character is read from its first whole
    character to its last: the store tokens holding the cut bytes get no target (their ends equal their starts)."""
    data = b"".join(surfaces)
    strip = 1 if store.dummy_prefix and data.startswith(b" ") else 0
    lead, cut = _whole_characters(data[strip:])
    text = data[strip + lead: len(data) - cut]
    if not text:
        return None
    try:
        t_ids = teacher.encode(text.decode("utf-8"))
    except UnicodeDecodeError:
        return None
    t_surf = [teacher.surfaces[i] or b"" for i in t_ids]
    got = b"".join(t_surf)
    phantom = 0 if got == text else 1 if got == b" " + text else -1
    if phantom < 0:
        if got.startswith(b" ") and not text.startswith(b" "):
            got = got[1:]  # its dummy prefix is not what differs: compare the text after it
        at = next((i for i, (a, b) in enumerate(zip(got, text)) if a != b), min(len(got), len(text)))
        unknown = any(teacher.surfaces[i] is None for i in t_ids)
        raise ChorusError(
            f"the teacher's tokenizer cannot reproduce the store's text (row {row}, byte {at}: {text[at:at + 12]!r} "
            f"came back as {got[at:at + 12]!r}); "
            + ("it has no token for some of these characters (an unknown-token id, no byte fallback)" if unknown else
               "a normalizer changes the text") + ": use a teacher whose tokenizer round-trips text exactly")
    s_len = np.array([len(s) for s in surfaces], dtype=np.int64)
    s_end = np.cumsum(s_len) - strip - lead
    s_start = np.maximum(s_end - s_len, 0)
    if lead or cut:  # a token holding a cut byte: no target
        whole = (s_end - s_len >= 0) & (s_end <= len(text))
        s_end = np.where(whole, s_end, s_start)
    t_len = np.array([len(s) for s in t_surf], dtype=np.int64)
    t_end = np.cumsum(t_len) - phantom
    return s_start, s_end, t_ids, t_surf, t_end - t_len, t_end


def _pieces(ids: np.ndarray, segs: np.ndarray):
    """(start, end) of each run of one segment id in a row."""
    p = 0
    while p < len(ids):
        q = p + 1
        while q < len(ids) and segs[q] == segs[p]:
            q += 1
        yield p, q
        p = q


def check_text(ids: np.ndarray, segs: np.ndarray, cmap: CrossMap, *, row_start: int) -> None:
    """Raise the one-line error :func:`align` would raise on any of these store rows (B, L), without aligning
    them: the pre-check `chorus cache` runs over every row before the teacher's first forward pass."""
    store = cmap.store_text
    for r in range(len(ids)):
        for p, q in _pieces(ids[r], segs[r]):
            piece = ids[r, p:q]
            text_ids = piece[:-1] if int(piece[-1]) == store.eos_id else piece
            surfaces = [store.surfaces[int(i)] for i in text_ids]
            if segs[r, p] > 0 and len(text_ids) and all(s is not None for s in surfaces):
                _segment_text(surfaces, store, cmap.teacher_text, row_start + r)


def _row(ids: np.ndarray, segs: np.ndarray, cmap: CrossMap, row: int):
    """One store row → (teacher ids, tpos, tend, move, prefix, ends, cont, after (L,) each); see :class:`Alignment`."""
    teacher, store = cmap.teacher_text, cmap.store_text
    length = len(ids)
    out: list[int] = []
    tpos, tend, move, prefix, ends, after = (np.full(length, -1, dtype=np.int64) for _ in range(6))
    cont = np.zeros(length, dtype=np.int64)
    after_eos = -1  # the teacher position of the EOS that ended the previous piece (its next token starts a text)
    for p, q in _pieces(ids, segs):
        piece = ids[p:q]
        has_eos = int(piece[-1]) == store.eos_id
        text_ids = piece[:-1] if has_eos else piece
        surfaces = [store.surfaces[int(i)] for i in text_ids]
        seg = None
        if segs[p] > 0 and len(text_ids) and all(s is not None for s in surfaces):
            seg = _segment_text(surfaces, store, teacher, row)
        if seg is None:  # padding, a piece with special tokens inside, or no readable text: masked
            out += [teacher.pad_id] * (q - p)
            after_eos = -1
            continue
        s_start, s_end, t_ids, t_surf, t_start, t_end = seg
        if teacher.bos_id is not None:  # as the teacher was trained: every text after its BOS (Gemma, Llama)
            out.append(teacher.bos_id)
        q0 = len(out)
        out += t_ids
        j = np.searchsorted(t_end, s_start, side="right")  # the teacher token holding each store token's first byte
        b = np.searchsorted(t_end, s_end, side="left")  # ... and its last byte
        for k in range(len(text_ids)):
            if s_end[k] <= s_start[k]:
                continue  # a token with no text of its own (a lone dummy-prefix "▁"): no target
            jk = min(int(j[k]), len(t_ids) - 1)
            pred = q0 + jk - 1  # the teacher position that predicts that teacher token
            if pred < q0 and not (p > 0 and after_eos >= 0 and pred == q0 - 1):
                continue  # predicted from before this piece: only through the previous piece's EOS (and BOS)
            cut = int(s_start[k] - t_start[jk])  # bytes of that teacher token before it (a phantom space counts)
            pid = cmap.prefix_id(t_surf[jk][:cut]) if cut > 0 else 0
            if cut > 0 and pid == 0:
                continue  # no teacher token extends those bytes: no target
            move[p + k - 1] = (cmap.spread_id(t_surf[jk][:cut], t_surf[jk][cut:]) if cut > 0
                               else cmap.teacher_spread[t_ids[jk]])
            if move[p + k - 1] == 0:  # unplaced: the teacher's next position says how much of it stops there
                cont[p + k - 1] = cmap.continuing_id(t_surf[jk][cut:])
                after[p + k - 1] = cmap.index.first(t_surf[jk][cut:]) if cont[p + k - 1] else -1
            tpos[p + k - 1], tend[p + k - 1], prefix[p + k - 1] = pred, q0 + int(b[k]), pid
            bk = min(int(b[k]), len(t_ids) - 1)  # the gold token ends inside teacher token bk: P(text starts so)
            ends[p + k - 1] = (cmap.starting_id(t_surf[bk][: int(s_end[k] - t_start[bk])])) \
                if t_end[bk] > s_end[k] else 0
        after_eos = -1
        if has_eos:
            out.append(teacher.eos_id)
            last = p + len(text_ids) - 1
            tpos[last], tend[last], move[last], prefix[last], ends[last] = (
                len(out) - 2, len(out) - 1, cmap.teacher_spread[teacher.eos_id], 0, 0)
            after_eos = len(out) - 1
    return out, tpos, tend, move, prefix, ends, cont, after


def _real(segs: np.ndarray) -> np.ndarray:
    real = np.zeros(segs.shape, dtype=bool)
    real[:, :-1] = (segs[:, :-1] > 0) & (segs[:, 1:] > 0)
    return real


def align(ids: np.ndarray, segs: np.ndarray, cmap: CrossMap, *, row_start: int) -> Alignment:
    """A batch of store rows (B, L) → :class:`Alignment`. With one token table (``cmap.permutation``) the teacher
    reads the store's tokens themselves (its own tokenization of a row's pieces could differ only where a row cuts
    a word) and every position is a boundary."""
    if cmap.permutation is not None:
        b, length = ids.shape
        pos = np.broadcast_to(np.arange(length), (b, length)).copy()
        ids64 = ids.astype(np.int64)
        zero = np.zeros_like(pos)
        return Alignment(cmap.permutation[ids64], pos, pos + 1, zero, zero, zero, zero, zero - 1, _real(segs))
    rows = [_row(ids[r], segs[r], cmap, row_start + r) for r in range(len(ids))]
    width = max(len(r[0]) for r in rows)
    t_ids = np.full((len(rows), width), cmap.teacher_text.pad_id, dtype=np.int64)
    for r, row in enumerate(rows):
        t_ids[r, : len(row[0])] = row[0]
    tpos, tend, move, prefix, ends, cont, after = (np.stack([r[i] for r in rows]) for i in range(1, 8))
    return Alignment(t_ids, tpos, tend, move, prefix, ends, cont, after, _real(segs))
