"""The tools tests' steered model (scripted.py): a real tiny chat model whose next replies a test queues
(``agent_helpers.queue``), as the tool decisions a trained Qwen would make."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from scripted import ScriptedModel, steer_next_request

from qwenkit.generate import LLM


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    return llm, steer_next_request(llm, model)
