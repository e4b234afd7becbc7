"""q/k/v and gate/up fused at an inference load where qwenkit's CPU kernels do not run the layers: CUDA,
and the plain PyTorch path on the CPU (``QWENKIT_KERNELS=torch``, another CPU, no compiler).

There the parts are plain ``nn.Linear`` layers and the fused one stacks their weights, so every output
is the same dot product, summed perhaps in another order: the fused model must give the separate
layers' logits within float32 rounding and the same greedy tokens, for each family's attention
(Qwen2's q/k/v biases, Qwen3's q/k norms, Qwen v1's LogN and float32 RoPE) and a MoE's experts.
"""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, run_engine, save_hf, write_v1_checkpoint
from torch import nn

import qwenkit.quant.fused as fused_module
from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams
from qwenkit.model.mlp import MLP
from qwenkit.quant.fused import GateUpSilu, fuse_linears


@pytest.fixture
def plain_path(monkeypatch) -> None:
    monkeypatch.setenv(kernels.ENV_SWITCH, "torch")
    assert not kernels.available()


def _linear(n_in: int, n_out: int, seed: int, bias: bool = True, dtype=torch.float32) -> nn.Linear:
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias).to(dtype)
    return layer.requires_grad_(False)


def test_plain_linears_stack_into_one_linear() -> None:
    parts = [_linear(70, 48, 0), _linear(70, 16, 1), _linear(70, 21, 2)]
    fused = fuse_linears(parts)
    assert type(fused) is nn.Linear and fused.in_features == 70 and fused.out_features == 85
    assert torch.equal(fused.weight, torch.cat([p.weight for p in parts]))
    assert torch.equal(fused.bias, torch.cat([p.bias for p in parts]))
    assert not fused.weight.requires_grad
    x = torch.randn(3, 5, 70, generator=torch.Generator().manual_seed(3))
    want = torch.cat([p(x) for p in parts], dim=-1)
    torch.testing.assert_close(fused(x), want, rtol=1e-6, atol=1e-6)
    # unlike parts stay apart: another dtype, another input width, biases on some only
    assert fuse_linears([parts[0], _linear(70, 16, 4, dtype=torch.bfloat16)]) is None
    assert fuse_linears([parts[0], _linear(71, 16, 5)]) is None
    assert fuse_linears([parts[0], _linear(70, 16, 6, bias=False)]) is None
    assert type(fuse_linears([_linear(70, 8, 7, bias=False), _linear(70, 8, 8, bias=False)])) is nn.Linear


def test_gate_up_silu_without_kernels_is_the_mlp(plain_path) -> None:
    gate, up = _linear(64, 40, 0, dtype=torch.bfloat16), _linear(64, 40, 1, dtype=torch.bfloat16)
    x = torch.randn(2, 64).bfloat16()
    got = GateUpSilu(fuse_linears([gate, up]))(x)
    want = torch.nn.functional.silu(gate(x)) * up(x)
    torch.testing.assert_close(got, want, rtol=1.6e-2, atol=1e-2)  # bf16: the products' own rounding


def _checkpoint(family: str, tmp_path):
    if family == "qwen":
        return write_v1_checkpoint(tmp_path / "v1")
    if family == "qwen2_moe":
        from moe.moe_models import hf_moe_model

        return save_hf(hf_moe_model("qwen2_moe-mixed"), tmp_path / family)
    return save_hf(hf_model(family, tie_word_embeddings=family == "qwen2"), tmp_path / family)


@pytest.mark.parametrize("kernels_on", [False, True], ids=["plain", "kernels"])
@pytest.mark.parametrize("family", ["qwen2", "qwen3", "qwen", "qwen2_moe"])
def test_float_load_fuses_and_matches_separate_layers(family, kernels_on, tmp_path, monkeypatch) -> None:
    """float32 layers stay plain ``nn.Linear`` layers on the CPU kernels' path too (only bf16 is
    repacked), so they stack there as well."""
    if kernels_on and not kernels.available():
        pytest.skip("CPU kernels not built on this CPU")
    if not kernels_on:
        monkeypatch.setenv(kernels.ENV_SWITCH, "torch")
    path = _checkpoint(family, tmp_path)
    fused, _ = load_model(path, dtype="float32", progress=False, fast_kernels=True)
    monkeypatch.setattr(fused_module, "fuse_projections", lambda model, release_parts=False: 0)
    separate, _ = load_model(path, dtype="float32", progress=False, fast_kernels=True)
    for layer in fused.model.layers:
        attn = layer.self_attn
        assert type(attn.qkv_proj) is nn.Linear and attn.qkv_proj.fused_from == ("q_proj", "k_proj", "v_proj")
        assert not any(hasattr(attn, n) for n in ("q_proj", "k_proj", "v_proj"))
        assert (attn.qkv_proj.bias is not None) == (family != "qwen3")  # Qwen2 and v1 have q/k/v biases
    # every dense FFN, routed expert and shared expert (a MoE's)
    mlps = [m for m in fused.modules() if type(m) is MLP]
    assert len(mlps) == {"qwen2_moe": 2 + 2 * (8 + 1)}.get(family, 2)  # layers 0, 2 dense; 1, 3 sparse
    for mlp in mlps:
        assert type(mlp.gate_up_silu.linear) is nn.Linear
        assert not any(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
    assert all(layer.self_attn.qkv_proj is None for layer in separate.model.layers)
    # a prompt past v1's trained length (32), where its LogN scaling and dynamic NTK act
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), separate(ids), rtol=1e-5, atol=1e-5)
    prompts = [ids[0, :7].tolist(), ids[1, :12].tolist()]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    tokens = [
        run_engine(Engine(model, max_batch_size=2, max_seq_len=64), prompts, params)
        for model in (fused, separate)
    ]
    assert tokens[0] == tokens[1]


def test_plain_path_bf16_load_fuses_without_counting_the_parts_twice(tmp_path, plain_path) -> None:
    """The bf16 checkpoint is memory-mapped; the parts' pages are dropped once stacked, and what remains
    (the stacked copies, the file's other tensors) still computes the model's logits."""
    path = save_hf(hf_model("qwen2").to(torch.bfloat16), tmp_path / "bf16")
    model, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    reference, _ = load_model(path, dtype="bfloat16", progress=False)  # separate layers, not fused
    assert all(type(layer.self_attn.qkv_proj) is nn.Linear for layer in model.model.layers)
    ids = torch.randint(0, 512, (1, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got, want = model(ids).float(), reference(ids).float()
    assert got.abs().max() > 0.1  # not zeros read back from released pages
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)  # bf16 products in another order
