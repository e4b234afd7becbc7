"""8-bit codes multiplied on a CUDA GPU by one Triton kernel that dequantizes as it reads.

A decode step reads every weight once, so its speed is the bytes it reads. Dequantize-then-matmul
(``DequantKernel``) reads the int8 codes, writes a bfloat16 copy and reads that again: 5 bytes a weight
against bfloat16's 2, so an int8 model decoded slower than the float one (7B on an H200: 22.5 tokens/s
against 171). This kernel reads each code once (1 byte a weight): a tile of codes, its group's scale and
shift, ``codes * scale + shift`` rounded to the activation dtype exactly as ``affine_dequantize`` rounds
it, then a tensor-core product with float32 accumulation. It takes every 8-bit affine weight: RTN and
GPTQ int8 (groups, zero points, act-order through the layer's permutation), GGUF Q8_0, and the int8
output head that ``--quantize int4`` keeps.

Triton ships with PyTorch's CUDA wheels on Linux; without it, without the C compiler it builds its
launcher with, or off CUDA, the layer keeps the next kernel in ``KERNELS`` (saying why once), and a
kernel that fails to compile or launch falls back the same way. Tests run the same kernel on the CPU
through Triton's interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
import sys

import torch
import torch.nn.functional as F

from qwenkit.env_switch import ON_OFF, env_choice
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.kernels.base import WeightSpec
from qwenkit.quant.kernels.dequant import DequantKernel

BLOCK_M = 16  # rows of activations per program: tl.dot's smallest tile; a decode step's rows fit one
MAX_BLOCK_K = 256  # codes per row per load: wide loads keep enough bytes in flight


def tiles(out_features: int) -> tuple[int, int]:
    """(outputs per program, warps) for a layer of this many outputs. Measured on an H200 at one row
    (benchmarks/bench_cuda_quant.py --sweep, 2026-12-04): narrow layers want many small programs so that
    every multiprocessor streams (3584 outputs: 16 a program, 224 programs, 2 warps: 13 us against 17 at
    4 warps), wide ones fewer, larger loads (37,888: 32 a program, 56 us against 89 at 16; the 152,064
    head: 64, 175 us against 329)."""
    if out_features <= 8192:
        return 16, 2
    return (32, 4) if out_features <= 65536 else (64, 4)


def block_k(group_size: int, in_features: int, largest: int = MAX_BLOCK_K) -> int | None:
    """The largest power of two from 16 to ``largest`` that divides both the group and the row (a tile
    never straddles two groups), or None."""
    size = largest
    while size >= 16:
        if group_size % size == 0 and in_features % size == 0:
            return size
        size //= 2
    return None


@functools.cache
def _kernel():
    """The Triton kernel, compiled on first use (importing triton costs time a CPU user never needs)."""
    import triton
    import triton.language as tl

    @triton.jit
    def affine_int8_mm(
        x_ptr,
        codes_ptr,
        scale_ptr,
        shift_ptr,
        y_ptr,
        M,
        N,
        K,
        K_SPLIT,
        GROUP: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        F32_DOT: tl.constexpr,
    ):
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        part = tl.program_id(2)  # which K_SPLIT-wide slice of the inputs this program sums
        ks = tl.arange(0, BK)
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(part * K_SPLIT, (part + 1) * K_SPLIT, BK):
            x = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :], mask=row_ok[:, None], other=0.0)
            codes = tl.load(codes_ptr + cols[None, :] * K + (k0 + ks)[:, None], mask=col_ok[None, :], other=0)
            group = k0 // GROUP
            scale = tl.load(scale_ptr + group * N + cols, mask=col_ok, other=0.0)
            shift = tl.load(shift_ptr + group * N + cols, mask=col_ok, other=0.0)
            # scale and shift rounded to the activation dtype first, as affine_dequantize does (on a GPU a
            # cast rounds to nearest; the CPU interpreter truncates, so its bfloat16 is only close)
            scale = scale.to(x.dtype).to(tl.float32)
            shift = shift.to(x.dtype).to(tl.float32)
            w = (codes.to(tl.float32) * scale[None, :] + shift[None, :]).to(x.dtype)  # (BK, BN)
            if F32_DOT:  # Triton's CPU interpreter multiplies bfloat16 tiles wrongly; the values are exact
                acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
            else:
                acc += tl.dot(x, w)
        out = y_ptr + part * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return affine_int8_mm


def affine_int8_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    group_size: int,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    max_block_k: int = MAX_BLOCK_K,
    split_k: int = 1,
    num_stages: int = 4,
) -> torch.Tensor:
    """(M, K) bf16/fp16 ``x`` times the (N, K) weight ``codes * scale[g] + shift[g]`` -> (M, N) in x's
    dtype. ``group_size`` and K must share a power of two >= 16 (``block_k``).

    The tile arguments default to :func:`tiles`; benchmarks/bench_cuda_quant.py's sweep sets them.
    ``split_k`` > 1 sums that many slices of the inputs in separate programs into float32 partial
    outputs, added in a fixed order after (never atomically: a row's result stays the same every run)."""
    m, k = x.shape
    n = codes.shape[0]
    bk = block_k(group_size, k, max_block_k)
    if bk is None:
        raise ValueError(f"no Triton tile fits a {n}x{k} weight in groups of {group_size}")
    if (k // bk) % split_k:
        raise ValueError(f"{k} inputs in tiles of {bk} do not split into {split_k} equal slices")
    default_n, default_warps = tiles(n)
    block_n, num_warps = block_n or default_n, num_warps or default_warps
    x = x.contiguous()
    if split_k == 1:
        y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    else:
        y = torch.empty((split_k, m, n), dtype=torch.float32, device=x.device)
    grid = (-(-n // block_n), -(-m // BLOCK_M), split_k)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    args = (x, codes, scale, shift, y, m, n, k, k // split_k, group_size, BLOCK_M, block_n, bk, interpreted)
    _kernel()[grid](*args, num_warps=num_warps, num_stages=num_stages)
    return y if split_k == 1 else y.sum(0).to(x.dtype)


_FAILED: str | None = None  # why the kernel cannot run in this process, once it could not


def _give_up(reason: str) -> None:
    """Stop using the kernel in this process, saying why once (the layers then dequantize per call)."""
    global _FAILED
    if _FAILED is None:
        _FAILED = reason
        print(f"qwenkit: {reason}; int8 layers on CUDA dequantize per call instead", file=sys.stderr)


def triton_available() -> bool:
    """Triton importable with a C compiler for the launcher it builds, not switched off
    (``QWENKIT_TRITON=0``, or off/false/no), and not failed earlier in this process."""
    if env_choice("QWENKIT_TRITON", ON_OFF, "on") == "off" or _FAILED is not None:
        return False
    if importlib.util.find_spec("triton") is None:
        return False
    if not (os.environ.get("CC") or any(shutil.which(cc) for cc in ("cc", "gcc", "clang"))):
        _give_up("Triton needs a C compiler (cc, gcc or clang) to build its kernel launcher")
        return False
    return True


class CudaTritonInt8Kernel(DequantKernel):
    """8-bit affine codes on the Triton kernel above (CUDA, bf16/fp16 activations). The codes, scale and
    shift are ``DequantKernel``'s own buffers, so dequantizing, rows and codes are its methods."""

    key = "cuda_triton_int8"
    description = "qwenkit Triton int8 dequantizing product (cuda, bf16 activations)"
    # one program's rows; a prompt's many rows run dequantize + cuBLAS (compute bound there)
    max_rows = BLOCK_M

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            device.type == "cuda"
            and spec.bits == 8
            and block_k(spec.group_size, spec.in_features) is not None
            and triton_available()
            and torch.cuda.get_device_capability(device)[0] >= 8  # bfloat16 tensor cores
        )

    @classmethod
    def stacked(cls, parts: list[CudaTritonInt8Kernel]) -> CudaTritonInt8Kernel | None:
        """One kernel whose outputs are the parts' outputs side by side (q/k/v, gate/up), or None when
        their groups differ. Each output's dot product is computed as its part computed it."""
        first = parts[0]
        if any(p.group_size != first.group_size or p.in_features != first.in_features for p in parts):
            return None
        codes = torch.cat([p.qdata for p in parts])
        scale = torch.cat([p.scale for p in parts], dim=1)
        shift = torch.cat([p.shift for p in parts], dim=1)
        return cls(AffineWeight(codes, scale, shift, first.group_size, 8))

    def running(self) -> str:
        return self.description if _FAILED is None else DequantKernel.description

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # float32 models stay exact (no tensor-core tf32); a kernel that failed here is not tried again
        if x.dtype in (torch.bfloat16, torch.float16) and _FAILED is None:
            try:
                return affine_int8_matmul(x, self.qdata, self.scale, self.shift, self.group_size)
            except Exception as e:  # Triton could not compile or launch it on this machine
                _give_up(f"the Triton int8 kernel failed ({type(e).__name__}: {e})")
        return F.linear(x, self.dequantize(x.dtype))
