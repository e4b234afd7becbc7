"""Parity: qwenkit's model on the real SmolLM2 GGUF equals transformers loading the same file."""

from __future__ import annotations

import torch

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams


def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm_path, hf_smollm, hf_smollm_tokenizer):
    # transformers dequantizes the file to float32; so does --gguf-dequantize (the in-precision path is
    # checked against this one in test_gguf_in_precision.py)
    model, config = load_model(smollm_path, dtype="float32", progress=False, dequantize=True)
    assert config.family == "llama" and config.tie_word_embeddings
    prompt = hf_smollm_tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=False,
    )
    ids = torch.tensor([prompt])
    with torch.no_grad():
        ours, ref = model(ids), hf_smollm(ids).logits
    assert (ours - ref).abs().max().item() < 1e-4

    engine = Engine(model, max_batch_size=1)
    engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.new_token_ids
    expected = hf_smollm.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None, pad_token_id=2)
    assert tokens == expected[0, len(prompt) :].tolist()
    assert "Paris" in hf_smollm_tokenizer.decode(tokens)
