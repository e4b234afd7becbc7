"""``qwenkit embed`` as users run it: the printed vectors are ``LLM.embed``'s, and bad input is one line."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys

import pytest
import torch

from qwenkit.cli import main
from qwenkit.generate import LLM

TEXTS = ["What is the capital of China?", "Explain gravity", "一只猫坐在垫子上。"]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    from factories import write_tiny_embedding_model

    return write_tiny_embedding_model(tmp_path_factory.mktemp("embedcli") / "q3e")


def embed(argv: list[str], capsys) -> tuple[int, str, str]:
    code = main(["embed", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_json_lines_equal_llm_embed(model, capsys):
    code, out, err = embed([str(model), *TEXTS, "--dtype", "float32"], capsys)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    want = LLM.load(model, dtype="float32", max_batch_size=1, progress=False).embed(TEXTS)
    assert lines == [{"index": i, "embedding": v} for i, v in enumerate(want)]
    assert len(want[0]) == 32


def test_prompt_name_dimensions_and_the_openai_shape(model, capsys):
    argv = [str(model), *TEXTS[:2], "--prompt-name", "query", "--dimensions", "8", "--format", "json"]
    code, out, err = embed([*argv, "--dtype", "float32", "--batch-size", "8"], capsys)
    assert code == 0, err
    want = LLM.load(model, dtype="float32", progress=False).embed(
        TEXTS[:2], prompt_name="query", dimensions=8
    )
    assert json.loads(out) == {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(want)],
        "model": str(model),
    }
    assert out.count("\n") == 1 and len(want[0]) == 8


def test_json_lines_are_printed_a_chunk_at_a_time(model, monkeypatch, capsys):
    """Each chunk's lines are out before the next chunk runs, so a long file never holds every vector."""
    from qwenkit import embedding
    from qwenkit.cli.embed import CHUNK_TEXTS

    printed: list[int] = []
    run = embedding.run

    def counting_run(llm, ids, adapter=None):
        printed.append(sys.stdout.getvalue().count("\n"))
        return run(llm, ids, adapter)

    monkeypatch.setattr(embedding, "run", counting_run)
    texts = [f"line {i}" for i in range(CHUNK_TEXTS + 3)]
    code, out, err = embed([str(model), *texts, "--dtype", "float32", "--batch-size", "16"], capsys)
    assert code == 0, err
    assert printed == [0, CHUNK_TEXTS]
    want = LLM.load(model, dtype="float32", max_batch_size=16, progress=False).embed(texts)
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["index"] for line in lines] == list(range(len(texts)))
    got = torch.tensor([line["embedding"] for line in lines])
    torch.testing.assert_close(got, torch.tensor(want), rtol=0, atol=2e-6)  # float32 batched otherwise


def test_a_file_reads_one_text_a_line(model, tmp_path, capsys):
    """A UTF-8 BOM, Windows line ends and the final newline are none of the texts'."""
    path = tmp_path / "texts.txt"
    path.write_bytes(("\ufeff" + "\r\n".join(TEXTS) + "\r\n").encode())
    code, out, err = embed([str(model), "--file", str(path), "--dtype", "float32"], capsys)
    assert code == 0, err
    assert code == 0 and embed([str(model), *TEXTS, "--dtype", "float32"], capsys)[1] == out
    assert len(out.splitlines()) == 3


def test_standard_input_reads_one_text_a_line(model):
    cmd = [
        sys.executable,
        "-m",
        "qwenkit",
        "embed",
        str(model),
        "-",
        "--dtype",
        "float32",
        "--dimensions",
        "4",
    ]
    done = subprocess.run(cmd, input="\n".join(TEXTS).encode(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr
    want = LLM.load(model, dtype="float32", max_batch_size=1, progress=False).embed(TEXTS, dimensions=4)
    assert [json.loads(line)["embedding"] for line in done.stdout.splitlines()] == want
    done = subprocess.run(cmd, input=b"fine\nnot \xff UTF-8\n", capture_output=True, timeout=300)
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr == b"error: standard input line 2 is not UTF-8 text (an invalid byte at position 4)\n"


@pytest.mark.parametrize(
    ("args", "stdin", "message"),
    [
        ([], "", "no texts to embed: give them as arguments, '-' (standard input) or --file"),
        (["a", ""], "", "TEXT 2 is empty"),
        (["-"], "a\n\nb\n", "standard input line 2 is empty (one text a line)"),
        (["-"], "\n", "standard input holds no texts (one a line)"),
        (["a", "-"], "", "'-' (the texts from standard input) is given alone"),
        (["a", "--file", "x.txt"], "", "give the texts as arguments or with --file, not both"),
        (["--file", "/no/such.txt"], "", "No such file or directory: /no/such.txt"),
        (
            ["a", "--dimensions", "0"],
            "",
            "argument --dimensions: must be at least 1, got 0; see `qwenkit embed --help`",
        ),
        (
            ["a", "--dimensions", "33"],
            "",
            "--dimensions must be an integer in [1, 32] (the hidden size), got 33",
        ),
        (
            ["a", "--prompt-name", "passage"],
            "",
            "--prompt-name 'passage' is not one of the model's (document, query)",
        ),
    ],
)
def test_bad_input_is_one_line_and_no_vector(model, monkeypatch, capsys, args, stdin, message):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    try:
        code, out, err = embed([str(model), *args], capsys)
    except SystemExit as stop:  # argparse's own errors leave through the parser
        code, (out, err) = stop.code, capsys.readouterr()
    assert (code, out, err) == (2, "", f"error: {message}\n")


def test_a_pooling_qwenkit_does_not_run_is_one_line(model, tmp_path, capsys):
    path = tmp_path / "mean"
    shutil.copytree(model, path)
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    code, out, err = embed([str(path), "hi"], capsys)
    assert (code, out) == (2, "")
    assert err == (
        f"error: {path / '1_Pooling' / 'config.json'}: pooling mean_tokens is not supported; qwenkit pools "
        "the last token (pooling_mode_lasttoken), as decoder embedding models do\n"
    )


def test_no_model_names_the_model_alone(capsys):
    """argparse called TEXT (zero or more of them) required too, where only the model was missing."""
    with pytest.raises(SystemExit) as stop:
        main(["embed"])
    assert stop.value.code == 2
    assert capsys.readouterr().err == (
        "error: the following arguments are required: model; see `qwenkit embed --help`\n"
    )


def test_a_non_finite_embedding_is_one_line_not_nan(model, tmp_path, capsys):
    """``[NaN, ...]`` was printed (not JSON) with exit 0."""
    from factories import with_nan_norm

    code, out, err = embed([str(with_nan_norm(model, tmp_path / "nan")), "hi", "--dtype", "float32"], capsys)
    assert (code, out) == (2, "")
    assert err == "error: the model produced NaN/inf hidden state in float32: the checkpoint may be corrupt\n"
