"""q/k/v and gate/up fused at an inference load (``quant.fused``): exactly the separate layers' outputs.

The fused layer's packed weight is the parts' tiles stacked, and each tile is computed on its own, so the
fused model must give the very same logits (bit for bit) as the same load without fusion, for every
kernel kind; layers the kernels cannot fuse keep their separate modules.
"""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf

import qwenkit.quant.fused as fused_module
from qwenkit import kernels
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.dense import PackedBf16Linear
from qwenkit.quant.fused import fuse_linears

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path_factory.mktemp("fused") / "m")


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_fused_model_equals_separate_layers(path, quantize, monkeypatch) -> None:
    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")  # both models built here, neither from the cache
    fused, _ = load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)
    monkeypatch.setattr(fused_module, "fuse_projections", lambda model, release_parts=False: 0)
    separate, _ = load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)
    for layer in fused.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        assert attn.qkv_proj is not None and mlp.gate_up_silu is not None
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
        assert attn.qkv_proj.bias is not None  # Qwen2's q/k/v biases travel with the fused weight
    assert all(layer.self_attn.qkv_proj is None for layer in separate.model.layers)
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(fused(ids), separate(ids))


def _quantized(out: int, k: int, bits: int, seed: int, bias: bool = True) -> QuantizedLinear:
    g = torch.Generator().manual_seed(seed)
    groups = k // 32
    w = AffineWeight(
        codes=torch.randint(0, 2**bits, (out, k), dtype=torch.uint8, generator=g),
        scale=torch.rand(groups, out, generator=g) * 0.01 + 0.001,
        shift=-(torch.rand(groups, out, generator=g) * 0.01),
        group_size=32,
        bits=bits,
    )
    b = torch.randn(out, generator=g).bfloat16() if bias else None
    return QuantizedLinear.from_affine(w, b, kernel=f"avx512_int{bits}")


@pytest.mark.parametrize("bits", [8, 4])
def test_fused_int_layers_match_parts_with_odd_last_part(bits) -> None:
    parts = [_quantized(48, 96, bits, 0), _quantized(16, 96, bits, 1), _quantized(21, 96, bits, 2)]
    fused = fuse_linears(parts)
    assert isinstance(fused, QuantizedLinear) and fused.out_features == 85
    x = torch.randn(3, 96, generator=torch.Generator().manual_seed(3)).bfloat16()
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    # a part short of a whole tile before another part cannot be stacked: no fusion
    assert fuse_linears([parts[2], parts[0]]) is None
    # nor parts of different widths in bits, or with and without a bias
    other = 4 if bits == 8 else 8
    assert fuse_linears([parts[0], _quantized(16, 96, other, 4)]) is None
    assert fuse_linears([parts[0], _quantized(16, 96, bits, 5, bias=False)]) is None


def test_fused_bf16_layers_match_parts() -> None:
    g = torch.Generator().manual_seed(0)
    parts = [
        PackedBf16Linear((torch.randn(n, 70, generator=g) * 0.05).bfloat16(), torch.randn(n).bfloat16())
        for n in (32, 64, 19)
    ]
    fused = fuse_linears(parts)
    x = torch.randn(5, 70, generator=g).bfloat16()
    assert torch.equal(fused(x), torch.cat([p(x) for p in parts], dim=-1))
    assert fuse_linears([parts[2], parts[0]]) is None
