"""Passkey retrieval (synthetic long context): reproducible keys, prompts filled to the asked length with
the needle at its depth, exact scoring, and a whole run on a steered tiny model."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import ScriptedModel

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate import passkey
from qwenkit.evaluate.backends import LocalBackend
from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.runner import Settings, rescore_dir, run
from qwenkit.generate import LLM, tokenizer_for


@pytest.fixture(scope="module")
def encode(tiny_chat_model):
    return tokenizer_for(tiny_chat_model).encode


def test_grid_and_keys_are_reproducible():
    items = passkey.needles([1024, 4096], [0.0, 0.5], 2, max_context=8192)
    assert [i.id for i in items[:3]] == ["passkey/1024/0/0", "passkey/1024/0/1", "passkey/1024/0.5/0"]
    assert len(items) == 8 and len({i.key for i in items}) == 8
    assert passkey.Needle(512, 0.0, 0).key == "99397"  # seeded by the id: the same on every machine
    assert all(len(i.key) == 5 for i in items)
    default = passkey.needles(None, None, 1, max_context=8192)
    assert sorted({i.length for i in default}) == [1024, 2048, 4096, 8192] and len(default) == 4 * 5
    assert {i.length for i in passkey.needles(None, None, 1, None)} == set(passkey.LENGTHS)


def test_a_length_or_depth_given_twice_is_one_cell():
    """Two items of one id ran twice and were kept as one sample on resume (n changed): now one cell."""
    items = passkey.needles([1024, 2048, 1024], [0.5, 0.50, 0.0], 1, max_context=None)
    assert [i.id for i in items] == [
        "passkey/1024/0.5/0",
        "passkey/1024/0/0",
        "passkey/2048/0.5/0",
        "passkey/2048/0/0",
    ]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (([16384], None, 1, 8192), "--lengths 16384 exceeds the model's context of 8192 tokens"),
        ((None, None, 1, 512), "shorter than 1024: pass --lengths"),
        (([100], None, 1, None), "at least 256"),
        (([1024], [1.5], 1, None), "between 0 and 1"),
        (([1024], None, 0, None), "--trials must be at least 1"),
    ],
)
def test_bad_grids_are_refused(args, message):
    with pytest.raises(EvalDataError, match=message):
        passkey.needles(*args)


@pytest.mark.parametrize("chat", [False, True])
def test_prompt_fills_the_length_with_the_needle_at_its_depth(encode, chat):
    for length in (512, 2048):
        for depth in (0.0, 0.5, 1.0):
            needle = passkey.Needle(length, depth, 0)
            text, n = passkey.build(needle, encode, chat, max_tokens=16)
            assert n == len(encode(text))
            budget = length - 16 - (passkey.CHAT_RESERVE if chat else 0)
            assert budget - 30 <= n <= budget  # filled to within about one filler sentence
            assert text.startswith(passkey.INTRO) and text.count(needle.key) == 2
            assert text.endswith(passkey.QUESTION + ("" if chat else passkey.BASE_ANSWER))
            body = text[len(passkey.INTRO) :]
            before, _, after = body.partition("The passkey is " + needle.key)
            units_before, units_after = before.count(passkey.FILLER), after.count(passkey.FILLER.strip())
            total = units_before + units_after
            assert units_before == round(depth * total) and total > 0


def test_extraction_is_exact():
    assert passkey.extract(" 12345.") == "12345"
    assert passkey.extract("The passkey is 12,345, I think") == "12345"
    assert passkey.extract("first 7 then 12345") == "7"  # the first number, not the best guess
    assert passkey.extract("I do not know") == ""


def test_run_scores_a_steered_model_by_length_and_depth(tiny_chat_model, encode, tmp_path):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=4, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=4, max_seq_len=2048)
    # this one prompt gets the right answer; the rest, noise. The script plays for the first request of
    # its prompt length (1024/0.5 has that length too: it used to be steered as well, to a wrong key)
    right = passkey.Needle(1024, 0.0, 0)
    _, n = passkey.build(right, encode, chat=False, max_tokens=16)
    model.play(n, encode(f" {right.key}."))
    settings = Settings(task="passkey", lengths=[512, 1024], depths=[0.0, 0.5], max_new_tokens=64)
    results = run(LocalBackend(llm, batch_size=4), settings, tmp_path, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == [
        "passkey/512/0/0",
        "passkey/512/0.5/0",
        "passkey/1024/0/0",
        "passkey/1024/0.5/0",
    ]
    hit = rows[2]
    assert hit["output"] == f" {right.key}." and hit["extracted"] == right.key and hit["correct"]
    assert hit["prompt_tokens"] == n and len(hit["prompt_sha256"]) == 64
    assert [r["correct"] for r in rows] == [False, False, True, False]
    s = results["scores"]
    assert s["acc"] == pytest.approx(0.25) and s["lengths"]["1024"]["acc"] == pytest.approx(0.5)
    assert s["depths"]["0.0"]["acc"] == pytest.approx(0.5) and s["depths"]["0.5"]["acc"] == 0.0
    record = results["record"]
    assert record["max_new_tokens"] == 16 and record["lengths"] == [512, 1024]  # base: a short answer
    assert "synthetic" in record["data"]
    assert json.dumps(rescore_dir(tmp_path)["scores"], sort_keys=True) == json.dumps(s, sort_keys=True)


def test_cli_refuses_lengths_beyond_the_context(tiny_chat_model, capsys):
    args = ["eval", str(tiny_chat_model), "--task", "passkey", "--lengths", "65536", "--no-progress"]
    assert qwenkit_main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --lengths 65536 exceeds the model's context") and err.count("\n") == 1
    assert qwenkit_main(["eval", str(tiny_chat_model), "--task", "passkey", "--data", "x.jsonl"]) == 2
    assert "passkey is synthetic" in capsys.readouterr().err


def test_a_length_the_answer_fills_names_max_new_tokens(tiny_chat_model, encode, capsys):
    """Chat runs keep --max-new-tokens (512 by default) free for the answer, so --lengths 512 with
    --method generate had no room for filler; the error told the user to lengthen --lengths only."""
    with pytest.raises(EvalDataError) as caught:
        passkey.build(passkey.Needle(512, 0.5, 0), encode, chat=True, max_tokens=512)
    assert str(caught.value) == (
        "passkey length 512 leaves no room for filler beside 512 tokens for the answer (--max-new-tokens) "
        "and 64 for the chat template: use longer --lengths or a smaller --max-new-tokens"
    )
    args = ["eval", str(tiny_chat_model), "--task", "passkey", "--method", "generate", "--lengths", "512"]
    args += ["--depths", "0.5", "--no-progress", "--dtype", "float32"]
    assert qwenkit_main(args) == 2
    err = capsys.readouterr().err
    assert err.endswith("use longer --lengths or a smaller --max-new-tokens\n") and err.count("\n") == 1
    text, n = passkey.build(passkey.Needle(512, 0.5, 0), encode, chat=True, max_tokens=32)
    assert 512 - 32 - passkey.CHAT_RESERVE - 30 <= n == len(encode(text))
