"""Letter scoring on a model whose tokenizer adds a BOS (Llama) reads each context from the BOS, as
lm-eval's HF models and `tokenizer(prompt)` do, locally and through `qwenkit serve` alike; the letters
themselves are spelled without one."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from qwenkit.evaluate.backends import LocalBackend
from qwenkit.evaluate.endpoint import EndpointBackend
from qwenkit.evaluate.multiple_choice import MCItem, score_loglik

LETTERS = ["A", "B", "C", "D"]  # one token each in the tiny Llama-2-layout vocabulary
PROMPTS = ["Question: the quick brown fox? Answer:", "Question: hello world? Answer:", "12345 Answer:"]
ITEMS = [MCItem(f"q{i}", "s", p, ("a", "b", "c", "d"), "A") for i, p in enumerate(PROMPTS)]


def reference_logprobs(model_dir: Path) -> list[list[float]]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    letter_ids = [tok(s, add_special_tokens=False)["input_ids"][0] for s in LETTERS]
    out = []
    for prompt in PROMPTS:
        ids = tok(prompt)["input_ids"]
        assert ids[0] == tok.bos_token_id
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1]
        out.append(torch.log_softmax(logits, -1)[letter_ids].tolist())
    return out


def scores(rows: list[dict]) -> list[list[float]]:
    return [[r["scores"][k] for k in LETTERS] for r in rows]


def test_contexts_start_at_the_bos_locally_and_on_an_endpoint(llama_llm, llama_dir):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer

    from qwenkit.server import ServerConfig, create_app

    local = LocalBackend(llama_llm, batch_size=4)
    expected = reference_logprobs(llama_dir)
    here = score_loglik(local, ITEMS, PROMPTS, LETTERS)
    for got, want in zip(scores(here), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
    app = create_app(llama_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as server:
        endpoint = EndpointBackend(server.url)
        for prompt in PROMPTS:
            assert endpoint.encode_prompt(prompt) == local.encode_prompt(prompt) == [1, *local.encode(prompt)]
            assert endpoint.encode(prompt) == local.encode(prompt)
        there = score_loglik(endpoint, ITEMS, PROMPTS, LETTERS)
    for got, want in zip(scores(there), expected, strict=True):
        assert got == pytest.approx(want, abs=1e-4)
