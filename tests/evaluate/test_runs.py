"""Whole runs: C-Eval fixtures (macro and micro), GSM8K sample, HumanEval cuts side by side, resume after
interruption, rescoring without the model, the CLI and its comparison table."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate import ceval, gsm8k
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.extract import lmeval_flexible, number_verdict
from qwenkit.evaluate.multiple_choice import aggregate
from qwenkit.evaluate.runner import Settings, rescore_dir, run

CEVAL = Path(__file__).parent / "fixtures" / "ceval"


def test_aggregation_macro_and_micro_by_hand():
    rows = [{"subject": "logic", "correct": c} for c in (True, True)]
    rows += [{"subject": "computer_network", "correct": c} for c in (True, False, False, False)]
    macro = aggregate(rows, ceval.category_of, "macro")
    assert macro["acc"] == pytest.approx((1.0 + 0.25) / 2) and macro["acc_micro"] == pytest.approx(3 / 6)
    assert macro["categories"]["Humanities"]["acc"] == 1.0 and macro["categories"]["STEM"]["acc"] == 0.25
    micro = aggregate(rows, ceval.category_of, "micro")
    assert micro["acc"] == pytest.approx(0.5) and micro["acc_macro"] == pytest.approx(0.625)
    assert micro["stderr"] == pytest.approx((0.3 / 6) ** 0.5)  # sample std of 3/6 ones, over sqrt(n)


def test_ceval_fixture_five_shot_run(local, tmp_path):
    results = run(local, Settings(task="ceval", data=str(CEVAL)), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [f"computer_network/val/{k}" for k in range(3)] + [
        f"logic/val/{k}" for k in range(2)
    ]
    first = rows[0]["prompt"]
    assert first.startswith("问题：以太网使用的介质访问控制方法是____。\nA. CSMA/CD\n") and first.endswith(
        "\n答案："
    )
    assert first.count("\n答案：") == 6  # 5 dev answers + the question
    assert results["record"]["letters"] == ["A", "B", "C", "D"]  # no space after 答案：
    s = results["scores"]
    by_subject = {k: v["acc"] for k, v in s["subjects"].items()}
    assert s["aggregation"] == "macro" and s["acc"] == pytest.approx(sum(by_subject.values()) / 2)
    assert s["acc_micro"] == pytest.approx(sum(r["correct"] for r in rows) / 5)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["record"]["fewshot_ids"]["logic"] == [f"logic/dev/{k}" for k in range(5)]


def test_ceval_chat_generation_extracts_a_letter(local, tmp_path):
    settings = Settings(
        task="ceval", method="generate", data=str(CEVAL), max_new_tokens=6, subjects=["logic"]
    )
    results = run(local, settings, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert results["record"]["extractor"] == "qwen-ceval-chat"
    assert (
        rows[0]["prompt"]
        == "“并非所有人都去了”等值于____。\n\nA. 所有人都没去\nB. 有人没去\nC. 有人去了\nD. 所有人都去了\n"
    )
    for r in rows:
        assert r["output"] is not None and r["extracted"] in ("A", "B", "C", "D", "")


def test_ceval_needs_data_and_the_published_header(tmp_path):
    with pytest.raises(EvalDataError, match="--data"):
        run(None, Settings(task="ceval"), progress=False)  # type: ignore[arg-type]
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "logic_val.csv").write_text("question,A,B,C,D\nq,1,2,3,4\n")
    with pytest.raises(EvalDataError, match="header lacks id, answer"):
        ceval.read_split(tmp_path, "val")


def test_gsm8k_sample_and_prompts():
    problems = gsm8k.read_sample()
    assert len(problems) == 100 and problems[0].id == "gsm8k/test/13" and problems[0].gold == "18"
    prompt = gsm8k.base_prompt(problems[0].question)
    assert prompt.startswith("Question: In 2004, there were 60 kids at a cookout.")
    assert prompt.count("The answer is") == 8 and prompt.endswith("\nLet's think step by step\n")
    assert gsm8k.chat_prompt("Q?", 4).count("Question:") == 5
    assert gsm8k.base_cut("x = 3\nThe answer is 3\n\nQuestion: next") == "x = 3\nThe answer is 3"


def test_gsm8k_resume_after_interruption_and_rescore(local, tmp_path):
    base = dict(task="gsm8k", max_new_tokens=8, batch_size=2)
    first = run(local, Settings(**base, limit=2), tmp_path / "a", progress=False)
    assert first["timing"]["items_run"] == 2
    # a smaller limit would score fewer rows than the directory holds: refused in the same directory
    with pytest.raises(EvalDataError, match=r"other settings \(limit\)"):
        run(local, Settings(**base, limit=1), tmp_path / "a", progress=False)
    # interrupted: one finished row and half of the next
    out = tmp_path / "b"
    run(local, Settings(**base, limit=2), out, progress=False)
    lines = (out / "samples.jsonl").read_text().splitlines()
    (out / "samples.jsonl").write_text(lines[0] + "\n" + lines[1][:40])
    again = run(local, Settings(**base, limit=2), out, progress=False)
    assert again["timing"]["items_run"] == 1
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [r["id"] for r in map(json.loads, lines)]
    assert rows[1]["output"] == json.loads(lines[1])["output"]  # greedy: the rerun row is the same
    assert set(rows[0]["correct_by"]) == {
        "qwen-gsm8k-base",
        "qwen-gsm8k-chat",
        "lmeval-strict",
        "lmeval-flexible",
    }
    assert again["record"]["extractor"] == "qwen-gsm8k-base" and "sample" in again["record"]["data"]
    rescored = rescore_dir(out, "lmeval-flexible")
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    for r in rows:
        assert r["correct"] == number_verdict("lmeval-flexible", r["gold"], lmeval_flexible(r["scored_text"]))
    assert rescored["record"]["extractor"] == "lmeval-flexible" and rescored["record"]["rescored"]
    assert json.loads((out / "results.json").read_text())["scores"]["extractor"] == "lmeval-flexible"
    from qwenkit.cli.eval import format_results

    timing = again["timing"]
    assert format_results(rescored).splitlines()[-1] == (
        f"  when generated: 1 items in {timing['seconds']:.1f} s ({timing['items_per_second']:.2f} items/s)"
    )


def test_humaneval_run_reports_both_cuts(local, tmp_path):
    results = run(local, Settings(task="humaneval", limit=2, max_new_tokens=12), tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["HumanEval/0", "HumanEval/1"]
    for r in rows:
        assert set(r["completions"]) == {"qwen", "lm-eval"} and set(r["passed_by"]) == {"qwen", "lm-eval"}
        assert r["passed_by"] == {"qwen": False, "lm-eval": False}  # a random model solves nothing
    assert results["scores"]["acc"] == 0.0 and results["scores"]["cut"] == "lm-eval"


def test_humaneval_chat_run_extracts_the_body(local, tmp_path):
    results = run(
        local,
        Settings(task="humaneval", method="generate", limit=1, max_new_tokens=8),
        tmp_path,
        progress=False,
    )
    row = json.loads((tmp_path / "samples.jsonl").read_text())
    assert row["prompt"].startswith("Write a Python function `has_close_elements(")
    assert set(row["completions"]) == {"qwen-chat-extract"} and row["passed_by"] == {
        "qwen-chat-extract": False
    }
    assert results["record"]["method"] == "chat" and results["scores"]["cut"] == "qwen-chat-extract"


def test_cli_run_compare_and_one_line_errors(tiny_chat_model, tmp_path, capsys):
    out = tmp_path / "run1"
    args = ["eval", str(tiny_chat_model), "--task", "ceval", "--data", str(CEVAL), "--output", str(out)]
    assert qwenkit_main([*args, "--no-progress", "--dtype", "float32"]) == 0
    printed = capsys.readouterr().out
    assert "ceval: loglik-letter" in printed and "overall" in printed and "STEM" in printed
    results = json.loads((out / "results.json").read_text())
    record = results["record"]
    assert len(record["model_files_sha256"]) == 64 and record["dtype"] == "float32"
    assert record["chat_template_sha256"] and record["qwenkit_version"] and record["batch_size"] == 8
    assert qwenkit_main(["eval", "--compare", str(out), str(out / "results.json")]) == 0
    table = capsys.readouterr().out
    assert "ceval" in table and f"{100 * results['scores']['acc']:.2f}" in table
    assert qwenkit_main(["eval", str(tiny_chat_model), "--task", "ceval"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: C-Eval data is not redistributable") and err.count("\n") == 1


def test_a_run_written_before_newer_settings_still_resumes(local, tmp_path):
    settings = Settings(task="gsm8k", limit=1, max_new_tokens=2)
    run(local, settings, tmp_path, progress=False)
    saved = json.loads((tmp_path / "settings.json").read_text())
    for key in ("lengths", "depths", "trials"):  # added with the passkey task
        del saved[key]
    (tmp_path / "settings.json").write_text(json.dumps(saved))
    assert run(local, settings, tmp_path, progress=False)["timing"]["items_run"] == 0
    with pytest.raises(EvalDataError, match="other settings \\(max_new_tokens\\)"):
        run(local, Settings(task="gsm8k", limit=1, max_new_tokens=3), tmp_path, progress=False)


def test_a_standard_error_not_known_reads_n_a_not_a_number():
    """One item leaves nothing to estimate a variance from: its standard error, and a macro average's
    over groups with such items, is unknown, printed ``± n/a`` (before: ``± nan``, or ``± 0.00``), and a
    comparison gives no verdict on it."""
    from qwenkit.cli.eval import format_results
    from qwenkit.evaluate.results import plus_minus
    from qwenkit.evaluate.stats import macro_stderr, mean_stderr

    assert mean_stderr([1.0])[0] == 1.0 and math.isnan(mean_stderr([1.0])[1])
    assert math.isnan(macro_stderr([[1.0], [0.0, 1.0]])[1])
    mean, se = macro_stderr([[1.0, 0.0], [0.0, 1.0, 1.0, 0.0]])
    assert mean == 0.5 and se == pytest.approx((0.5 / 2 + 1 / 3 / 4) ** 0.5 / 2)  # sample variances / n
    assert (plus_minus(None), plus_minus(float("nan")), plus_minus(0.0123)) == ("± n/a", "± n/a", "± 1.23")
    rows = [{"subject": s, "correct": True} for s in ("logic", "computer_network")]
    scores = aggregate(rows, ceval.category_of, "macro")
    text = format_results({"task": "ceval", "record": {}, "scores": scores})
    assert "overall  100.00 ± n/a" in text and "nan" not in text, text


@pytest.mark.slow
@pytest.mark.parametrize(
    "task",
    [
        ["--task", "ceval", "--data", str(CEVAL)],
        ["--task", "gsm8k", "--method", "generate", "--limit", "6", "--max-new-tokens", "24"],
    ],
    ids=["ceval-loglik", "gsm8k-generate"],
)
def test_eval_with_tensor_parallel_scores_every_item_as_one_process(task, tmp_path, capsys):
    """Every rank scores the same items in the same batches (generation queued all at once per batch, so
    the ranks' engines step alike); rank 0 alone writes the run."""
    from factories import write_tiny_chat_model

    model = write_tiny_chat_model(tmp_path / "m", num_key_value_heads=2)
    common = ["eval", str(model), *task, "--dtype", "float32", "--no-progress"]
    assert qwenkit_main([*common, "--output", str(tmp_path / "one")]) == 0
    assert qwenkit_main([*common, "--output", str(tmp_path / "two"), "--tensor-parallel", "2"]) == 0
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["scores"] == one["scores"] and one["scores"]["n"] >= 5

    def samples(d: str) -> list[dict]:
        return [json.loads(line) for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]

    floats = ("scores", "probs")  # letter log-probabilities: the all-reduce's sums may differ in last bits
    for got, want in zip(samples("two"), samples("one"), strict=True):
        assert {k: v for k, v in got.items() if k not in floats} == {
            k: v for k, v in want.items() if k not in floats
        }
        for key in floats:
            assert got.get(key) == pytest.approx(want.get(key), abs=1e-5)


@pytest.mark.slow
def test_a_tensor_parallel_run_resumes_with_every_rank_on_the_items_left(tmp_path):
    """Rank 0 alone reads the run it resumes; the other ranks must score the same items left, not every
    item (their engines would pair other prompts' collectives with rank 0's: a failed run, or answers
    mixed from two prompts). A run resumed, then run again with nothing left, equals one process's."""
    from factories import write_tiny_chat_model

    model = write_tiny_chat_model(tmp_path / "m", num_key_value_heads=2)
    common = ["eval", str(model), "--task", "gsm8k", "--method", "generate", "--dtype", "float32"]
    common += ["--no-progress", "--max-new-tokens", "24", "--batch-size", "2"]
    assert qwenkit_main([*common, "--limit", "6", "--output", str(tmp_path / "one")]) == 0
    two = [*common, "--output", str(tmp_path / "two"), "--tensor-parallel", "2"]
    assert qwenkit_main([*two, "--limit", "2"]) == 0
    assert qwenkit_main([*two, "--limit", "6"]) == 0  # resumes: 4 items left
    first = (tmp_path / "two" / "samples.jsonl").read_text()
    assert qwenkit_main([*two, "--limit", "6"]) == 0  # nothing left

    def answers(d: str) -> list[tuple[str, str]]:
        rows = [json.loads(line) for line in (tmp_path / d / "samples.jsonl").read_text().splitlines()]
        return [(r["id"], r["output"]) for r in rows]

    assert answers("two") == answers("one") and len(answers("one")) == 6
    assert (tmp_path / "two" / "samples.jsonl").read_text() == first
    one, two_results = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two_results["scores"] == one["scores"]


def test_a_run_of_another_model_is_not_resumed(local, tmp_path):
    """The samples of one model must not be scored under another's name: resuming into an --output asks
    for the same model files, dtype, quantization and adapter (the results' record names them)."""
    settings = Settings(task="gsm8k", limit=1, max_new_tokens=2)
    first = {"backend": "local", "model_files_sha256": "a" * 64, "dtype": "bfloat16", "quantization": None}
    run(local, settings, tmp_path, progress=False, model_record=first)
    assert json.loads((tmp_path / "settings.json").read_text())["model"] == {
        "model_files_sha256": "a" * 64,
        "dtype": "bfloat16",
        "quantization": None,
    }
    again = run(local, settings, tmp_path, progress=False, model_record=first)
    assert again["timing"]["items_run"] == 0
    for changed, fields in (({"dtype": "float32"}, "dtype"), ({"quantization": "int4"}, "quantization")):
        with pytest.raises(EvalDataError, match=f"holds a run of another model \\({fields} differs\\)"):
            run(local, settings, tmp_path, progress=False, model_record={**first, **changed})


def test_a_setting_the_task_never_reads_does_not_block_resuming(local, tmp_path):
    """Letter scoring generates nothing: a run given --max-new-tokens 64 (or a perplexity --window) resumes
    without it, as it scored the same; a setting the task reads still has to match."""
    first = run(
        local,
        Settings(task="mmlu", limit=1, subjects=["virology"], max_new_tokens=64, window=100),
        tmp_path,
        progress=False,
    )
    again = run(local, Settings(task="mmlu", limit=1, subjects=["virology"]), tmp_path, progress=False)
    assert again["timing"]["items_run"] == 0
    assert json.dumps(again["scores"], sort_keys=True) == json.dumps(first["scores"], sort_keys=True)
    with pytest.raises(EvalDataError, match=r"holds a run with other settings \(subjects\)"):
        run(local, Settings(task="mmlu", limit=1, subjects=["anatomy"]), tmp_path, progress=False)


def test_a_refused_run_leaves_nothing_that_blocks_the_next(local, tmp_path):
    """A settings file without samples (the run was refused or stopped before its first chunk) is
    replaced by the next run's, instead of refusing the corrected command."""
    (tmp_path / "settings.json").write_text(json.dumps({"task": "gsm8k", "max_new_tokens": 99}))
    results = run(local, Settings(task="gsm8k", limit=1, max_new_tokens=2), tmp_path, progress=False)
    assert results["timing"]["items_run"] == 1
    assert json.loads((tmp_path / "settings.json").read_text())["max_new_tokens"] == 2


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--limit", "0"], "error: --limit must be at least 1, got 0\n"),
        (["--limit", "-1"], "error: --limit must be at least 1, got -1\n"),
        (["--batch-size", "0"], "error: --batch-size must be at least 1, got 0\n"),
    ],
)
def test_counts_that_evaluate_nothing_are_refused(tiny_chat_model, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert qwenkit_main(["eval", str(tiny_chat_model), "--task", "gsm8k", "--output", str(out), *args]) == 2
    assert capsys.readouterr().err == message
    assert not out.exists()


def test_an_output_that_cannot_be_a_directory_is_refused_before_loading(tiny_chat_model, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    for output, message in (
        (tmp_path / "afile", f"error: --output {tmp_path / 'afile'} is a file; give a directory\n"),
        (
            tmp_path / "afile" / "run",
            f"error: cannot write {afile / 'run'}: {afile} is a file, not a directory\n",
        ),
    ):
        assert qwenkit_main(["eval", str(tiny_chat_model), "--task", "gsm8k", "--output", str(output)]) == 2
        assert capsys.readouterr().err == message


def test_ctrl_c_says_what_is_kept_and_the_same_command_resumes(
    tiny_chat_model, tmp_path, capsys, monkeypatch
):
    """The first chunk of 16 is written; Ctrl-C in the second leaves those, and says how to go on."""
    from qwenkit.evaluate.backends import LocalBackend

    out = tmp_path / "run"
    args = ["eval", str(tiny_chat_model), "--task", "gsm8k", "--limit", "17", "--batch-size", "1"]
    args += ["--max-new-tokens", "2", "--dtype", "float32", "--no-progress", "--output", str(out)]
    complete, calls = LocalBackend.complete, []

    def interrupted_second_time(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return complete(self, *a, **k)

    def interrupted_at_once(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LocalBackend, "complete", interrupted_at_once)  # no sample yet: no file to name
    assert qwenkit_main(args) == 130
    assert capsys.readouterr().err == (
        "interrupted: before the first samples were written; rerun the same command to start again\n"
    )
    monkeypatch.setattr(LocalBackend, "complete", interrupted_second_time)
    assert qwenkit_main(args) == 130
    assert capsys.readouterr().err == (
        f"interrupted: 16 samples kept in {out / 'samples.jsonl'}; rerun the same command to resume\n"
    )
    monkeypatch.setattr(LocalBackend, "complete", complete)
    assert qwenkit_main(args) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["timing"]["items_run"] == 1 and results["scores"]["n"] == 17


def test_an_adapter_is_applied_and_named(tiny_chat_model, tmp_path, capsys):
    """``--adapter`` runs the model through the LoRA adapter (the letter scores move), the record names the
    adapter's files, and a run without it is not resumed into that directory."""
    from factories import write_lora_adapter

    from qwenkit.evaluate.results import files_sha256

    adapter = write_lora_adapter(tiny_chat_model, tmp_path / "lora", seed=3)
    args = ["eval", str(tiny_chat_model), "--task", "mmlu", "--limit", "1", "--subjects", "virology"]
    args += ["--dtype", "float32", "--no-progress"]
    assert qwenkit_main([*args, "--output", str(tmp_path / "base")]) == 0
    assert qwenkit_main([*args, "--output", str(tmp_path / "lora-run"), "--adapter", str(adapter)]) == 0
    base, tuned = (json.loads((tmp_path / d / "samples.jsonl").read_text()) for d in ("base", "lora-run"))
    assert base["scores"] != pytest.approx(tuned["scores"], abs=1e-4)
    record = json.loads((tmp_path / "lora-run" / "results.json").read_text())["record"]
    assert record["adapter"] == files_sha256(adapter) and record["adapter_path"] == str(adapter)
    capsys.readouterr()
    assert qwenkit_main([*args, "--output", str(tmp_path / "lora-run")]) == 2
    assert "holds a run of another model (adapter differs)" in capsys.readouterr().err


def test_ctrl_c_before_a_run_cut_off_by_a_kill_resumes_counts_its_whole_samples(
    tiny_chat_model, tmp_path, capsys, monkeypatch
):
    """A run killed (SIGKILL, out of memory) mid-line leaves samples.jsonl ending inside a character; Ctrl-C
    while the next run loads the model counts the whole lines it will keep, in one line (it used to end
    in a UnicodeDecodeError traceback, and the cut line was counted as a sample)."""
    from qwenkit.generate import LLM

    out = tmp_path / "run"
    args = ["eval", str(tiny_chat_model), "--task", "gsm8k", "--limit", "2", "--max-new-tokens", "2"]
    args += ["--dtype", "float32", "--no-progress", "--output", str(out)]
    assert qwenkit_main(args) == 0
    samples = out / "samples.jsonl"
    first, second = samples.read_bytes().splitlines(keepends=True)
    samples.write_bytes(first + second[:20] + "答".encode()[:2])  # killed while writing the second row
    capsys.readouterr()

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(LLM, "load", interrupted)
    assert qwenkit_main(args) == 130
    assert capsys.readouterr().err == (
        f"interrupted: 1 samples kept in {samples}; rerun the same command to resume\n"
    )
