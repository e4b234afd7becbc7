"""The CUDA int8 kernel (``quant/kernels/triton_affine.py``) run on the CPU through Triton's interpreter.

The interpreter runs the kernel's own indexing, masks, group lookups and rounding with NumPy, so every
output is checked against the weight ``affine_dequantize`` gives. Two interpreter limits shape the checks:
its bfloat16 tile products are wrong (the kernel multiplies float32 copies of the same bfloat16 values
there) and its float32 -> bfloat16 casts truncate where a GPU rounds to nearest, so bfloat16 is held to
the truncation's error and float16, whose casts NumPy rounds, to float16's own rounding. The GPU run
(benchmarks/bench_cuda_quant.py) checks the tensor-core path against the dequantized weight.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.fused import fuse_linears
from qwenkit.quant.kernels import KERNELS, CudaTritonInt8Kernel, DequantKernel, WeightSpec, triton_affine
from qwenkit.quant.kernels.triton_affine import affine_int8_matmul, block_k
from qwenkit.quant.linear import QuantizedLinear

pytest.importorskip("triton")  # in the test extra
# tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU; on a GPU these CPU tensors do not apply
pytestmark = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="runs on Triton's CPU interpreter (no GPU)"
)


def affine_weight(n: int, k: int, group: int, seed: int) -> AffineWeight:
    g = torch.Generator().manual_seed(seed)
    groups = -(-k // group)
    codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    scale = torch.rand(groups, n, generator=g) * 0.01 + 0.001
    shift = -128 * scale + torch.randn(groups, n, generator=g) * 0.01
    return AffineWeight(codes, scale, shift, group, 8)


def reference(x: torch.Tensor, w: AffineWeight) -> torch.Tensor:
    """x times the weight rounded to x's dtype, summed in float64."""
    return F.linear(x.double(), w.dequantize(x.dtype).double())


# (rows, outputs, inputs, group): one row and a batch bucket's 16, rows and outputs off the 16-tiles,
# per-channel (group = inputs) and GPTQ/GGUF-like groups of 128, 64 and 32, two row blocks (20 rows)
SHAPES = [(1, 48, 256, 256), (3, 40, 512, 128), (16, 32, 96, 32), (5, 24, 64, 64), (20, 16, 128, 128)]


@pytest.mark.parametrize("m, n, k, group", SHAPES)
def test_float16_matches_the_dequantized_weight(m, n, k, group):
    w = affine_weight(n, k, group, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(torch.float16)
    y = affine_int8_matmul(x, w.codes, w.scale, w.shift, group)
    ref = reference(x, w)
    assert y.dtype == torch.float16 and y.shape == (m, n)
    # float16 output rounding (2^-11 relative) and float32 accumulation
    torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))


@pytest.mark.parametrize("m, n, k, group", SHAPES[:3])
def test_bfloat16_within_the_interpreters_truncation(m, n, k, group):
    w = affine_weight(n, k, group, seed=7)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    y = affine_int8_matmul(x, w.codes, w.scale, w.shift, group)
    ref = reference(x, w)
    relative = float((y.double() - ref).norm() / ref.norm())
    # truncated casts of the weight (one bfloat16 step at most) and of the output: about 1e-2; a wrong
    # group's scale or a shifted row would be of order 1
    assert relative < 2e-2, relative


@pytest.mark.parametrize("split_k", [2, 4])
def test_split_inputs_sum_to_the_same_product(split_k):
    """K split over programs (float32 partial outputs added after): the same product within float16's
    rounding, for groups that straddle the split and groups inside it; the same bits on every run."""
    for group in (64, 512):
        w = affine_weight(40, 1024, group, seed=group)
        x = torch.randn(3, 1024, generator=torch.Generator().manual_seed(8)).to(torch.float16)
        y = affine_int8_matmul(x, w.codes, w.scale, w.shift, group, split_k=split_k)
        ref = reference(x, w)
        torch.testing.assert_close(y.double(), ref, rtol=1e-3, atol=1e-3 * float(ref.abs().max()))
        again = affine_int8_matmul(x, w.codes, w.scale, w.shift, group, split_k=split_k)
        assert torch.equal(y, again)
    with pytest.raises(ValueError, match="do not split into 3 equal slices"):
        affine_int8_matmul(x, w.codes, w.scale, w.shift, 512, split_k=3)  # 4 tiles of 256


