"""Packed kernels compute what dequantize-then-matmul computes, for every kernel, shape and act-order."""

from __future__ import annotations

import pytest
import torch

from qwenkit import kernels
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.gptq_format import IntWeight, QuantizationError
from qwenkit.quant.kernels import KERNELS, choose_kernel
from qwenkit.quant.linear import QuantizedLinear

MAX_ROWS = max(c.max_rows or 0 for c in KERNELS)


def _int_weight(
    bits: int, out_f: int, in_f: int, gs: int, sym: bool, act_order: bool, seed: int = 0
) -> IntWeight:
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = in_f // gs
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=g, dtype=torch.uint8)
    zeros = (
        torch.full((n_groups, out_f), (maxq + 1) // 2)
        if sym
        else torch.randint(0, maxq + 1, (n_groups, out_f))
    )
    scales = (torch.rand(n_groups, out_f, generator=g) * 0.01 + 0.002).half().float()
    g_idx = torch.arange(in_f) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return IntWeight(q, scales, zeros.to(torch.int16), g_idx.to(torch.int32), bits)


FAST = kernels.available()  # qwenkit's AVX-512 kernels (built at set-up on this CPU)
AVX = pytest.mark.skipif(not FAST, reason="qwenkit's AVX-512 kernels are not built on this CPU")

CASES = [
    # bits, out, in, group, sym, act_order, kernel (forced, so every kernel is tested on this CPU)
    (8, 192, 256, 256, True, False, "cpu_int8pack"),
    (8, 128, 320, 320, False, True, "cpu_int8pack"),
    (8, 192, 256, 64, True, False, "cpu_int8_as_int4x2"),
    (8, 128, 256, 128, False, True, "cpu_int8_as_int4x2"),
    (4, 192, 256, 128, True, False, "cpu_int4pack"),
    (4, 128, 512, 32, False, True, "cpu_int4pack"),
    (4, 256, 384, 384, False, False, "cpu_int4pack"),  # per channel: 128-wide kernel groups, scales repeated
    (4, 40, 256, 64, False, True, "dequant"),  # out not a multiple of 64
    (4, 64, 96, 48, True, False, "dequant"),  # no aten group size tiles 48
    pytest.param(8, 192, 256, 256, True, False, "avx512_int8", marks=AVX),
    pytest.param(8, 131, 320, 64, False, True, "avx512_int8", marks=AVX),  # odd rows, act-order
    pytest.param(4, 192, 256, 128, True, False, "avx512_int4", marks=AVX),
    pytest.param(4, 100, 512, 32, False, True, "avx512_int4", marks=AVX),
    pytest.param(4, 256, 384, 384, False, False, "avx512_int4", marks=AVX),  # one group per row
]


@pytest.mark.parametrize(("bits", "out_f", "in_f", "gs", "sym", "act_order", "kernel"), CASES)
# float16 is --dtype float16 on the CPU: qwenkit's own kernels take only bfloat16 and float32 activations
# and failed mid-step ("x must be bfloat16 or float32, got Half"); they now run it in float32.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_kernel_matches_dequantized_matmul(bits, out_f, in_f, gs, sym, act_order, kernel, dtype) -> None:
    w = _int_weight(bits, out_f, in_f, gs, sym, act_order)
    bias = torch.randn(out_f) * 0.1
    layer = QuantizedLinear.from_int(w, bias, kernel=kernel)
    assert layer.impl.key == kernel
    assert isinstance(layer.kernel, str) and layer.kernel
    assert (layer.perm is not None) == (act_order and gs < in_f)  # one group needs no permutation
    ref_w = w.dequantize()
    for rows in (
        1,
        3,
        MAX_ROWS + 5,
    ):  # decode through the kernel, prefill through dequantize
        x = torch.randn(2, rows, in_f).to(dtype)
        y = layer(x)
        ref = x.float() @ ref_w.T + bias
        assert y.dtype == dtype and y.shape == (2, rows, out_f)
        err = (y.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, (rows, float(err))  # bf16 activations/scales: ~3 significant digits
    # the kernel's own weight is the exact one up to its bfloat16 scales and shifts (about a step at most)
    packed = layer.dequantize_packed(torch.float32)
    kernel_w = packed if layer.perm is None else torch.empty_like(packed).index_copy_(1, layer.perm, packed)
    step = w.scales.float()[w.g_idx.long()].T  # (out, in) quantization step of each weight
    assert float(((kernel_w - ref_w).abs() / step).max()) < 1.5  # int8 as 2 x int4: bf16 16s and shift
    # the codes survive packing exactly, in the original column order
    back = layer.to_int()
    assert torch.equal(back.qweight, w.qweight)
    assert torch.equal(back.g_idx.long(), w.g_idx.long())
    assert torch.equal(back.dequantize(), ref_w)


def test_forced_dequant_kernel_is_exact() -> None:
    w = _int_weight(4, 128, 256, 64, False, True)
    layer = QuantizedLinear.from_int(w, kernel="dequant")
    x = torch.randn(3, 256)
    torch.testing.assert_close(layer(x), x @ w.dequantize().T, rtol=1e-5, atol=1e-5)
    assert "fallback" in layer.kernel


def test_kernel_choice_by_device() -> None:
    cpu = torch.device("cpu")
    assert choose_kernel(8, 896, 896, 4864, cpu) == ("avx512_int8" if FAST else "cpu_int8pack")
    assert choose_kernel(4, 128, 4864, 896, cpu) == ("avx512_int4" if FAST else "cpu_int4pack")
    assert choose_kernel(8, 128, 896, 4864, cpu) == ("avx512_int8" if FAST else "cpu_int8_as_int4x2")
    assert choose_kernel(4, 128, 896, 100, cpu) == ("avx512_int4" if FAST else "dequant")
    assert choose_kernel(4, 48, 96, 64, cpu) == "dequant"  # no kernel tiles groups of 48
    assert choose_kernel(8, 128, 896, 896, torch.device("meta")) == "dequant"


@pytest.mark.parametrize("in_f", [72, 100, 136])
def test_int8_rows_torch_reads_past_are_not_given_to_its_kernel(in_f: int) -> None:
    """torch's ``_weight_int8pack_mm`` reads past a row whose width is not a multiple of 16: the process
    died with SIGSEGV on the first forward (``--quantize int8`` of a model 72 wide, or the int8 output
    head under ``--quantize int4``). Such layers now take another kernel and compute the same product."""
    assert choose_kernel(8, in_f, in_f, 64, torch.device("cpu")) != "cpu_int8pack"
    w = _int_weight(8, 64, in_f, in_f, False, False)
    layer = QuantizedLinear.from_int(w, torch.zeros(64))
    x = torch.randn(3, in_f)
    ref = x @ w.dequantize().T
    assert float((layer(x) - ref).abs().max() / ref.abs().max()) < 2e-2


def test_wrong_kernel_for_bits_is_rejected() -> None:
    w = _int_weight(8, 64, 128, 128, True, False)
    with pytest.raises(QuantizationError, match="runs 4-bit weights, not 8-bit"):
        QuantizedLinear.from_int(w, kernel="cpu_int4pack")


def test_unequal_act_order_groups_rejected() -> None:
    w = _int_weight(4, 64, 128, 32, True, False)
    w.g_idx[:40] = 0  # group 0 now has 40 columns
    with pytest.raises(QuantizationError, match="unequal sizes"):
        QuantizedLinear.from_int(w)


@pytest.mark.parametrize(
    ("bits", "kernel"),
    [
        (4, "cpu_int4pack"),
        (8, "cpu_int8_as_int4x2"),
        (4, "dequant"),
        (8, "dequant"),
        pytest.param(4, "avx512_int4", marks=AVX),
        pytest.param(8, "avx512_int8", marks=AVX),
    ],
)
def test_affine_weights_with_float_minimums(bits: int, kernel: str) -> None:
    """GGUF-style blocks of 32 with a float minimum (Q4_1): no GPTQ zero point expresses them."""
    g = torch.Generator().manual_seed(1)
    out_f, in_f, gs = 128, 192, 32
    codes = torch.randint(0, 2**bits, (out_f, in_f), generator=g, dtype=torch.uint8)
    scale = torch.rand(in_f // gs, out_f, generator=g) * 0.01 + 0.001
    shift = torch.randn(in_f // gs, out_f, generator=g) * 0.05
    w = AffineWeight(codes, scale, shift, gs, bits)
    layer = QuantizedLinear.from_affine(w, kernel=kernel)
    assert layer.impl.key == kernel
    x = torch.randn(3, in_f, generator=g)  # its own draw: the int8 activations make the error vary
    ref = x @ w.dequantize().T
    err = (layer(x) - ref).abs().max() / ref.abs().max()
    assert err < (1e-5 if kernel == "dequant" else 1e-2), float(err)
    assert torch.equal(layer.codes(), codes)
    step = scale.repeat_interleave(gs, 0).T
    assert float(((layer.dequantize_packed(torch.float32) - w.dequantize()).abs() / step).max()) < 1.5
    with pytest.raises(QuantizationError, match="cannot be written as a GPTQ checkpoint"):
        layer.to_int()


def test_affine_weight_shape_checked() -> None:
    with pytest.raises(QuantizationError, match="affine shift has shape"):
        AffineWeight(torch.zeros(4, 64, dtype=torch.uint8), torch.ones(2, 4), torch.ones(1, 4), 32, 4)
