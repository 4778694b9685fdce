"""The writer protocol of a teacher cache: who creates it, who may write which shard, who is fenced out.

Many writers (`chorus cache --shard i/n`, reruns, a second job by mistake) share one cache and never a lock
server, only the store itself:

- **Create.** Worker 0 creates the unit, holding the create-only lease ``create-NAME`` so two "worker 0" jobs
  never interleave; the manifest is written last, so a unit with a manifest has all its arrays. Other workers
  wait for it. A unit made with other settings is refused, or replaced under ``--overwrite`` when no live
  writer holds a lease on it.
- **Claim.** A shard is computed only under its lease (store/lease.py). A commit record found under the lease
  that belongs to this cache means another writer finished it; one of another cache (a writer fenced out by an
  ``--overwrite``) is removed and the shard rewritten.
- **Fence.** Before claiming, writing and committing, a writer checks that the unit's manifest still carries its
  fingerprint; a replaced cache stops the old writer without a commit.
"""

from __future__ import annotations

import os
import re
import time

from chorus.errors import ChorusError, StillCreating
from chorus.progress import say
from chorus.store.lease import ShardLeases, describe, live_writers
from chorus.store.manifest import TeacherManifest
from chorus.store.zarr_store import ArraySpec, Store

WAIT_FOR_CREATOR_S = float(os.environ.get("CHORUS_WAIT_FOR_CREATOR_S", 600))
SETTINGS = ("model", "revision", "weights_fingerprint", "top_k", "num_samples", "seed", "value_codec", "dtype",
            "corpus_fingerprint", "tokenizer_fingerprint", "format_version", "tail_betas", "tokenizer_mapping")


def differences(old: TeacherManifest, new: TeacherManifest) -> str:
    """The settings that differ between two manifests of one name, as one readable clause."""
    diffs = [f"{k} {getattr(old, k)!r} → {getattr(new, k)!r}" for k in SETTINGS if getattr(old, k) != getattr(new, k)]
    return "; ".join(diffs) or "the target math: made by another chorus version"


