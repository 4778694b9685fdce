"""On-disk records (store/manifest.py): every field is type-checked on read, and a bad one is named with what was
expected and what was found. Format versions: tests/store/test_targets.py."""

from __future__ import annotations

from typing import Optional

import numpy as np
import pytest

from chorus.errors import ChorusError
from chorus.store import CorpusManifest, ShardCommit, TeacherManifest, TokenizerInfo, value_params
from chorus.store.manifest import NO_TARGET_ENTROPY, _check, no_target

TOK = TokenizerInfo(name="tok", vocab_size=300, fingerprint="f", vocab_fingerprint="v", eos_id=0, pad_id=1)


def corpus(**changes) -> dict:
    m = CorpusManifest(fingerprint="c", tokenizer=TOK, seq_len=32, num_rows=10, rows_per_shard=4,
                       domains=("code", "prose"), num_tokens=300, split_rows={"train": 8, "valid": 2},
                       source={"dataset": "d", "max_docs": None}, created_by="test")
    return m.to_dict() | changes


def teacher(**changes) -> dict:
    m = TeacherManifest(name="t", model="m", revision="r", weights_fingerprint="w", dtype="float32", device="cpu",
                        top_k=8, num_samples=0, seed=0, value_codec="fp16", value_params=value_params("fp16"),
                        corpus_fingerprint="c", tokenizer_fingerprint="tok", vocab_size=300, fingerprint="f",
                        created_by="test")
    return m.to_dict() | changes


def test_a_corpus_manifest_round_trips_with_its_nested_record():
    data = corpus()
    assert data["tokenizer"] == {"name": "tok", "vocab_size": 300, "fingerprint": "f", "vocab_fingerprint": "v",
                                 "eos_id": 0, "pad_id": 1}
    assert data["domains"] == ["code", "prose"]  # tuples are stored as lists
    m = CorpusManifest.from_dict(data)
    assert m.tokenizer == TOK and m.domains == ("code", "prose") and m.split_rows == {"train": 8, "valid": 2}
    assert m.source == {"dataset": "d", "max_docs": None} and m.to_dict() == data


