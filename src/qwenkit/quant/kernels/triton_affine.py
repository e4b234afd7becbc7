"""8-bit and 4-bit codes multiplied on a CUDA GPU by one Triton kernel that dequantizes as it reads.

A decode step reads every weight once, so its speed is the bytes it reads. Dequantize-then-matmul
(``DequantKernel``) reads the int8 codes, writes a bfloat16 copy and reads that again: 5 bytes a weight
against bfloat16's 2, so an int8 model decoded slower than the float one (7B on an H200: 22.5 tokens/s
against 171). This kernel reads each code once (1 byte a weight): a tile of codes, its group's scale and
shift, ``codes * scale + shift`` rounded to the activation dtype exactly as ``affine_dequantize`` rounds
it, then a tensor-core product with float32 accumulation. It takes every 8-bit affine weight: RTN and
GPTQ int8 (groups, zero points, act-order through the layer's permutation), GGUF Q8_0, and the int8
output head that ``--quantize int4`` keeps. 4-bit codes are held two to a byte (the even input's code in
the low nibble): the kernel splits each byte and multiplies the even and odd inputs apart.

Triton ships with PyTorch's CUDA wheels on Linux; without it (or off CUDA) the layer keeps the next
kernel in ``KERNELS``. Tests run the same kernel on the CPU through Triton's interpreter
(``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch
import torch.nn.functional as F

from qwenkit.quant.affine import AffineWeight, affine_dequantize
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


def block_k(group_size: int, in_features: int, largest: int = MAX_BLOCK_K, bits: int = 8) -> int | None:
    """The largest power of two up to ``largest`` that divides both the group and the row (a tile never
    straddles two groups), or None below tl.dot's 16 inputs a product (4-bit: 32, split in two)."""
    size = largest
    while size >= (16 if bits == 8 else 32):
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
    def affine_mm(
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
        BITS: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BK: tl.constexpr,
        F32_DOT: tl.constexpr,
    ):
        rows = tl.program_id(1) * BM + tl.arange(0, BM)
        cols = tl.program_id(0) * BN + tl.arange(0, BN)
        part = tl.program_id(2)  # which K_SPLIT-wide slice of the inputs this program sums
        row_ok, col_ok = rows < M, cols < N
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for k0 in range(part * K_SPLIT, (part + 1) * K_SPLIT, BK):
            group = k0 // GROUP
            scale = tl.load(scale_ptr + group * N + cols, mask=col_ok, other=0.0)
            shift = tl.load(shift_ptr + group * N + cols, mask=col_ok, other=0.0)
            # scale and shift rounded to the activation dtype first, as affine_dequantize does (on a GPU a
            # cast rounds to nearest; the CPU interpreter truncates, so its bfloat16 is only close)
            scale = scale.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
            shift = shift.to(x_ptr.dtype.element_ty).to(tl.float32)[None, :]
            if BITS == 8:
                ks = k0 + tl.arange(0, BK)
                x = tl.load(x_ptr + rows[:, None] * K + ks[None, :], mask=row_ok[:, None], other=0.0)
                codes = tl.load(codes_ptr + cols[None, :] * K + ks[:, None], mask=col_ok[None, :], other=0)
                w = (codes.to(tl.float32) * scale + shift).to(x.dtype)  # (BK, BN)
                if F32_DOT:  # Triton's CPU interpreter multiplies bfloat16 tiles wrongly; these are exact
                    acc += tl.dot(x.to(tl.float32), w.to(tl.float32))
                else:
                    acc += tl.dot(x, w)
            else:  # two codes a byte: even inputs in the low nibbles, odd in the high
                pairs = k0 // 2 + tl.arange(0, BK // 2)
                packed = tl.load(
                    codes_ptr + cols[None, :] * (K // 2) + pairs[:, None], mask=col_ok[None, :], other=0
                )
                x_ptrs = x_ptr + rows[:, None] * K + 2 * pairs[None, :]
                x_even = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
                x_odd = tl.load(x_ptrs + 1, mask=row_ok[:, None], other=0.0)
                w_even = ((packed & 15).to(tl.float32) * scale + shift).to(x_even.dtype)
                w_odd = ((packed >> 4).to(tl.float32) * scale + shift).to(x_even.dtype)
                if F32_DOT:
                    acc += tl.dot(x_even.to(tl.float32), w_even.to(tl.float32))
                    acc += tl.dot(x_odd.to(tl.float32), w_odd.to(tl.float32))
                else:
                    acc += tl.dot(x_even, w_even)
                    acc += tl.dot(x_odd, w_odd)
        out = y_ptr + part * M * N + rows[:, None] * N + cols[None, :]
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    return affine_mm


def affine_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    group_size: int,
    bits: int = 8,
    *,
    block_n: int | None = None,
    num_warps: int | None = None,
    max_block_k: int = MAX_BLOCK_K,
    split_k: int = 1,
    num_stages: int = 4,
) -> torch.Tensor:
    """(M, K) bf16/fp16 ``x`` times the (N, K) weight ``codes * scale[g] + shift[g]`` -> (M, N) in x's
    dtype. ``codes``: (N, K) uint8 for 8 bits, (N, K/2) two to a byte (:func:`pack_nibbles`) for 4.
    ``group_size`` and K must share a power of two of at least 16 (32 for 4 bits; ``block_k``).

    The tile arguments default to :func:`tiles`; benchmarks/bench_cuda_quant.py's sweep sets them.
    ``split_k`` > 1 sums that many slices of the inputs in separate programs into float32 partial
    outputs, added in a fixed order after (never atomically: a row's result stays the same every run)."""
    m, k = x.shape
    n = codes.shape[0]
    bk = block_k(group_size, k, max_block_k, bits)
    if bk is None:
        raise ValueError(f"no Triton tile fits a {n}x{k} {bits}-bit weight in groups of {group_size}")
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
    sizes = (m, n, k, k // split_k, group_size, bits, BLOCK_M, block_n, bk, interpreted)
    _kernel()[grid](x, codes, scale, shift, y, *sizes, num_warps=num_warps, num_stages=num_stages)
    return y if split_k == 1 else y.sum(0).to(x.dtype)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) 4-bit codes -> (N, K/2) bytes, input 2j's code in byte j's low nibble, 2j+1's in its high."""
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_nibbles`."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def triton_available(bits: int) -> bool:
    """Triton importable, and this width not switched off: ``QWENKIT_TRITON=0`` turns both kernels off
    (every layer dequantizes per call, or int4 runs PyTorch's kernel), ``=int8`` keeps only the int8 one."""
    if importlib.util.find_spec("triton") is None:
        return False
    chosen = os.environ.get("QWENKIT_TRITON", "1")
    return chosen == "1" or f"int{bits}" in chosen.split(",")


class CudaTritonInt8Kernel(DequantKernel):
    """8-bit affine codes on the Triton kernel above (CUDA, bf16/fp16 activations). The codes, scale and
    shift are ``DequantKernel``'s own buffers, so dequantizing, rows and codes are its methods."""

    key = "cuda_triton_int8"
    description = "qwenkit Triton int8 dequantizing product (cuda, bf16 activations)"
    bits_needed = 8
    # one program's rows; a prompt's many rows run dequantize + cuBLAS (compute bound there)
    max_rows = BLOCK_M

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            device.type == "cuda"
            and spec.bits == cls.bits_needed
            and block_k(spec.group_size, spec.in_features, bits=spec.bits) is not None
            and triton_available(spec.bits)
            and torch.cuda.get_device_capability(device)[0] >= 8  # bfloat16 tensor cores
        )

    @classmethod
    def stacked(cls, parts: list[CudaTritonInt8Kernel]) -> CudaTritonInt8Kernel | None:
        """One kernel whose outputs are the parts' outputs side by side (q/k/v, gate/up), or None when
        their groups differ. Each output's dot product is computed as its part computed it."""
        first = parts[0]
        if any(p.group_size != first.group_size or p.in_features != first.in_features for p in parts):
            return None
        codes = torch.cat([p.codes() for p in parts])
        scale = torch.cat([p.scale for p in parts], dim=1)
        shift = torch.cat([p.shift for p in parts], dim=1)
        return cls(AffineWeight(codes, scale, shift, first.group_size, cls.bits_needed))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.bfloat16, torch.float16):  # float32 models: exact, not tensor-core tf32
            return F.linear(x, self.dequantize(x.dtype))
        return affine_matmul(x, self.qdata, self.scale, self.shift, self.group_size, self.bits)


class CudaTritonInt4Kernel(CudaTritonInt8Kernel):
    """4-bit affine codes, two to a byte, on the same Triton kernel: half the int8 kernel's bytes."""

    key = "cuda_triton_int4"
    description = "qwenkit Triton int4 dequantizing product (cuda, bf16 activations)"
    bits_needed = 4

    def __init__(self, w: AffineWeight) -> None:
        super().__init__(w)
        self.qdata = pack_nibbles(w.codes)  # the buffer DequantKernel registered, now packed

    def codes(self) -> torch.Tensor:
        return unpack_nibbles(self.qdata)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return affine_dequantize(self.codes(), self.scale, self.shift, self.group_size, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        codes = unpack_nibbles(self.qdata[ids])
        return affine_dequantize(codes, self.scale[:, ids], self.shift[:, ids], self.group_size, dtype)
