"""Round-to-nearest: every weight within half a step; int8 outputs close to float."""

from __future__ import annotations

import pytest
import torch
from torch import nn

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
