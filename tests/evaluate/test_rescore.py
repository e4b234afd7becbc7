"""``--rescore`` recomputes everything derived from the samples with the code a run uses: every
extractor's verdict and score, the headline, and the record's extractor and those beside it."""

from __future__ import annotations

import json

import pytest

from qwenkit.cli.eval import format_results
from qwenkit.evaluate.runner import Settings, rescore_dir, run

# scored text, gold, and what each extractor makes of it: base "200", chat/strict/flexible "1200"; ...
TEXTS = [
    ("so 1,200 in all\n#### 1,200", "1200"),  # base x, chat v, strict v, flexible v
    ("The answer is 7", "7"),  # base v, chat v, strict x, flexible v
    ("It fell to -5 degrees", "-5"),  # base x, chat v, strict x, flexible v
]
EXPECTED = {"qwen-gsm8k-base": 1 / 3, "qwen-gsm8k-chat": 1.0, "lmeval-strict": 1 / 3, "lmeval-flexible": 1.0}


@pytest.fixture
def gsm8k_run(local, tmp_path):
    """A finished GSM8K run whose samples' texts are then known ones (stale verdicts left in place, as a
    newer extractor would find them)."""
    run(local, Settings(task="gsm8k", limit=3, max_new_tokens=4), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    for row, (text, gold) in zip(rows, TEXTS, strict=True):
        row |= {"scored_text": text, "gold": gold}
        row["correct_by"] = dict.fromkeys(row["correct_by"], False)
    (tmp_path / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return tmp_path


def test_rescore_recomputes_every_extractor_and_the_record(gsm8k_run):
    results = rescore_dir(gsm8k_run, "lmeval-strict")
    s, record = results["scores"], results["record"]
    assert {name: s[name]["acc"] for name in EXPECTED} == pytest.approx(EXPECTED)
    assert s["acc"] == pytest.approx(1 / 3) and s["extractor"] == "lmeval-strict"
    assert record["extractor"] == "lmeval-strict" and record["settings"]["extractor"] == "lmeval-strict"
    assert record["extractors_beside"] == ["qwen-gsm8k-base", "qwen-gsm8k-chat", "lmeval-flexible"]
    assert json.loads((gsm8k_run / "results.json").read_text())["scores"] == s
    rows = [json.loads(line) for line in (gsm8k_run / "samples.jsonl").read_text().splitlines()]
    assert [r["correct"] for r in rows] == [True, False, False]
    assert rows[0]["correct_by"] == {
        "qwen-gsm8k-base": False,
        "qwen-gsm8k-chat": True,
        "lmeval-strict": True,
        "lmeval-flexible": True,
    }
    printed = format_results(results).splitlines()
    assert "  [qwen-gsm8k-chat] 100.00 ± 0.00" in printed and "  [lmeval-flexible] 100.00 ± 0.00" in printed
    assert printed[1].startswith("  overall  33.33 ± 33.33")


def test_rescore_without_an_extractor_keeps_the_runs(gsm8k_run):
    results = rescore_dir(gsm8k_run)
    assert results["record"]["extractor"] == "qwen-gsm8k-base"
    assert results["scores"]["acc"] == pytest.approx(1 / 3)
    assert results["record"]["extractors_beside"] == ["qwen-gsm8k-chat", "lmeval-strict", "lmeval-flexible"]
