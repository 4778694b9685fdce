"""docs/guarantees.md states counts of what the tests check; each count is what the tests parametrize."""

from __future__ import annotations

import re
from pathlib import Path

DOC = (Path(__file__).resolve().parents[1] / "docs" / "guarantees.md").read_text()


def _stated(pattern: str) -> int:
    found = re.findall(pattern, DOC)
    assert len(found) == 1, (pattern, found)
    return int(found[0])


def test_counts_in_the_guarantees_are_the_tests_own():
    from tests.reliability import test_bad_input, test_corruption, test_kills

    assert _stated(r"(\d+) kinds of damage") == len(test_corruption.KINDS)
    assert _stated(r"(\d+) cases over every command") == len(test_bad_input.CASES)
    assert _stated(r"(\d+) kill points") == len(test_kills.KILL_POINTS)
    assert _stated(r"cache (\d+) \(") == len(test_kills.CACHE_KILLS)
    assert _stated(r"train (\d+) \(") == len(test_kills.TRAIN_KILLS)
    assert _stated(r"calibrate and blend (\d+) \(") == 2 * len(test_kills.RECORD_POINTS)
    assert _stated(r"compress (\d+) \(") == len(test_kills.COMPRESS_KILLS)
