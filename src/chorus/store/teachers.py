"""Which teachers of a store can be read together, and the blend recorded for them: the checks every reader of
teacher caches (train, eval, calibrate, blend, compress) runs first."""

from __future__ import annotations

from collections.abc import Sequence

from chorus.errors import ChorusError
from chorus.store.check import check_store
from chorus.store.manifest import CROSS_MAPPING_VERSION, TeacherManifest
from chorus.store.zarr_store import Store

BLEND_KEY = "chorus_blend"  # the store attribute `chorus blend` writes


def check_teachers(store: Store, names: Sequence[str], *, need_samples: bool = False) -> list[TeacherManifest]:
    """The manifests of ``names``, refusing (one line, naming the teacher) any that cannot be joined, and a store
    with any structural problem a reader would trip on (``chorus verify`` names the same)."""
    corpus = store.manifest
    out = []
    for name in names:  # what a user most likely got wrong first, named plainly; then the store's structure
        m = store.teacher_manifest(name)
        unit = f"teachers/{name}"
        if m.status != "complete" or not store.is_complete(unit, corpus.num_shards):
            done = len(store.commits(unit))
            raise ChorusError(f"teacher '{name}' is not complete ({done}/{corpus.num_shards} shards committed, "
                              f"status '{m.status}'); finish it with `chorus cache` first")
        if m.corpus_fingerprint != corpus.fingerprint:
            raise ChorusError(f"teacher '{name}' was cached from another corpus (fingerprint {m.corpus_fingerprint}, "
                              f"store {corpus.fingerprint}); recache it with `chorus cache --store {store.url}`")
        if m.tokenizer_fingerprint != corpus.tokenizer.fingerprint or m.vocab_size != corpus.tokenizer.vocab_size:
            raise ChorusError(f"teacher '{name}' uses another tokenizer (vocab {m.vocab_size}, store vocab "
                              f"{corpus.tokenizer.vocab_size}); teachers and students must share the store's tokenizer")
        mapping = m.tokenizer_mapping
        if mapping and mapping.get("version", 0) < CROSS_MAPPING_VERSION and not mapping.get("vocab", {}).get("permutation"):
            raise ChorusError(f"teacher '{name}' is a cross-tokenizer cache of mapping version "
                              f"{mapping.get('version', 0)}, whose targets and gold log-probs hold the hard label; "
                              f"recache it with `chorus cache --name {name} ... --overwrite`")
        if need_samples and m.num_samples == 0:
            raise ChorusError(f"teacher '{name}' has no sampled targets (cached with --samples 0); "
                              "use target=topk_tail or recache it with --samples M")
        out.append(m)
    check_store(store, list(names))
    return out


def complete_teachers(store: Store) -> list[str]:
    """Names of the teachers of ``store`` that can be joined (complete, same corpus and tokenizer)."""
    ok = []
    for name in store.teacher_names():
        try:
            check_teachers(store, [name])
        except ChorusError:
            continue
        ok.append(name)
    return ok


def stored_blend(store: Store, teachers: list[str]) -> dict | None:
    """The blend recorded in ``store`` for exactly these teachers (in any order), else None."""
    blend = store.group.attrs.get(BLEND_KEY)
    if not blend or sorted(blend.get("teachers", [])) != sorted(teachers):
        return None
    return blend


def blend_fill(fitted: dict, *, domain_weights: dict, weighting: str, operator: str) -> dict:
    """What a fitted blend fills in where the user left the defaults: its per-domain weights unless some are set,
    and its per-token weighting (with its beta) unless one is chosen, only for the operator it was fitted with."""
    changes: dict = {}
    if not domain_weights:
        changes["domain_weights"] = fitted["domain_weights"]
    if weighting == "none" and fitted["weighting"] != "none" and operator == fitted["operator"]:
        changes.update(weighting=fitted["weighting"], beta=float(fitted["beta"]))
    return changes