def test_tiles_follow_the_layer_width():
    """Narrow layers: many 16-output programs; the 7B gate/up and the 152k head: wider ones."""
    assert triton_affine.tiles(3584) == (16, 2)
    assert triton_affine.tiles(37888) == (32, 4)
    assert triton_affine.tiles(152064) == (64, 4)
    w = affine_weight(80, 128, 128, seed=2)  # several programs of 16 outputs, the last partly masked
    x = torch.randn(2, 128, generator=torch.Generator().manual_seed(5)).to(torch.float16)
    wide = affine_int8_matmul(x, w.codes, w.scale, w.shift, 128, block_n=64, num_warps=4)
    narrow = affine_int8_matmul(x, w.codes, w.scale, w.shift, 128)
    torch.testing.assert_close(wide, narrow, rtol=1e-3, atol=1e-3)


def test_a_scale_in_the_wrong_group_is_caught():
    """The check above can fail: the same codes with the two groups' scales swapped are far off."""
    w = affine_weight(32, 256, 128, seed=3)
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(2)).to(torch.float16)
    swapped = affine_int8_matmul(x, w.codes, w.scale.flip(0).contiguous(), w.shift, 128)
    ref = reference(x, w)
    assert float((swapped.double() - ref).norm() / ref.norm()) > 0.1


def test_kernel_class_runs_half_precision_on_the_kernel_and_float32_exactly():
    w = affine_weight(40, 128, 64, seed=5)
    kernel, plain = CudaTritonInt8Kernel(w), DequantKernel(w)
    assert QuantizedLinear.from_kernel(kernel).kernel == CudaTritonInt8Kernel.description
    x16 = torch.randn(3, 128, generator=torch.Generator().manual_seed(4)).to(torch.float16)
    ref = plain(x16.float()).double()
    torch.testing.assert_close(kernel(x16).double(), ref, rtol=2e-3, atol=2e-3 * float(ref.abs().max()))
    x32 = torch.randn(3, 128, generator=torch.Generator().manual_seed(6))
    assert torch.equal(kernel(x32), plain(x32))  # float32 is never rounded through a tensor-core product
    assert torch.equal(kernel.codes(), w.codes)
    assert torch.equal(kernel.dequantize(torch.float32), w.dequantize(torch.float32))
    assert kernel.max_rows == 16  # a prompt's rows run dequantize + matmul


def test_stacked_parts_give_each_parts_outputs():
    """q/k/v fused: the stacked kernel's outputs are the parts' outputs side by side, each the same dot
    product as its part computed; parts with other groups are not stacked."""
    parts = [CudaTritonInt8Kernel(affine_weight(n, 256, 128, seed=n)) for n in (64, 16, 16)]
    x = torch.randn(2, 256, generator=torch.Generator().manual_seed(9)).to(torch.float16)
    stacked = CudaTritonInt8Kernel.stacked(parts)
    assert torch.equal(stacked(x), torch.cat([p(x) for p in parts], dim=-1))
    other = CudaTritonInt8Kernel(affine_weight(16, 256, 64, seed=1))
    assert CudaTritonInt8Kernel.stacked([parts[0], other]) is None


