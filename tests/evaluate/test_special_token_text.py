"""An item whose text holds special-token text (``<|endoftext|>``, ``<|im_end|>``) gets the same ids in
local and endpoint mode, and the ids lm-eval's HF backend gives it (transformers' ``tokenizer(text)``
reads added tokens as the token). The endpoint's ``/tokenize`` reads a prompt that way; local mode
encoded it as plain text, so the same item was scored on other ids in the two modes."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qwenkit.evaluate import mmlu
from qwenkit.evaluate.endpoint import EndpointBackend
from qwenkit.evaluate.multiple_choice import MCItem, score_loglik

ENDOFTEXT, IM_END = 151643, 151645

ITEMS = [
    MCItem(
        "t-0", "tokenizers", "Which token ends a document?", ("<|endoftext|>", "<|im_end|>", "EOF", "."), "A"
    ),
    MCItem(
        "t-1", "tokenizers", "What does <|im_end|> close?", ("a turn", "a file", "a tool", "nothing"), "A"
    ),
]


def test_local_and_endpoint_read_special_token_text_alike(eval_llm, local, tiny_chat_model):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer
    from transformers import AutoTokenizer

    from qwenkit.server import ServerConfig, create_app

    prompts = [mmlu.base_prompt(i, []) for i in ITEMS]
    hf = AutoTokenizer.from_pretrained(tiny_chat_model)
    lmeval_ids = [hf(p, add_special_tokens=False)["input_ids"] for p in prompts]  # lm-eval's tok_encode
    here_ids = [local.encode_prompt(p) for p in prompts]
    here = score_loglik(local, ITEMS, prompts, mmlu.LETTER_SPELLING)
    app = create_app(eval_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as server:
        remote = EndpointBackend(server.url, model="tiny", concurrency=1)
        there_ids = [remote.encode_prompt(p) for p in prompts]
        there = score_loglik(remote, ITEMS, prompts, mmlu.LETTER_SPELLING)
    assert here_ids == there_ids == lmeval_ids
    assert ENDOFTEXT in here_ids[0] and IM_END in here_ids[0] and IM_END in here_ids[1]
    assert [r["extracted"] for r in here] == [r["extracted"] for r in there]
    for a, b in zip(here, there, strict=True):
        assert list(a["scores"].values()) == pytest.approx(list(b["scores"].values()), abs=1e-4)
