"""Cache and batching invariants for MoE models through the engine: cached decoding equals recomputing,
and a request's tokens do not depend on what else is routed through the experts in the same step."""

from __future__ import annotations

import pytest
import torch
from moe_models import hf_moe_model
from test_batching import PROMPTS, run

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams


@pytest.fixture(scope="module", params=["qwen2_moe-mixed", "qwen3_moe"])
def model(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / request.param
    hf_moe_model(request.param).save_pretrained(path)
    return load_model(path, dtype="float32", progress=False)[0]


def test_moe_cached_generation_equals_recomputed(model):
    prompt = PROMPTS[1]
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    cached = run(Engine(model, max_batch_size=1, prefill_chunk=16), [prompt], [params])[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert cached == seq[len(prompt) :]


def test_moe_batched_equals_alone(model):
    # greedy for the Qwen2-MoE model, seeded sampling for the Qwen3-MoE one
    params = (
        SamplingParams(temperature=0.9, top_k=50, seed=99, max_tokens=20, ignore_eos=True)
        if model.config.family == "qwen3_moe"
        else SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    )
    alone = [run(Engine(model, max_batch_size=1), [p], [params])[0] for p in PROMPTS]
    together = run(Engine(model, max_batch_size=4, prefill_chunk=8), PROMPTS, [params] * len(PROMPTS))
    assert together == alone


def test_moe_rows_do_not_mix(model):
    """One token's MoE output is the same alone and beside others routed to other experts."""
    from qwenkit.model.moe import MoEMLP

    block = next(m for m in model.modules() if isinstance(m, MoEMLP))
    x = torch.randn(9, model.config.hidden_size, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        together = block(x[None])[0]
        for i in range(9):
            assert torch.allclose(block(x[i : i + 1][None])[0, 0], together[i], atol=1e-6, rtol=0)
