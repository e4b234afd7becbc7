"""Packed kernels compute what dequantize-then-matmul computes, for every kernel, shape and act-order."""

from __future__ import annotations

import pytest
import torch

from qwenkit.quant.gptq_format import IntWeight, QuantizationError
from qwenkit.quant.linear import PREFILL_ROWS, QuantizedLinear, choose_kernel


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


CASES = [
    # bits, out, in, group, sym, act_order, expected CPU kernel
    (8, 192, 256, 256, True, False, "cpu_int8pack"),
    (8, 128, 320, 320, False, True, "cpu_int8pack"),
    (8, 192, 256, 64, True, False, "cpu_int8_as_int4x2"),
    (8, 128, 256, 128, False, True, "cpu_int8_as_int4x2"),
    (4, 192, 256, 128, True, False, "cpu_int4pack"),
    (4, 128, 512, 32, False, True, "cpu_int4pack"),
    (4, 256, 384, 384, False, False, "cpu_int4pack"),  # per channel: 128-wide kernel groups, scales repeated
    (4, 40, 256, 64, False, True, "dequant"),  # out not a multiple of 64
    (4, 64, 96, 48, True, False, "dequant"),  # no aten group size tiles 48
]


@pytest.mark.parametrize(("bits", "out_f", "in_f", "gs", "sym", "act_order", "kernel"), CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernel_matches_dequantized_matmul(bits, out_f, in_f, gs, sym, act_order, kernel, dtype) -> None:
    w = _int_weight(bits, out_f, in_f, gs, sym, act_order)
    bias = torch.randn(out_f) * 0.1
    layer = QuantizedLinear.from_int(w, bias)
    assert layer._kernel == kernel
    assert isinstance(layer.kernel, str) and layer.kernel
    assert (layer.perm is not None) == (act_order and gs < in_f)  # one group needs no permutation
    ref_w = w.dequantize()
    for rows in (
        1,
        3,
        max(PREFILL_ROWS.values()) + 5,
    ):  # decode through the kernel, prefill through dequantize
        x = torch.randn(2, rows, in_f).to(dtype)
        y = layer(x)
        ref = x.float() @ ref_w.T + bias
        assert y.dtype == dtype and y.shape == (2, rows, out_f)
        err = (y.float() - ref).abs().max() / ref.abs().max()
        assert err < 2e-2, (rows, float(err))  # bf16 activations/scales: ~3 significant digits
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
    assert choose_kernel(8, 896, 896, 4864, cpu) == "cpu_int8pack"
    assert choose_kernel(4, 128, 4864, 896, cpu) == "cpu_int4pack"
    assert choose_kernel(8, 128, 896, 4864, cpu) == "cpu_int8_as_int4x2"
    assert choose_kernel(4, 128, 896, 100, cpu) == "dequant"
    assert choose_kernel(8, 128, 896, 896, torch.device("meta")) == "dequant"


def test_wrong_kernel_for_bits_is_rejected() -> None:
    w = _int_weight(8, 64, 128, 128, True, False)
    with pytest.raises(QuantizationError, match="runs 4-bit weights, not 8-bit"):
        QuantizedLinear.from_int(w, kernel="cpu_int4pack")


def test_unequal_act_order_groups_rejected() -> None:
    w = _int_weight(4, 64, 128, 32, True, False)
    w.g_idx[:40] = 0  # group 0 now has 40 columns
    with pytest.raises(QuantizationError, match="unequal sizes"):
        QuantizedLinear.from_int(w)
