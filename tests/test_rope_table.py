"""RoPE's cos/sin on the CPU come from a table of every position (made once, grown by doubling, then by
sixteenths): a step indexes rows instead of computing cos and sin, which torch runs on OpenMP. The rows
must be exactly what the computation gives, whatever the batch shape, for the head dims and scalings the
families use."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from factories import hf_model
from torch.utils._python_dispatch import TorchDispatchMode

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


def test_the_table_holds_one_half_of_each_row_and_stops_doubling():
    """cos/sin of a row's two halves are the same numbers: the table held both, and doubled past every
    power of two, so a 1,100,000-token context on head size 128 held 2^21 rows of 128 cos and 128 sin:
    2 GiB. One half is stored, and past 65,536 rows the table grows in sixteenths of the next power of
    two (at most 1/8 past the longest position)."""
    rotary = RotaryEmbedding(ModelConfig.from_hf(CONFIGS["Qwen2.5-0.5B shape (head dim 64)"]))
    cos, _ = rotary(torch.tensor([[0, 2999]]))
    assert rotary._table[0].shape == (4096, 2, 32)
    for held in rotary._table:  # 4096 rows of 32 float32 each, not 64
        assert held.untyped_storage().nbytes() == 4096 * 32 * 4
    assert torch.equal(cos[0, 0, 1, :32], cos[0, 0, 1, 32:]) and cos.shape == (1, 1, 2, 64)
    rows = RotaryEmbedding.table_rows
    assert [rows(n) for n in (1, 1024, 1025, 3000, 65536)] == [1024, 1024, 2048, 4096, 65536]
    assert [rows(n) for n in (65537, 131072, 1_010_000, 1_048_577, 1_100_000)] == [
        73728, 131072, 1_048_576, 1_179_648, 1_179_648,
    ]  # fmt: skip
    assert all(n <= rows(n) <= n * 9 // 8 + 1 for n in range(65537, 3_000_000, 9973))


def test_a_table_grown_in_steps_equals_one_computed_at_once(monkeypatch):
    """Past the doubling size the table is extended by its new rows only (the rows held are kept): each
    still what the computation gives, YaRN's scaled cos/sin included."""
    monkeypatch.setattr(RotaryEmbedding, "doubling_rows", 1024)
    rotary = RotaryEmbedding(ModelConfig.from_hf(CONFIGS["qwen2 yarn (cos/sin scaled)"]))
    held = []
    for last in (1000, 1024, 1025, 1500, 2100, 5000):
        rotary(torch.tensor([[last]]))
        held.append(rotary._table[0].shape[0])
    assert held == [1024, 1152, 1152, 1536, 2304, 5120]
    positions = torch.arange(5120)[None]
    want_cos, want_sin = rotary._cos_sin(positions, None, [])
    cos, sin = rotary(positions)
    assert torch.equal(cos, want_cos) and torch.equal(sin, want_sin)


class _Ops(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def test_a_decode_step_looks_its_rows_up_in_one_gather_per_table():
    """The lookup is on every step's path: the longest position, then one index each for cos and sin
    (the half table is read through a view, so no concatenation or copy), then views."""
    rotary = RotaryEmbedding(ModelConfig.from_hf(CONFIGS["Qwen2.5-0.5B shape (head dim 64)"]))
    rotary(torch.tensor([[3000]]))  # the table made beforehand, as by the prompt
    positions = torch.arange(16)[:, None] + 100  # 16 sequences decoding
    with _Ops() as seen:
        cos, sin = rotary(positions)
    assert seen.ops == Counter(
        {"aten.max.default": 1, "aten._local_scalar_dense.default": 1, "aten.index.Tensor": 2,
         "aten.view.default": 2, "aten.unsqueeze.default": 2}
    )  # fmt: skip
    assert cos.shape == sin.shape == (16, 1, 1, 64) and cos.is_contiguous() and sin.is_contiguous()
