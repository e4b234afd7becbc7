"""Invariant "Conversion": the tokenizer.json written from qwen.tiktoken gives tiktoken's ids."""

from __future__ import annotations

import json
import time
import unicodedata
from pathlib import Path

import pytest
from tokenizer_data import CORPUS, QWEN3_DIR, QWEN_TIKTOKEN, has_special_text

from qwenkit.tokenizer import load_tokenizer
from qwenkit.tokenizer.tiktoken_to_hf import bpe_merges, convert_tiktoken


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> tuple[Path, float]:
    out = tmp_path_factory.mktemp("converted")
    start = time.perf_counter()
    convert_tiktoken(QWEN_TIKTOKEN, out)
    return out, time.perf_counter() - start


@pytest.fixture(scope="module")
def hf_converted(converted):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(converted[0]))


def test_files_and_speed(converted):
    out, seconds = converted
    assert seconds < 30
    assert sorted(p.name for p in out.iterdir()) == [
        "merges.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    # merges and vocab are byte-identical to the official Qwen1.5+ files (151,387 merges)
    assert (out / "merges.txt").read_text() == (QWEN3_DIR / "merges.txt").read_text()
    assert json.loads((out / "vocab.json").read_text()) == json.loads((QWEN3_DIR / "vocab.json").read_text())
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer"
    assert (config["eos_token"], config["pad_token"]) == ("<|im_end|>", "<|endoftext|>")
    assert config["added_tokens_decoder"]["151850"]["content"] == "<|extra_204|>"
    pipeline = json.loads((out / "tokenizer.json").read_text())
    assert pipeline["normalizer"] == {"type": "NFC"}
    assert [p["type"] for p in pipeline["pre_tokenizer"]["pretokenizers"]] == ["Split", "ByteLevel"]
    assert pipeline["pre_tokenizer"]["pretokenizers"][0]["behavior"] == "Isolated"
    assert pipeline["decoder"]["type"] == "ByteLevel"


@pytest.mark.parametrize("text", CORPUS)
def test_transformers_ids_equal_tiktoken(hf_converted, hf_qwen3, raw_tiktoken, text):
    nfc = unicodedata.normalize("NFC", text)
    ids = hf_converted.encode(text, add_special_tokens=False)
    assert ids == raw_tiktoken.encode(nfc, allowed_special="all")
    if not has_special_text(text):
        assert ids == hf_qwen3.encode(text, add_special_tokens=False)


def test_special_tokens_keep_their_ids(hf_converted, converted):
    assert len(hf_converted) == 151851
    assert hf_converted.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [
        151643,
        151644,
        151645,
    ]
    assert hf_converted.convert_tokens_to_ids("<|extra_0|>") == 151646
    assert hf_converted.convert_tokens_to_ids("<|extra_204|>") == 151850
    ours = load_tokenizer(converted[0])
    assert ours.eos_token_ids == {151645}
    assert ours.encode("<|extra_5|>", allow_special=True) == [151651]


def test_chat_template_matches_v1(hf_converted, converted, v1):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Hello 你好"}]
    text = hf_converted.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == v1.render_chat_template(messages)
    ids = hf_converted.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert (
        ids == v1.apply_chat_template(messages) == load_tokenizer(converted[0]).apply_chat_template(messages)
    )


def test_merges_two_parts_each():
    ranks = {b"a": 0, b"b": 1, b"c": 2, b"ab": 3, b"abc": 4, b"bc": 5}
    assert bpe_merges(ranks) == [(b"a", b"b"), (b"ab", b"c"), (b"b", b"c")]