def test_fuse_linears_stacks_triton_layers_with_their_biases():
    layers = [
        QuantizedLinear.from_kernel(CudaTritonInt8Kernel(affine_weight(n, 128, 128, seed=n)), torch.randn(n))
        for n in (32, 16)
    ]
    fused = fuse_linears(layers)
    assert isinstance(fused, QuantizedLinear) and isinstance(fused.impl, CudaTritonInt8Kernel)
    x = torch.randn(1, 5, 128, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    assert torch.equal(fused(x), torch.cat([layer(x) for layer in layers], dim=-1))


def test_tiles_and_where_the_kernel_is_chosen(monkeypatch):
    assert block_k(3584, 3584) == 256  # per channel: the widest tile
    assert block_k(128, 3584) == 128  # GPTQ groups of 128
    assert block_k(32, 4096) == 32  # GGUF Q8_0 blocks
    assert block_k(8, 64) is None and block_k(100, 100) is None  # no tile of 16 or more fits
    spec = WeightSpec(8, 128, 3584, 3584)
    assert not CudaTritonInt8Kernel.supports(spec, torch.device("cpu"))
    assert not CudaTritonInt8Kernel.supports(WeightSpec(4, 128, 3584, 3584), torch.device("cpu"))
    # tried before the dequantizing fallback, after PyTorch's int4 kernel
    order = [cls.key for cls in KERNELS]
    assert order.index("cuda_int4pack") < order.index("cuda_triton_int8") < order.index("dequant")
    monkeypatch.setenv("QWENKIT_TRITON", "0")
    assert not triton_affine.triton_available()


def test_a_kernel_that_cannot_run_falls_back_once_with_a_note(monkeypatch, capsys):
    """Triton failing to build or launch (an old driver, a broken install) costs speed, not the answer:
    the layer dequantizes and multiplies, says so once, and does not try Triton again."""
    monkeypatch.setattr(triton_affine, "_FAILED", None)
    calls = []

    def broken():
        calls.append(1)
        raise RuntimeError("no launcher")

    monkeypatch.setattr(triton_affine, "_kernel", broken)
    w = affine_weight(24, 64, 64, seed=4)
    kernel, plain = CudaTritonInt8Kernel(w), DequantKernel(w)
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(3)).to(torch.float16)
    assert torch.equal(kernel(x), plain(x))
    assert torch.equal(kernel(x), plain(x))
    assert len(calls) == 1
    err = capsys.readouterr().err
    assert err.count("qwenkit: the Triton int8 kernel failed (RuntimeError: no launcher)") == 1
    assert "int8 layers on CUDA dequantize per call instead" in err
    assert not triton_affine.triton_available()  # new layers are not built on it either
    layer = QuantizedLinear.from_kernel(kernel)
    assert layer.kernel == "dequantize + matmul per call (fallback)"  # what `qwenkit profile` prints


def test_no_c_compiler_means_no_triton_kernel(monkeypatch, capsys):
    """Triton compiles a C launcher at first use: without cc/gcc/clang (and no CC) it is not chosen."""
    monkeypatch.setattr(triton_affine, "_FAILED", None)
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(triton_affine.shutil, "which", lambda name: None)
    assert not triton_affine.triton_available()
    assert not triton_affine.triton_available()
    err = capsys.readouterr().err
    assert err.count("qwenkit: Triton needs a C compiler (cc, gcc or clang)") == 1
    monkeypatch.setattr(triton_affine, "_FAILED", None)
    monkeypatch.setenv("CC", "/usr/bin/cc")
    assert triton_affine.triton_available()


@pytest.mark.parametrize("value", ["0", "off", "false", "no", " OFF "])
def test_the_switch_takes_every_spelling_of_off(monkeypatch, capsys, value):
    """Only an exact QWENKIT_TRITON=0 switched the kernel off: =off, =false or =no were ignored in silence,
    where every other on/off QWENKIT_ setting takes them (env_switch) and names a value it cannot read."""
    from qwenkit import env_switch

    monkeypatch.setattr(env_switch, "_named", set())  # each case names the unreadable value again
    monkeypatch.setattr(triton_affine, "_FAILED", None)
    monkeypatch.setenv("CC", "cc")  # the launcher's compiler, so only the switch decides
    monkeypatch.setenv("QWENKIT_TRITON", value)
    assert not triton_affine.triton_available()
    monkeypatch.setenv("QWENKIT_TRITON", "on")
    assert triton_affine.triton_available()
    monkeypatch.setenv("QWENKIT_TRITON", "of")
    assert triton_affine.triton_available()
    assert "QWENKIT_TRITON='of' is not one of" in capsys.readouterr().err
