"""Round-to-nearest: every weight within half a step; int8 outputs close to float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from qwenkit.quant import rtn
from qwenkit.quant.gptq_format import QuantizationError
from qwenkit.quant.linear import QuantizedLinear
from qwenkit.quant.rtn import default_group_size, quantize_model_rtn, quantize_weight_rtn


@pytest.mark.parametrize(
    ("bits", "gs", "sym"), [(8, -1, True), (8, 64, False), (4, 128, False), (4, 32, True), (4, 96, False)]
)
def test_error_is_at_most_half_a_step(bits: int, gs: int, sym: bool) -> None:
    torch.manual_seed(0)
    w = torch.randn(96, 256) * 0.05
    w[3, 7] = 0.9  # an outlier stretches its group's grid
    q = quantize_weight_rtn(w, bits, gs, sym)
    step = q.scales.float()[q.g_idx.long()].T  # (out, in)
    err = (w - q.dequantize()).abs()
    assert bool((err <= step / 2 + 1e-6).all())
    assert int(q.qweight.max()) <= 2**bits - 1


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 512), nn.SiLU(), nn.Linear(512, 128, bias=False))


def test_int8_close_to_float_and_int4_coarser() -> None:
    x = torch.randn(4, 7, 256)
    with torch.no_grad():
        ref = _mlp()(x)
    errs = {}
    for bits in (8, 4):
        model = quantize_model_rtn(_mlp(), bits)
        assert all(isinstance(m, QuantizedLinear) for m in (model[0], model[2]))
        errs[bits] = float((model(x) - ref).norm() / ref.norm())
    assert errs[8] < 0.02  # the activations the kernel rounds (int8 per 32 on AVX-512, else bf16) dominate
    assert errs[8] < errs[4] < 0.1


def test_skips_lm_head_and_embeddings() -> None:
    class Tiny(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(100, 64)
            self.proj = nn.Linear(64, 64)
            self.lm_head = nn.Linear(64, 100, bias=False)

    m = quantize_model_rtn(Tiny(), 4, group_size=32)
    assert isinstance(m.proj, QuantizedLinear)
    assert type(m.lm_head) is nn.Linear and type(m.embed_tokens) is nn.Embedding


@pytest.mark.parametrize(
    ("bits", "gs", "message"),
    [
        (3, 128, "bits=3 is not supported"),
        (4, 0, "group_size=0 must be"),
        (4, -2, "group_size=-2 must be"),
    ],
)
def test_bad_arguments(bits: int, gs: int, message: str) -> None:
    with pytest.raises(QuantizationError, match=message):
        quantize_weight_rtn(torch.randn(8, 256), bits, gs)


def test_runtime_groups_tile_every_layer():
    """--quantize int4 keeps 128 where it tiles a layer and else takes the largest of 64 and 32 that does
    (a short last group runs on no fast CPU kernel); int8 stays per channel; nothing tiles 144."""
    assert [default_group_size(4, k) for k in (896, 576, 1536, 160, 144)] == [128, 64, 128, 32, 128]
    assert default_group_size(8, 576) == -1


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("bits", "sym"), [(4, False), (4, True), (8, True), (8, False)])
@pytest.mark.parametrize("group", [128, 64, -1, 100])
def test_the_kernels_round_as_the_torch_arithmetic_does(monkeypatch, dtype, bits, sym, group):
    """qwenkit's C++ rounding (CPU weights, kernels built) gives the torch path's codes, scales and zeros bit
    for bit: short last groups (100 does not divide 320), all-zero, all-positive, all-negative and
    constant groups, and weights whose scales fall below float16's normal range."""
    from qwenkit.kernels import available

    if not available():
        pytest.skip("the CPU kernels are not available here")
    g = torch.Generator().manual_seed(bits * 7 + group)
    w = torch.randn(37, 320, generator=g) * 0.05
    w[0] = 0.0
    w[1, :128] = w[1, :128].abs() + 0.01
    w[2, :128] = -w[2, :128].abs()
    w[3, :128] = 0.25
    w[4] *= 1e-6
    w = w.to(dtype)
    fast = quantize_weight_rtn(w, bits, group, sym)
    monkeypatch.setattr(rtn, "kernels_available", lambda: False)
    slow = quantize_weight_rtn(w, bits, group, sym)
    assert torch.equal(fast.qweight, slow.qweight)
    assert torch.equal(fast.scales, slow.scales) and torch.equal(fast.zeros, slow.zeros)
    assert torch.equal(fast.g_idx, slow.g_idx) and fast.bits == slow.bits
    assert fast.qweight.dtype == torch.uint8 and fast.zeros.dtype == torch.int16
    assert fast.scales.is_contiguous() and fast.zeros.is_contiguous() and fast.qweight.is_contiguous()