class CacheUnit:
    """One teacher cache (``teachers/NAME``) as seen by one writer with ``manifest``'s settings."""

    def __init__(self, store: Store, manifest: TeacherManifest) -> None:
        self.store, self.manifest = store, manifest
        self.name, self.unit = manifest.name, f"teachers/{manifest.name}"

    def current(self) -> TeacherManifest | None:
        """The unit's manifest now, or None while it does not exist (or is being created)."""
        if self.name not in self.store.teacher_names():
            return None
        try:
            return self.store.teacher_manifest(self.name)
        except (FileNotFoundError, StillCreating):  # deleted since the listing (worker 0 replacing it), or half-made
            return None

    def is_ours(self) -> bool:
        current = self.current()
        return current is not None and current.fingerprint == self.manifest.fingerprint

    def fence(self, leases: ShardLeases | None = None, shard: int | None = None) -> None:
        """Raise unless this writer still holds ``shard``'s lease and the unit is still its cache."""
        if shard is not None and leases is not None:
            leases.check(shard)
        if not self.is_ours():
            raise ChorusError(f"cache '{self.name}' in '{self.store.url}' was replaced by another writer (--overwrite) "
                              "while this one ran; this writer stops without committing: rerun it only if its settings "
                              "are wanted")

    # ------------------------------------------------------------------ create or join
    def join(self, specs: list[ArraySpec], num_rows: int, rows_per_shard: int, *, worker: int, overwrite: bool) -> None:
        """Worker 0 creates the unit (or replaces it under ``overwrite``); the others wait for it to exist."""
        deadline = time.monotonic() + WAIT_FOR_CREATOR_S
        announced = False
        while True:
            try:
                old = self.current()
            except (ChorusError, ValueError) as e:  # an unreadable unit: only --overwrite (worker 0) may replace it
                if not (overwrite and worker == 0):
                    raise ChorusError(f"cache '{self.name}' in '{self.store.url}' is unreadable "
                                      f"({str(e).splitlines()[0]}); rerun with --overwrite to rebuild it") from None
                old = self.manifest.replace(fingerprint="", status="unreadable")
            if old is not None and old.fingerprint == self.manifest.fingerprint:
                return
            if old is not None and not overwrite:
                raise ChorusError(
                    f"cache '{self.name}' in '{self.store.url}' was made with other settings "
                    f"({differences(old, self.manifest)}); pass --overwrite to replace it, or choose another --name")
            if worker == 0:
                creator = ShardLeases(self.store, "teachers")  # one creator at a time
                holder = creator.claim_key(f"create-{self.name}")
                if holder is not None:
                    if not announced:
                        say(f"waiting for another job ({describe(holder)}) to create cache '{self.name}'")
                        announced = True
                    time.sleep(0.2)
                    continue
                try:
                    try:
                        again = self.current()
                    except (ChorusError, ValueError):  # still unreadable: replaced under --overwrite (checked above)
                        again = old
                    if again is not None and again.fingerprint == self.manifest.fingerprint:
                        return  # created by the other job while this one waited
                    if again is not None and old is None and not overwrite:
                        continue  # another job created it with other settings meanwhile: refused on the next pass
                    self._create(specs, num_rows, rows_per_shard, old=again if again is not None else old)
                finally:
                    creator.release_key(f"create-{self.name}")
                return
            if time.monotonic() > deadline:
                raise ChorusError(f"cache '{self.name}' was not created within {WAIT_FOR_CREATOR_S:.0f}s; start the "
                                  "worker with --shard 0/N (it creates the cache), then the others")
            if not announced:
                say(f"waiting for worker 0 to create cache '{self.name}'")
                announced = True
            time.sleep(0.5)

    def _create(self, specs: list[ArraySpec], num_rows: int, rows_per_shard: int, *,
                old: TeacherManifest | None) -> None:
        live = live_writers(self.store, self.unit)
        if live:
            raise ChorusError(
                f"cache '{self.name}' in '{self.store.url}' is being written by another job ({describe(live[0])}); "
                "stop it (or let it finish) before --overwrite replaces the cache")
        if old is not None:
            why = "it is unreadable" if old.status == "unreadable" else differences(old, self.manifest)
            say(f"replacing cache '{self.name}' ({why})")
        self.store.delete_unit(self.unit)  # also a half-created unit with no manifest
        self.store.create_arrays(self.unit, specs, num_rows, rows_per_shard)
        self.store.write_teacher_manifest(self.manifest)  # last: a unit with a manifest has all its arrays

    def forget_corrupt(self, shards: list[int]) -> None:
        """Under --overwrite with unchanged settings: forget commits of these shards whose bytes are bad."""
        mine = set(shards)
        for line in self.store.verify(self.unit):
            shard = int(re.search(r" shard (\d+) ", line).group(1))
            if shard in mine:
                say(f"rewriting {line.split(': ', 1)[0]} (its bytes do not match the commit record)")
                self.store.forget_commit(self.unit, shard)

    # ------------------------------------------------------------------ shards
    def claim(self, leases: ShardLeases, shard: int) -> bool:
        """Claim ``shard`` before computing it: False when a live writer holds it or has committed it meanwhile.
        A commit record of another cache (its writer fenced out by --overwrite) is removed under the lease."""
        holder = leases.claim(shard)
        if holder is not None:
            say(f"shard {shard} of {self.unit} is being written by {describe(holder)}; leaving it to that writer")
            return False
        try:
            old = self.store.commit(self.unit, shard)
        except ChorusError:  # unreadable: rewritten under the lease
            old = None
        else:
            if old is None:
                return True
            if old.fingerprint in ("", self.manifest.fingerprint):
                leases.release(shard)  # committed by another writer since this one listed the commits
                return False
        if not self.is_ours():  # the record is the new cache's: this writer is fenced out
            leases.release(shard)
            raise ChorusError(f"cache '{self.unit}' in '{self.store.url}' was replaced by another writer (--overwrite) "
                              "while this one ran; this writer stops without committing")
        self.store.forget_commit(self.unit, shard)
        return True
