"""The converted directory's tokenizer: transformers loads it natively (no trust_remote_code) and gives
exactly tiktoken's ids on the real qwen.tiktoken, and the Qwen3 tokenizer.json's ids on plain text."""

from __future__ import annotations

import base64
import json
import unicodedata

import pytest
import tiktoken
import transformers
from v1_sources import QWEN3_DIR, QWEN_TIKTOKEN

# Written out here from qwen_facts §6.2 so the reference does not reuse the converter's constant.
PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SPECIALS = {
    t: 151643 + i
    for i, t in enumerate(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{n}|>" for n in range(205))]
    )
}
CORPUS = [
    "Hello world",
    " The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, THEY'RE done!",
    "12345 3.14159 -42 1,000,000 0x1F",
    "你好，世界！通义千问是阿里云研发的大语言模型。",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))\r\n",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇨🇳 mixed 中文😀text",
    "   leading and trailing spaces   \n\n\n",
    "e\u0301 cafe\u0301 Å, Ελληνικά, русский, العربية, हिन्दी, 日本語, 한국어",
    "a" * 200 + " " + "z" * 3,
]
WITH_SPECIALS = ["<|im_start|>user\nhi<|im_end|>\n", "text<|endoftext|>more <|extra_7|>"]


@pytest.fixture(scope="module")
def reference() -> tiktoken.Encoding:
    lines = (ln.split() for ln in QWEN_TIKTOKEN.read_bytes().splitlines() if ln)
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
    return tiktoken.Encoding("qwen-ref", pat_str=PAT, mergeable_ranks=ranks, special_tokens=SPECIALS)


@pytest.fixture(scope="module")
def converted_tokenizer(converted):
    return transformers.AutoTokenizer.from_pretrained(str(converted.out))


def test_converted_tokenizer_equals_tiktoken(converted_tokenizer, reference):
    for text in CORPUS:
        # QWenTokenizer.tokenize NFC-normalizes before tiktoken; tokenizer.json does it with a normalizer.
        nfc = unicodedata.normalize("NFC", text)
        assert converted_tokenizer.encode(text, add_special_tokens=False) == reference.encode(nfc), text
        assert converted_tokenizer.decode(reference.encode(nfc)) == nfc
    for text in WITH_SPECIALS:
        assert converted_tokenizer.encode(text, add_special_tokens=False) == reference.encode(
            text, allowed_special="all"
        )


def test_converted_tokenizer_equals_qwen3_tokenizer_json(converted_tokenizer):
    qwen3 = transformers.AutoTokenizer.from_pretrained(str(QWEN3_DIR))
    for text in CORPUS:
        assert converted_tokenizer.encode(text, add_special_tokens=False) == qwen3.encode(
            text, add_special_tokens=False
        )


def test_converted_tokenizer_config_is_chatml(converted, converted_tokenizer):
    cfg = json.loads((converted.out / "tokenizer_config.json").read_text())
    assert cfg["eos_token"] == "<|im_end|>"  # a chat model
    assert converted_tokenizer.eos_token_id == 151645 and converted_tokenizer.pad_token_id == 151643
    text = converted_tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert text.startswith("<|im_start|>system\n")
