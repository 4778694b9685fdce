"""Deterministic fingerprints. Anything that cannot be fingerprinted is an error, never a random value
(the failure mode of HF datasets' ``update_fingerprint`` fallback)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import google_crc32c
import numpy as np

from chorus.errors import ChorusError


def _canonical(obj: Any) -> Any:
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return repr(obj)  # repr round-trips exactly
    if isinstance(obj, (list, tuple)):
        return [_canonical(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): _canonical(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (np.integer, np.floating)):
        return _canonical(obj.item())
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return {"__bytes__": hashlib.sha256(bytes(obj)).hexdigest()}
    if isinstance(obj, np.ndarray):
        return {"__array__": [str(obj.dtype), list(obj.shape), hashlib.sha256(np.ascontiguousarray(obj).tobytes()).hexdigest()]}
    raise ChorusError(f"cannot fingerprint a value of type {type(obj).__name__}; pass plain data (str, numbers, lists, dicts, arrays)")


def fingerprint(*parts: Any) -> str:
    """A hex digest (32 chars) of plain data: same inputs, same fingerprint, on every machine."""
    blob = json.dumps(_canonical(list(parts)), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


def checksum(data: bytes, algorithm: str = "crc32c") -> str:
    """Checksum of a shard's encoded bytes, as stored in its commit record ("ALGO:hex").

    CRC-32C by default: it catches corruption (flipped bits, truncation) as surely as a hash does for
    that purpose, and is fast enough in hardware that every read can check it (SHA-256 slowed the loader:
    docs/measurements.md). "sha256" is accepted for verification too."""
    if algorithm == "crc32c":
        return "crc32c:" + format(google_crc32c.value(data), "08x")
    if algorithm == "sha256":
        return "sha256:" + hashlib.sha256(data).hexdigest()
    raise ChorusError(f"unknown checksum algorithm '{algorithm}'; expected crc32c or sha256")


def matches(data: bytes, expected: str) -> bool:
    """Whether ``data`` has the checksum ``expected`` (whichever algorithm its prefix names)."""
    return checksum(data, expected.split(":", 1)[0]) == expected


class StreamHasher:
    """Incremental fingerprint of a stream of strings/arrays (e.g. every document prepare reads)."""

    def __init__(self) -> None:
        self._h = hashlib.blake2b(digest_size=16)

    def update_text(self, text: str) -> None:
        data = text.encode("utf-8")
        self._h.update(len(data).to_bytes(8, "little"))
        self._h.update(data)

    def update_array(self, arr: np.ndarray) -> None:
        self._h.update(str(arr.dtype).encode() + str(arr.shape).encode())
        self._h.update(np.ascontiguousarray(arr).tobytes())

    def hexdigest(self) -> str:
        return self._h.hexdigest()
