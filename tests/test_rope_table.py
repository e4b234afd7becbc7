"""RoPE's cos/sin on the CPU come from a table of every position (made once, grown by doubling): a step
indexes rows instead of computing cos and sin, which torch runs on OpenMP. The rows must be exactly what
the computation gives, whatever the batch shape, for the head dims and scalings the families use."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model

from qwenkit.config import ModelConfig
from qwenkit.model.rope import RotaryEmbedding

CONFIGS = {
    "qwen2 (head dim 16)": hf_model("qwen2").config.to_dict(),
    "qwen3 (head dim 32)": hf_model("qwen3").config.to_dict(),
    "qwen2 yarn (cos/sin scaled)": hf_model(
        "qwen2", rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ).config.to_dict(),
    "Qwen2.5-0.5B shape (head dim 64)": {
        **hf_model("qwen2").config.to_dict(),
        "hidden_size": 896,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "rope_theta": 1000000.0,
    },
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_rope_table_equals_computed(name):
    rotary = RotaryEmbedding(ModelConfig.from_hf(CONFIGS[name]))
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (1, 3), (1, 16), (2, 7), (1, 333), (4, 100)]:
        positions = torch.randint(0, 3000, shape, generator=g)
        cos, sin = rotary(positions)  # the table (made, then grown past 2,048)
        want_cos, want_sin = rotary._cos_sin(positions, None, [])
        assert cos.shape == want_cos.shape == (shape[0], 1, shape[1], want_cos.shape[-1])
        assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin), (name, shape)
    assert rotary._table[0].shape[0] == 4096  # a power of two past the largest position seen


def test_ntk_rows_are_computed_not_looked_up():
    """Qwen v1's dynamic NTK changes the frequencies per row: those rows are computed."""
    cfg = ModelConfig.from_hf({**CONFIGS["qwen2 (head dim 16)"], "rope_theta": 10000.0})
    rotary = RotaryEmbedding(cfg)
    positions = torch.tensor([[5, 6, 7], [5, 6, 7]])
    cos, _ = rotary(positions, [1.0, 2.5])
    want, _ = rotary._cos_sin(positions, torch.tensor([[1.0] * 3, [2.5] * 3]), [2.5])
    assert torch.equal(cos, want) and not torch.equal(cos[0], cos[1])
