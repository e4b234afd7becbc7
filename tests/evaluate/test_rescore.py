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


def test_a_run_resumed_after_a_rescore_judges_every_sample_by_its_own_extractor(local, tmp_path):
    """A rescore with another extractor leaves the samples judged by it; the run's own command resumed
    (here with a larger --limit) judges the saved samples again by the run's extractor, as its results
    say. It used to keep the rescore's verdicts beside its own new ones, under its own extractor's name."""
    reply = "I choose C, but 答案是B。"  # qwen-mmlu-chat reads C ("choose"), qwen-ceval-chat B ("答案是")
    settings = Settings(task="mmlu", method="generate", limit=1, subjects=["virology"], max_new_tokens=2)
    run(local, settings, tmp_path, progress=False)
    samples = tmp_path / "samples.jsonl"
    rows = [json.loads(line) | {"output": reply} for line in samples.read_text().splitlines()]
    samples.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rescore_dir(tmp_path, "qwen-ceval-chat")
    assert [r["extracted"] for r in _rows(samples)] == ["B"]

    local.chat = lambda messages, max_tokens: [reply] * len(messages)
    results = run(local, Settings(**{**settings.__dict__, "limit": 2}), tmp_path, progress=False)
    rows = _rows(samples)
    assert [r["extracted"] for r in rows] == ["C", "C"]
    assert results["record"]["extractor"] == "qwen-mmlu-chat"
    assert results["scores"]["acc"] == sum(r["gold"] == "C" for r in rows) / 2
    assert json.loads((tmp_path / "results.json").read_text())["scores"] == results["scores"]


def _rows(samples) -> list[dict]:
    return [json.loads(line) for line in samples.read_text().splitlines()]
