"""Resuming a run keys on what made its answers: the items read from --data (and few-shot examples), not
only the path. An edited data file is a one-line error naming the change; the same data resumes."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.runner import Settings, rescore_dir, run

CEVAL = Path(__file__).parent / "fixtures" / "ceval"


def _gsm8k_file(path: Path, questions: list[str]) -> Path:
    rows = [{"question": q, "answer": f"work\n#### {n}"} for n, q in enumerate(questions)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_edited_data_file_is_not_resumed_into_the_old_run(local, tmp_path):
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?", "Why?"])
    out = tmp_path / "run"
    settings = Settings(task="gsm8k", data=str(data), limit=2, max_new_tokens=2)
    first = run(local, settings, out, progress=False)
    assert first["timing"]["items_run"] == 2 and len(first["record"]["items_sha256"]) == 64
    # unchanged data: resumed, every sample reused
    assert run(local, settings, out, progress=False)["timing"]["items_run"] == 0
    # an item past --limit is edited: the run's items are the same, so it still resumes
    _gsm8k_file(data, ["How many?", "How much?", "Why not?"])
    assert run(local, settings, out, progress=False)["timing"]["items_run"] == 0
    # a question the run asked is edited: refused, and the samples are left as they were
    samples = (out / "samples.jsonl").read_bytes()
    _gsm8k_file(data, ["How many?", "How much is it?", "Why not?"])
    with pytest.raises(EvalDataError) as e:
        run(local, settings, out, progress=False)
    assert str(e.value) == (
        f"{out} holds a run of other items: --data {data} changed since it was written (the questions, "
        f"answers or few-shot examples differ); use another --output, or delete {out} to start over"
    )
    assert (out / "samples.jsonl").read_bytes() == samples


def test_an_edited_few_shot_example_is_not_resumed(local, tmp_path):
    data = tmp_path / "ceval"
    shutil.copytree(CEVAL, data)
    out = tmp_path / "run"
    settings = Settings(task="ceval", data=str(data), subjects=["logic"])
    run(local, settings, out, progress=False)
    dev = data / "dev" / "logic_dev.csv"
    original = dev.read_text(encoding="utf-8")
    dev.write_text(original.replace("的矛盾命题", "的否定命题"), encoding="utf-8")  # a few-shot example
    with pytest.raises(EvalDataError, match="holds a run of other items: --data .* changed since"):
        run(local, settings, out, progress=False)
    dev.write_text(original, encoding="utf-8")
    assert run(local, settings, out, progress=False)["timing"]["items_run"] == 0


def test_the_cli_says_what_changed_in_one_line(tiny_chat_model, tmp_path, capsys):
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?"])
    out = tmp_path / "run"
    args = ["eval", str(tiny_chat_model), "--task", "gsm8k", "--data", str(data), "--max-new-tokens", "2"]
    args += ["--dtype", "float32", "--no-progress", "--output", str(out)]
    assert qwenkit_main(args) == 0
    capsys.readouterr()
    _gsm8k_file(data, ["How few?", "How much?"])
    assert qwenkit_main(args) == 2
    err = capsys.readouterr().err
    assert err == (
        f"error: {out} holds a run of other items: --data {data} changed since it was written (the "
        f"questions, answers or few-shot examples differ); use another --output, or delete {out} to start "
        "over\n"
    )


def test_a_run_recorded_before_items_were_hashed_still_resumes(local, tmp_path):
    settings = Settings(task="gsm8k", limit=1, max_new_tokens=2)
    run(local, settings, tmp_path, progress=False)
    saved = json.loads((tmp_path / "settings.json").read_text())
    assert set(saved) >= {"items_sha256", "prompt_template_sha256"}
    del saved["items_sha256"], saved["prompt_template_sha256"]
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    assert run(local, settings, tmp_path, progress=False)["timing"]["items_run"] == 0


def test_a_run_made_with_another_prompt_template_is_not_resumed(local, tmp_path):
    settings = Settings(task="gsm8k", limit=1, max_new_tokens=2)
    run(local, settings, tmp_path, progress=False)
    saved = json.loads((tmp_path / "settings.json").read_text())
    (tmp_path / "settings.json").write_text(json.dumps({**saved, "prompt_template_sha256": "0" * 64}))
    with pytest.raises(EvalDataError) as e:
        run(local, settings, tmp_path, progress=False)
    assert str(e.value) == (
        f"{tmp_path} holds a run made with another prompt template (another qwenkit version); use another "
        f"--output, or delete {tmp_path} to start over"
    )


def test_a_larger_limit_extends_the_run_and_a_smaller_one_is_refused(local, tmp_path):
    """--limit takes the first items, so a larger one resumes: the saved rows are kept (their items checked
    unchanged) and only the new items run. A smaller one would score fewer rows than the directory holds."""
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?", "Why?"])
    out = tmp_path / "run"
    settings = Settings(task="gsm8k", data=str(data), limit=1, max_new_tokens=2)
    first = run(local, settings, out, progress=False)
    rows = (out / "samples.jsonl").read_bytes()
    grown = run(local, Settings(task="gsm8k", data=str(data), limit=2, max_new_tokens=2), out, progress=False)
    assert grown["timing"]["items_run"] == 1
    assert (out / "samples.jsonl").read_bytes().startswith(rows)  # the first row kept as written
    assert grown["scores"]["n"] == 2 and grown["record"]["settings"]["limit"] == 2
    assert json.loads((out / "settings.json").read_text())["limit"] == 2
    assert json.loads((out / "results.json").read_text())["scores"] == grown["scores"]
    every = run(local, Settings(task="gsm8k", data=str(data), max_new_tokens=2), out, progress=False)
    assert every["timing"]["items_run"] == 1 and every["scores"]["n"] == 3
    assert first["scores"]["n"] == 1
    with pytest.raises(EvalDataError) as e:
        run(local, settings, out, progress=False)
    assert str(e.value) == (
        f"{out} holds a run with other settings (limit); use another --output, or delete {out} to start over"
    )


def test_a_larger_limit_over_edited_items_is_refused(local, tmp_path):
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?"])
    out = tmp_path / "run"
    run(local, Settings(task="gsm8k", data=str(data), limit=1, max_new_tokens=2), out, progress=False)
    _gsm8k_file(data, ["How few?", "How much?"])
    with pytest.raises(EvalDataError, match=r"holds a run of other items: --data .* changed since"):
        run(local, Settings(task="gsm8k", data=str(data), limit=2, max_new_tokens=2), out, progress=False)
    assert json.loads((out / "settings.json").read_text())["limit"] == 1
    assert (out / "results.json").exists()


def test_a_larger_limit_stopped_midway_leaves_no_stale_results(local, tmp_path, monkeypatch):
    """Once the run grows, the smaller run's results.json no longer describes the samples: it goes, so a
    --rescore of a run stopped midway cannot score the new rows under the old settings."""
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?"])
    out = tmp_path / "run"
    run(local, Settings(task="gsm8k", data=str(data), limit=1, max_new_tokens=2), out, progress=False)

    def stopped(*args, **kwargs):
        raise KeyboardInterrupt

    for method in ("complete", "chat"):
        monkeypatch.setattr(local, method, stopped)
    with pytest.raises(KeyboardInterrupt):
        run(local, Settings(task="gsm8k", data=str(data), limit=2, max_new_tokens=2), out, progress=False)
    assert not (out / "results.json").exists()
    assert json.loads((out / "settings.json").read_text())["limit"] == 2
    with pytest.raises(EvalDataError) as e:  # it has samples: it used to say "has no samples.jsonl and ..."
        rescore_dir(out)
    assert str(e.value) == (
        f"{out} holds an unfinished run (samples, no results.json yet): rerun its command to finish it, "
        "then rescore it"
    )


def test_a_larger_limit_names_what_else_changed(local, tmp_path):
    """A larger --limit checks the saved run's items at its own limit, so a refusal names the real change:
    a prompt template from another version is not reported as edited --data."""
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?"])
    out = tmp_path / "run"
    run(local, Settings(task="gsm8k", data=str(data), limit=1, max_new_tokens=2), out, progress=False)
    saved = json.loads((out / "settings.json").read_text())
    (out / "settings.json").write_text(json.dumps({**saved, "prompt_template_sha256": "0" * 64}))
    with pytest.raises(EvalDataError) as e:
        run(local, Settings(task="gsm8k", data=str(data), limit=2, max_new_tokens=2), out, progress=False)
    assert str(e.value) == (
        f"{out} holds a run made with another prompt template (another qwenkit version); use another "
        f"--output, or delete {out} to start over"
    )


def test_a_run_recorded_before_items_were_hashed_grows_with_a_larger_limit(local, tmp_path):
    """Such a run is taken to be of these items (it resumes at its own --limit): a larger one extends it."""
    data = _gsm8k_file(tmp_path / "test.jsonl", ["How many?", "How much?"])
    out = tmp_path / "run"
    run(local, Settings(task="gsm8k", data=str(data), limit=1, max_new_tokens=2), out, progress=False)
    saved = json.loads((out / "settings.json").read_text())
    del saved["items_sha256"], saved["prompt_template_sha256"]
    (out / "settings.json").write_text(json.dumps(saved))
    grown = run(local, Settings(task="gsm8k", data=str(data), limit=2, max_new_tokens=2), out, progress=False)
    assert grown["timing"]["items_run"] == 1 and grown["scores"]["n"] == 2
    assert json.loads((out / "settings.json").read_text())["items_sha256"] == grown["record"]["items_sha256"]
