"""`encode_prompt`: a raw-text prompt gets the tokens transformers' `tokenizer(text)` adds (Llama's BOS,
from tokenizer.json's post_processor); Qwen's tokenizers add none; a rendered chat gets no second BOS."""

from __future__ import annotations

import json

import pytest
import transformers
from llama_tokenizers import TEXTS, write_llama2_tokenizer, write_llama3_tokenizer
from tokenizer_data import CORPUS, QWEN_TIKTOKEN

from qwenkit.tokenizer import load_tokenizer

CHAT = [{"role": "user", "content": "Hello world"}]


@pytest.fixture(scope="module")
def llama2_dir(tmp_path_factory):
    return write_llama2_tokenizer(tmp_path_factory.mktemp("llama2"))


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory):
    return write_llama3_tokenizer(tmp_path_factory.mktemp("llama3"))


def chat_ids(reference, messages) -> list[int]:
    out = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


@pytest.mark.parametrize(("layout", "bos"), [("llama2_dir", 1), ("llama3_dir", 151669)])
def test_raw_prompts_get_the_bos_transformers_adds(request, layout, bos):
    path = request.getfixturevalue(layout)
    ours, reference = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.sequence_special_ids == ((bos,), ())
    for text in [*TEXTS, ""]:
        assert ours.encode_prompt(text) == reference(text)["input_ids"], text
        assert ours.encode_prompt(text) == [bos, *ours.encode(text)]  # encode itself adds nothing
    # special-token text in a prompt stays plain text; only the real BOS id is added
    assert ours.encode_prompt("<s>x") == [bos, *ours.encode("<s>x")]


@pytest.mark.parametrize("layout", ["llama2_dir", "llama3_dir"])
def test_a_rendered_chat_gets_one_bos(request, layout):
    path = request.getfixturevalue(layout)
    ours, reference = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    bos = ours.sequence_special_ids[0][0]
    ids = ours.apply_chat_template(CHAT)
    assert ids == chat_ids(reference, CHAT)
    assert ids[0] == bos and ids.count(bos) == 1  # the template's own, not a second from the tokenizer


def test_add_bos_token_without_a_post_processor_adds_none_as_transformers(tmp_path):
    """transformers 5 drops tokenizer_config.json's add_bos_token wherever a tokenizer.json exists: the
    post_processor alone decides, so a tokenizer.json with none adds nothing even when the config asks."""
    path = write_llama2_tokenizer(tmp_path, post_processor=False)
    ours, reference = load_tokenizer(path), transformers.AutoTokenizer.from_pretrained(str(path))
    assert ours.sequence_special_ids == ((), ())
    for text in TEXTS:
        assert ours.encode_prompt(text) == reference(text)["input_ids"] == ours.encode(text)


@pytest.mark.parametrize("text", [t for t in CORPUS if "<|" not in t and "<think>" not in t])
def test_qwen3_prompts_are_unchanged(qwen3, hf_qwen3, text):
    assert qwen3.sequence_special_ids == ((), ())
    assert qwen3.encode_prompt(text) == qwen3.encode(text) == hf_qwen3(text)["input_ids"]


def test_qwen_v1_and_its_qwen2_layout_prompts_are_unchanged(v1, tmp_path):
    """Qwen v1's tiktoken tokenizer adds nothing; nor does its conversion to the Qwen2 tokenizer.json
    layout (ByteLevel post_processor, as Qwen2's and Qwen3's), as transformers reads it."""
    from qwenkit.tokenizer.tiktoken_to_hf import convert_tiktoken

    assert v1.sequence_special_ids == ((), ())
    convert_tiktoken(QWEN_TIKTOKEN, tmp_path)
    converted = load_tokenizer(tmp_path)
    reference = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in TEXTS:
        assert v1.encode_prompt(text) == v1.encode(text) == converted.encode_prompt(text)
        assert converted.encode_prompt(text) == reference(text)["input_ids"]


def test_tokenize_shows_what_the_model_reads(capsys, llama2_dir):
    """`qwenkit tokenize` shows a raw prompt's ids with the BOS, as transformers' `tokenizer(text)` and
    vLLM's /tokenize; --no-bos shows the text's own."""
    from qwenkit.cli import tokenize

    ids = load_tokenizer(llama2_dir).encode("Hello world")
    assert tokenize.main([str(llama2_dir), "Hello world", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [1, *ids]
    assert tokenize.main([str(llama2_dir), "Hello world", "--json", "--no-bos"]) == 0
    assert json.loads(capsys.readouterr().out) == ids