def test_shard_rows_cover_the_corpus_with_a_short_last_shard():
    m = CorpusManifest.from_dict(corpus())
    assert m.num_shards == 3
    assert [m.shard_rows(s) for s in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert CorpusManifest.from_dict(corpus(num_rows=8)).num_shards == 2


@pytest.mark.parametrize("field, value, message", [
    ("seq_len", "32", "corpus manifest.seq_len': expected an integer, got '32'"),
    ("seq_len", True, "corpus manifest.seq_len': expected an integer, got True"),
    ("seq_len", 32.0, "corpus manifest.seq_len': expected an integer, got 32.0"),
    ("fingerprint", 7, "corpus manifest.fingerprint': expected a string, got 7"),
    ("domains", "code", "corpus manifest.domains': expected a list, got 'code'"),
    ("domains", ["code", 3], r"corpus manifest.domains\[1\]': expected a string, got 3"),
    ("split_rows", [8, 2], "corpus manifest.split_rows': expected a mapping, got \\[8, 2\\]"),
    ("split_rows", {"train": "8"}, "corpus manifest.split_rows.train': expected an integer, got '8'"),
    ("tokenizer", "tok", "corpus manifest.tokenizer': expected a mapping, got 'tok'"),
])
def test_a_field_of_the_wrong_type_is_named_with_what_was_expected(field, value, message):
    with pytest.raises(ChorusError, match=f"^manifest field '{message}$"):
        CorpusManifest.from_dict(corpus(**{field: value}))


def test_a_nested_record_checks_its_own_fields():
    bad = corpus()
    bad["tokenizer"]["eos_id"] = "0"
    with pytest.raises(ChorusError, match=r"^manifest field 'tokenizer.eos_id': expected an integer, got '0'$"):
        CorpusManifest.from_dict(bad)


def test_numbers_and_flags_are_checked_as_such():
    m = TeacherManifest.from_dict(teacher(temperature=2))
    assert m.temperature == 2.0 and type(m.temperature) is float  # an integer is a number
    with pytest.raises(ChorusError, match=r"^manifest field 'teacher manifest.temperature': expected a number, got True$"):
        TeacherManifest.from_dict(teacher(temperature=True))
    with pytest.raises(ChorusError, match=r"'teacher manifest.temperature': expected a number, got '1.0'$"):
        TeacherManifest.from_dict(teacher(temperature="1.0"))
    with pytest.raises(ChorusError, match=r"'teacher manifest.tail_betas\[0\]': expected a number, got 'x'$"):
        TeacherManifest.from_dict(teacher(tail_betas=["x"]))


def test_free_form_fields_keep_any_value_and_string_keys():
    m = TeacherManifest.from_dict(teacher(calibration={"fit": [1, "a", None], 3: {"x": 1.5}}))
    assert m.calibration == {"fit": [1, "a", None], "3": {"x": 1.5}}


def test_a_missing_required_field_is_named_and_defaults_fill_the_rest():
    data = teacher()
    for optional in ("status", "temperature", "calibration", "tail_betas", "tokenizer_mapping"):
        del data[optional]
    m = TeacherManifest.from_dict(data)
    assert (m.status, m.temperature, m.calibration, m.tail_betas, m.tokenizer_mapping) == (
        "incomplete", 1.0, {}, (), {})
    del data["top_k"]
    with pytest.raises(ChorusError, match=r"^teacher manifest: required field 'top_k' is missing$"):
        TeacherManifest.from_dict(data)


def test_a_record_that_is_not_a_mapping_is_refused():
    with pytest.raises(ChorusError, match=r"^commit record: expected a mapping, got list$"):
        ShardCommit.from_dict([1, 2])
    with pytest.raises(ChorusError, match=r"^teacher manifest: expected a mapping, got str$"):
        TeacherManifest.from_dict("t")


def test_unknown_keys_are_ignored_and_the_recorded_version_kept():
    data = teacher(format_version=1, future_field=3)
    m = TeacherManifest.from_dict(data)
    assert m.format_version == 1 and not hasattr(m, "future_field")
    c = ShardCommit(unit="u", shard=2, row_start=8, row_stop=12, checksums={"x": "crc32c:1"}, fingerprint="f")
    assert ShardCommit.from_dict(c.to_dict()) == c


def test_a_version_error_names_the_record_and_the_versions_it_reads():
    with pytest.raises(ChorusError, match=r"^commit record: expected format_version 1, got '1'; this store was "
                                          r"written by another chorus version: upgrade chorus or rebuild the store$"):
        ShardCommit.from_dict({"unit": "u", "shard": 0, "row_start": 0, "row_stop": 1, "checksums": {},
                               "format_version": "1"})


@pytest.mark.parametrize("name", ["t", "Qwen2.5-0.5B_x", "a..b", "../t", "a/b", ".hidden", "", "-x"])
def test_a_cache_name_is_one_folder(name):
    ok = name in ("t", "Qwen2.5-0.5B_x")
    if ok:
        assert TeacherManifest.from_dict(teacher(name=name)).name == name
    else:
        with pytest.raises(ChorusError, match=r"^teacher manifest field 'name': expected letters, digits, '\.', '_' "
                                              r"and '-' \(one folder, no '/' or '\.\.'\), got "):
            TeacherManifest.from_dict(teacher(name=name))


def test_replace_changes_only_the_given_fields():
    m = TeacherManifest.from_dict(teacher())
    r = m.replace(status="complete", top_k=16)
    assert (r.status, r.top_k) == ("complete", 16) and r.replace(status=m.status, top_k=8) == m


def test_a_cross_tokenizer_teacher_and_statistics_are_told_by_their_fields():
    m = TeacherManifest.from_dict(teacher())
    assert not m.cross_tokenizer and not m.has_stats
    m = m.replace(tokenizer_mapping={"method": "bytes"}, tail_betas=(0.5, 2.0))
    assert m.cross_tokenizer and m.has_stats


def test_no_target_is_the_entropy_no_distribution_has():
    entropy = np.array([NO_TARGET_ENTROPY, 0.0, 2.3, NO_TARGET_ENTROPY / 2, -0.4])
    assert no_target(entropy).tolist() == [True, False, False, False, False]


def test_an_optional_field_takes_none_or_its_type():
    assert _check("f", Optional[int], None) is None and _check("f", Optional[int], 3) == 3
    assert _check("f", Optional[float], 2) == 2.0 and type(_check("f", Optional[float], 2)) is float
    with pytest.raises(ChorusError, match=r"^manifest field 'f': expected an integer, got 'x'$"):
        _check("f", Optional[int], "x")
    with pytest.raises(ChorusError, match=r"^manifest field 'f': expected an integer, got None$"):
        _check("f", int, None)
