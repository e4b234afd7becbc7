"""`qwenkit info` on a model directory shows the sampling chat, generate and serve default to, read from its
generation_config.json as they read it, as it shows a GGUF file's general.sampling.* keys."""

from __future__ import annotations

import json
import re

import pytest
from factories import hf_model, save_hf

from qwenkit.cli import main


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("info") / "qwen2")


def _row(model_dir, generation: dict | None, capsys) -> str:
    file = model_dir / "generation_config.json"
    if generation is None:
        file.unlink(missing_ok=True)
    else:
        file.write_text(json.dumps(generation))
    assert main(["info", str(model_dir)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in lines if "  " in line.strip())
    return rows["sampling (generation_config.json)"]


def test_info_shows_the_directorys_sampling_as_the_commands_use_it(model_dir, capsys):
    """No row was shown for a directory: a user could not see that Qwen2.5's 0.7 / 0.8 / 20 / 1.05 would
    be used, nor that a file without do_sample decodes greedily."""
    qwen25 = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    assert _row(model_dir, qwen25, capsys) == (
        "temperature 0.7, top_p 0.8, top_k 20, min_p 0, repetition_penalty 1.05"
    )
    # what the file leaves out is transformers' default; min_p and null as read
    partial = {"do_sample": True, "temperature": 0.6, "min_p": 0.05, "top_k": None}
    assert (
        _row(model_dir, partial, capsys)
        == "temperature 0.6, top_p 1, top_k 50, min_p 0.05, repetition_penalty 1"
    )
    assert _row(model_dir, {"temperature": 0.7, "top_p": 0.8}, capsys) == "greedy (do_sample is not true)"
    assert _row(model_dir, None, capsys) == (
        "none in the directory; qwenkit's defaults apply: "
        "temperature 0.7, top_p 0.8, top_k 20, min_p 0, repetition_penalty 1.05"
    )


def test_a_sampling_value_of_the_wrong_type_is_refused_in_one_line(model_dir, capsys):
    (model_dir / "generation_config.json").write_text('{"do_sample": true, "top_k": 20.5}')
    assert main(["info", str(model_dir)]) != 0
    err = capsys.readouterr().err
    assert err == f"error: {model_dir / 'generation_config.json'}: top_k must be a whole number, not 20.5\n"
