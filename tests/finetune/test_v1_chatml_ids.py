"""Qwen v1: fine-tuning encodes a conversation with the same ids inference builds for it, and both are
Qwen's own piecewise encoding (`make_context` in qwen_generation_utils.py, `preprocess` in finetune.py):
role and content encoded on their own, so a content's leading newline never merges with the header's."""

from __future__ import annotations

import base64
import shutil
import sys
import unicodedata
from pathlib import Path

import pytest
import tiktoken

sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizer"))
from tokenizer_data import QWEN_PAT, QWEN_SPECIALS, QWEN_TIKTOKEN

from qwenkit.finetune.encode import IGNORE, encode_messages
from qwenkit.tokenizer import load_tokenizer

IM_START, IM_END = QWEN_SPECIALS["<|im_start|>"], QWEN_SPECIALS["<|im_end|>"]
SYSTEM = "You are a helpful assistant."  # model.chat()'s and finetune.py's default system message
EDGES = [
    "\nHello",
    "Hello\n",
    "\n",
    "\n\n",
    " \n",
    "a\n\nb",
    " lead",
    "trail ",
    "  ",
    "你好，世界。",
    "12345",
    "<|im_end|>\n",
    "<|im_end|>",
    "",
]


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    d = tmp_path_factory.mktemp("v1")
    shutil.copy(QWEN_TIKTOKEN, d / "qwen.tiktoken")
    return load_tokenizer(d)


@pytest.fixture(scope="module")
def enc():
    """`tokenizer.encode(text, allowed_special=set())` of QWenTokenizer, built straight from the file."""
    lines = (ln.split() for ln in QWEN_TIKTOKEN.read_bytes().splitlines() if ln)
    ranks = {base64.b64decode(tok): int(rank) for tok, rank in lines}
    raw = tiktoken.Encoding("ref", pat_str=QWEN_PAT, mergeable_ranks=ranks, special_tokens=QWEN_SPECIALS)
    return lambda text: raw.encode(
        unicodedata.normalize("NFC", text), allowed_special=set(), disallowed_special=()
    )


def make_context(enc, query, history, system=SYSTEM):
    """qwen_generation_utils.make_context(chat_format="chatml"), transcribed (no truncation)."""
    nl = enc("\n")

    def tokenize_str(role, content):
        return enc(role) + nl + enc(content)

    context = [IM_START, *tokenize_str("system", system), IM_END]
    for q, r in history:
        context += [*nl, IM_START, *tokenize_str("user", q), IM_END]
        context += [*nl, IM_START, *tokenize_str("assistant", r), IM_END]
    return (
        context
        + nl
        + [IM_START, *tokenize_str("user", query), IM_END]
        + nl
        + [IM_START, *enc("assistant")]
        + nl
    )


def preprocess(enc, turns, system=SYSTEM):
    """finetune.py `preprocess` ids, each turn `role + nl + content + [im_end] + nl` (contents as text)."""
    nl = enc("\n")
    ids = [IM_START, *enc("system"), *nl, *enc(system), IM_END, *nl]
    for role, content in turns:
        ids += [IM_START, *enc(role), *nl, *enc(content), IM_END, *nl]
    return ids


def conversation(content: str, where: str) -> list[tuple[str, str]]:
    """Three exchanges; the edge content is every user turn, or every reply, or both."""
    user = content if where in ("user", "both") else "q"
    reply = content if where in ("assistant", "both") else "r"
    return [
        ("user", user),
        ("assistant", reply),
        ("user", user + "2"),
        ("assistant", reply),
        ("user", user),
        ("assistant", reply),
    ]


@pytest.mark.parametrize("where", ["user", "assistant", "both"])
@pytest.mark.parametrize("content", EDGES)
def test_finetune_ids_are_the_inference_prompt_plus_the_reply(v1, enc, content, where):
    turns = conversation(content, where)
    messages = [{"role": role, "content": text} for role, text in turns]
    ids, labels = encode_messages(v1, messages)
    assert ids == preprocess(enc, turns)

    prompt = v1.apply_chat_template(messages[:-1], add_generation_prompt=True)
    history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 2, 2)]
    assert prompt == make_context(enc, turns[-2][1], history)
    reply = turns[-1][1]
    assert ids == [*prompt, *enc(reply), IM_END, *enc("\n")]

    # Labels: each reply's content ids and its <|im_end|>, nothing else (qwenkit's documented mask).
    expected, at = [IGNORE] * len(ids), len(preprocess(enc, []))
    for role, text in turns:
        at += 1 + len(enc(role)) + 1
        body = [*enc(text), IM_END]
        if role == "assistant":
            expected[at : at + len(body)] = body
        at += len(body) + 1
    assert at == len(ids) and labels == expected


def test_a_given_system_message_replaces_the_default(v1, enc):
    messages = [
        {"role": "system", "content": "\nBe brief."},
        {"role": "user", "content": "\nHi"},
        {"role": "assistant", "content": "\nHello"},
    ]
    ids, _ = encode_messages(v1, messages)
    assert ids == preprocess(enc, [("user", "\nHi"), ("assistant", "\nHello")], system="\nBe brief.")
    assert ids[: len(v1.apply_chat_template(messages[:-1]))] == make_context(enc, "\nHi", [], "\nBe brief.")
