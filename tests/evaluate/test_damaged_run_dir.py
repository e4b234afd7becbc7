"""A run directory whose files were damaged (edited by hand, cut by a full disk) is refused in one line
naming the file, exit 2, and left as it was: resuming into it, or rescoring it, never ends in a
traceback."""

from __future__ import annotations

import pytest

from qwenkit.cli import main as qwenkit_main

RUN_ARGS = ["--task", "mmlu", "--limit", "1", "--subjects", "virology", "anatomy", "--no-progress"]


@pytest.fixture
def saved_run(tiny_chat_model, tmp_path):
    out = tmp_path / "run"
    assert qwenkit_main(["eval", str(tiny_chat_model), *RUN_ARGS, "--output", str(out)]) == 0
    return out


def damage(out, name: str, how: str) -> dict[str, bytes]:
    path = out / name
    text = path.read_text()
    path.write_text({"cut": text[: len(text) // 2], "list": "[1]\n", "append": text + '{"foo": 1}\n'}[how])
    return {f.name: f.read_bytes() for f in out.iterdir() if f.name != "run.lock"}


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        ("settings.json", "cut", "{out}/settings.json is damaged: not a JSON object (run's settings)"),
        ("settings.json", "list", "{out}/settings.json is damaged: not a JSON object (run's settings)"),
        (
            "samples.jsonl",
            "append",
            "{out}/samples.jsonl line 3 is not a sample of qwenkit eval (no item id)",
        ),
    ],
)
def test_resuming_into_a_damaged_run_is_one_line(saved_run, tiny_chat_model, capsys, name, how, message):
    before = damage(saved_run, name, how)
    capsys.readouterr()
    assert qwenkit_main(["eval", str(tiny_chat_model), *RUN_ARGS, "--output", str(saved_run)]) == 2
    assert capsys.readouterr().err == "error: " + message.format(out=saved_run) + "\n"
    assert {f.name: f.read_bytes() for f in saved_run.iterdir() if f.name != "run.lock"} == before


@pytest.mark.parametrize(
    ("name", "how", "message"),
    [
        ("results.json", "cut", "{out}/results.json is damaged: not a JSON object (run's results)"),
        ("results.json", "list", "{out}/results.json is damaged: not a JSON object (run's results)"),
        (
            "samples.jsonl",
            "append",
            "{out}/samples.jsonl line 3 is not a sample of qwenkit eval (no item id)",
        ),
    ],
)
def test_rescoring_a_damaged_run_is_one_line(saved_run, capsys, name, how, message):
    before = damage(saved_run, name, how)
    capsys.readouterr()
    assert qwenkit_main(["eval", "--rescore", str(saved_run)]) == 2
    assert capsys.readouterr().err == "error: " + message.format(out=saved_run) + "\n"
    assert {f.name: f.read_bytes() for f in saved_run.iterdir() if f.name != "run.lock"} == before


def test_rescoring_a_sample_without_a_field_its_scoring_reads_names_it(saved_run, capsys):
    samples = saved_run / "samples.jsonl"
    lines = samples.read_text().splitlines()
    lines[0] = '{"id": "virology/test/0", "subject": "virology", "gold": "A"}'
    samples.write_text("\n".join(lines) + "\n")
    results = (saved_run / "results.json").read_bytes()
    assert qwenkit_main(["eval", "--rescore", str(saved_run)]) == 2
    assert capsys.readouterr().err == (
        f"error: {samples}: sample 'virology/test/0' lacks 'extracted', which mmlu scoring reads\n"
    )
    assert (saved_run / "results.json").read_bytes() == results
