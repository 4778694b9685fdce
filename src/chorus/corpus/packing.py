"""Packing token streams into fixed-length rows with segment ids (0 = padding, 1.. = documents)."""

from __future__ import annotations

import numpy as np


class Packer:
    """Concatenates documents (each followed by EOS) into rows of exactly ``seq_len`` tokens.

    Segment ids number the document pieces inside a row from 1; a document longer than the room left
    continues in the next row as that row's segment 1. The final partial row is padded with ``pad_id``
    and segment id 0, which the trainer masks out of the loss.
    """

    def __init__(self, seq_len: int, eos_id: int, pad_id: int) -> None:
        self.seq_len, self.eos_id, self.pad_id = seq_len, eos_id, pad_id
        self._ids = np.empty(seq_len, dtype=np.int32)
        self._segs = np.zeros(seq_len, dtype=np.int64)
        self._fill = 0
        self._seg = 1

    def add(self, token_ids: list[int]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Append one document; return the rows it completed."""
        doc = np.asarray(token_ids, dtype=np.int32)
        doc = np.append(doc, np.int32(self.eos_id))
        rows = []
        while len(doc):
            take = min(len(doc), self.seq_len - self._fill)
            self._ids[self._fill : self._fill + take] = doc[:take]
            self._segs[self._fill : self._fill + take] = self._seg
            self._fill += take
            doc = doc[take:]
            if self._fill == self.seq_len:
                rows.append(self._emit())
        if self._fill:
            self._seg += 1  # the next document starts a new segment in this row
        return rows

    def _emit(self) -> tuple[np.ndarray, np.ndarray]:
        row = (self._ids.copy(), self._segs.copy())
        self._fill, self._seg = 0, 1
        self._segs[:] = 0
        return row

    def flush(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """The last partial row, padded (an empty list if nothing is pending)."""
        if self._fill == 0:
            return []
        self._ids[self._fill :] = self.pad_id
        self._segs[self._fill :] = 0
        return [self._emit()]
