"""A batch of store rows aligned with a cross-tokenizer teacher's reading of their text (see ``cross.py``, "Text" and
"Positions"): the teacher's input ids and, per store position, which teacher position its target comes from, the
bytes of a teacher token already read, the spread of the next teacher token, the gold chain's end and the lookaheads.
``check_text`` is the pre-check `chorus cache` runs over every row before the first forward pass."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from chorus.errors import ChorusError
from chorus.teacher.cross import CrossMap, TokenText


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
