"""Kernels on PyTorch's own packed int8/int4 matmuls (aten ops), CPU and CUDA.

Numbers from ``benchmarks/bench_quant_kernels.py`` (Qwen2.5-0.5B shapes, one token): PyTorch's CPU
int8/int4 kernels are only fast with bfloat16 activations (float32 is 5-15x slower than a dense float32
matmul), so activations are cast to bfloat16 for the kernel and the result cast back. Past ``max_rows``
rows they become compute bound and lose to dequantize + dense matmul, so prompts take that path.

aten's int4 kernels compute ``(q - 8) * scale + shift`` per group, with bfloat16 ``qScaleAndZeros``; an
affine weight ``q * s + b`` is therefore ``scale = s, shift = b + 8 s``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from qwenkit.quant.affine import AffineWeight, affine_dequantize
from qwenkit.quant.kernels.base import LinearKernel, WeightSpec

_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes aten's int4 kernels accept


def kernel_group(group_size: int, in_features: int) -> int | None:
    """Largest group the int4 kernels accept that tiles both our groups and the row (scales repeat)."""
    for g in _INT4_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


@functools.cache
def _cpu_int4_block() -> int | None:
    """Rows per block of aten's CPU int4 packing on this CPU (64 on its AVX-512 build, 32 on its AVX2 one),
    found once by packing known codes; None when it is neither layout :func:`_unpack_cpu_int4` undoes."""
    try:
        q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
    except (RuntimeError, AttributeError):
        return None
    for block in (64, 32):
        if torch.equal(_unpack_cpu_int4(packed, 128, 64, block), q.to(torch.uint8)):
            return block
    return None


def _cpu_int4_layout_ok() -> bool:
    return _cpu_int4_block() is not None


def _unpack_cpu_int4(packed: torch.Tensor, n: int, k: int, block: int | None = None) -> torch.Tensor:
    """aten's CPU int4 layout -> (n, k) uint8 codes.

    With B rows a block (``_cpu_int4_block``), byte (b, k, j) of the (n/B, k, B/2) view holds row
    ``B*b + j`` in its low nibble and row ``B*b + B/2 + j`` in its high nibble.
    """
    block = block or _cpu_int4_block() or 64
    v = packed.view(n // block, k, block // 2)
    rows = torch.cat([v & 0xF, v >> 4], dim=2)  # (n/B, k, B)
    return rows.permute(0, 2, 1).reshape(n, k)


def _int4_rows(packed: torch.Tensor, ids: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(len(ids), k) codes of rows ``ids`` from aten's CPU int4 layout, without unpacking the rest."""
    size = _cpu_int4_block() or 64
    v = packed.view(n // size, k, size // 2)
    block, j = ids // size, ids % size
    slabs = v[block, :, j % (size // 2)]  # (len(ids), k)
    shift = ((j >= size // 2).to(torch.uint8) * 4)[:, None]
    return (slabs >> shift) & 0xF


PACK_BLOCK_ELEMENTS = 1 << 20  # codes per packing step: the int32 copy aten wants stays 4 MiB


def _int4pack_cpu(q: torch.Tensor, nibbles: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """aten's CPU int4 layout of ``nibbles(q)`` for (n, k) uint8 codes, n a multiple of 64.

    aten packs each block of rows on its own (``_unpack_cpu_int4``) but wants int32 codes: packing a block of
    rows at a time into the result keeps that widened copy at one block instead of 4 bytes per weight
    (226 MB for SmolLM2's 49152 x 576 Q8_0 embedding as two nibble planes).
    """
    n, k = q.shape
    step = max(64, PACK_BLOCK_ELEMENTS // max(1, k) // 64 * 64)
    pack = torch.ops.aten._convert_weight_to_int4pack_for_cpu
    out: torch.Tensor | None = None
    for i in range(0, n, step):
        rows = nibbles(q[i : i + step]).to(torch.int32)
        part = pack(rows, 2)
        if out is None:
            if part.shape[0] != rows.shape[0]:  # not the row-major layout measured: pack at once
                break
            out = torch.empty((n, *part.shape[1:]), dtype=part.dtype)
        out[i : i + step] = part
    return out if out is not None else pack(nibbles(q).to(torch.int32), 2)


def _kernel_groups(w: AffineWeight) -> tuple[int, torch.Tensor, torch.Tensor]:
    """(kernel group g, scale, shift) with our (G, N) per-group values repeated for the kernel's (k/g, N)
    groups (g divides group_size)."""
    k = w.in_features
    g = kernel_group(w.group_size, k)
    rep = torch.arange(k // g, device=w.scale.device) * g // w.group_size
    return g, w.scale.float()[rep], w.shift.float()[rep]


def _scales_and_shifts(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(G, N, 2) bfloat16 ``qScaleAndZeros`` for ``(q - 8) * scale + shift``."""
    return torch.stack([scale, shift], dim=-1).to(torch.bfloat16).contiguous()


def _kernel_affine(q: torch.Tensor, sz: torch.Tensor, g: int, dtype: torch.dtype) -> torch.Tensor:
    """The aten int4 kernels' own ``(q - 8) * scale + shift`` for (rows, k) codes and (k/g, rows, 2) sz."""
    scale, shift = sz[..., 0].float(), sz[..., 1].float()
    return affine_dequantize(q, scale, shift - 8 * scale, g, dtype)


class CpuInt8PackKernel(LinearKernel):
    """Per-channel int8 on ``aten._weight_int8pack_mm``: ``y = (x @ (q - 128).T) * s + rowsum(x) * c``."""

    key = "cpu_int8pack"
    description = "aten._weight_int8pack_mm (bf16 activations)"
    max_rows = 128  # 896x4864: kernel 3.9 ms vs dequantize + matmul 6.0 ms at 64 rows
    bits_needed = 8

    def __init__(self, w: AffineWeight) -> None:
        super().__init__(w)
        # q - 128 as int8 is q with its top bit flipped: one byte per weight, no wider temporary
        self.register_buffer("qdata", torch.bitwise_xor(w.codes.contiguous(), 0x80).view(torch.int8))
        self.register_buffer("kscales", w.scale[0].to(torch.bfloat16).contiguous())
        fix = w.shift[0].float() + 128 * w.scale[0].float()  # 0 for symmetric weights
        self.register_buffer("zfix", fix if bool(fix.any()) else None)

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and spec.bits == 8
            and spec.group_size == spec.in_features
            and spec.in_features % 16 == 0  # torch's kernel reads past the row otherwise: a segfault
            and hasattr(torch, "_weight_int8pack_mm")
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        y = torch._weight_int8pack_mm(xb, self.qdata, self.kscales)
        if self.zfix is not None:
            y = (y.float() + xb.float().sum(1, keepdim=True) * self.zfix).to(torch.bfloat16)
        return y.to(x.dtype)

    def codes(self) -> torch.Tensor:
        return (self.qdata.to(torch.int16) + 128).to(torch.uint8)

    def _shift(self) -> torch.Tensor:
        return torch.zeros_like(self.kscales, dtype=torch.float32) if self.zfix is None else self.zfix

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        k = self.in_features
        return affine_dequantize(self.qdata, self.kscales.float()[None], self._shift()[None], k, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        k = self.in_features
        s, b = self.kscales.float()[ids][None], self._shift()[ids][None]
        return affine_dequantize(self.qdata[ids], s, b, k, dtype)


class CpuInt4PackKernel(LinearKernel):
    """int4 groups on ``aten._weight_int4pack_mm_for_cpu``."""

    key = "cpu_int4pack"
    description = "aten._weight_int4pack_mm_for_cpu (bf16 activations)"
    max_rows = 256  # dequantizing int4 costs ~15 ms at 896x4864, so the kernel wins to a few hundred rows
    bits_needed = 4

    def __init__(self, w: AffineWeight) -> None:
        super().__init__(w)
        self.kgroup, s, b = _kernel_groups(w)
        self._pack(w.codes, s, b)

    def _pack(self, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> None:
        self.register_buffer("qdata", _int4pack_cpu(q, lambda rows: rows))
        self.register_buffer("kscales", _scales_and_shifts(s, b + 8 * s))

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and spec.bits == cls.bits_needed
            and kernel_group(spec.group_size, spec.in_features) is not None
            and spec.out_features % 64 == 0
            and _cpu_int4_layout_ok()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qdata, self.kgroup, self.kscales)
        return y.to(x.dtype)

    def codes(self) -> torch.Tensor:
        return _unpack_cpu_int4(self.qdata, self.out_features, self.in_features)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return _kernel_affine(self.codes(), self.kscales, self.kgroup, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        q = _int4_rows(self.qdata, ids, self.out_features, self.in_features)
        return _kernel_affine(q, self.kscales[:, ids], self.kgroup, dtype)


class CpuInt8AsInt4x2Kernel(CpuInt4PackKernel):
    """Grouped int8 as two int4 matmuls.

    ``q = 16 hi + lo``, so ``q s + b = 16 s (hi - 8) + s (lo - 8) + (b + 136 s)``.
    """

    key = "cpu_int8_as_int4x2"
    description = "aten._weight_int4pack_mm_for_cpu x2, int8 split in nibbles (bf16 activations)"
    bits_needed = 8

    def _pack(self, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor) -> None:
        self.register_buffer("qdata", _int4pack_cpu(q, lambda rows: rows >> 4))
        self.register_buffer("qdata_lo", _int4pack_cpu(q, lambda rows: rows & 0xF))
        self.register_buffer("kscales", _scales_and_shifts(16 * s, b + 136 * s))
        self.register_buffer("kscales_lo", _scales_and_shifts(s, torch.zeros_like(s)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb, g = x.to(torch.bfloat16), self.kgroup
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qdata, g, self.kscales)
        y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qdata_lo, g, self.kscales_lo)
        return y.to(x.dtype)

    def codes(self) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        return _unpack_cpu_int4(self.qdata, n, k) * 16 + _unpack_cpu_int4(self.qdata_lo, n, k)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.kgroup
        hi = _kernel_affine(_unpack_cpu_int4(self.qdata, n, k), self.kscales, g, dtype)
        return hi + _kernel_affine(_unpack_cpu_int4(self.qdata_lo, n, k), self.kscales_lo, g, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        n, k, g = self.out_features, self.in_features, self.kgroup
        hi = _kernel_affine(_int4_rows(self.qdata, ids, n, k), self.kscales[:, ids], g, dtype)
        lo = _kernel_affine(_int4_rows(self.qdata_lo, ids, n, k), self.kscales_lo[:, ids], g, dtype)
        return hi + lo


class CudaInt4PackKernel(LinearKernel):
    """int4 groups on ``aten._weight_int4pack_mm`` (sm80+). Its tile layout is opaque, so the float scale
    and shift are kept beside it to read the codes back exactly."""

    key = "cuda_int4pack"
    description = "aten._weight_int4pack_mm (cuda, bf16 activations)"
    has_rows = False
    bits_needed = 4

    def __init__(self, w: AffineWeight) -> None:
        super().__init__(w)
        k = w.in_features
        self.kgroup, s, b = _kernel_groups(w)
        qi = w.codes.to(torch.int32)
        as_bytes = ((qi[:, ::2] << 4) | qi[:, 1::2]).to(torch.uint8)
        tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
        self.register_buffer("qdata", torch.ops.aten._convert_weight_to_int4pack(as_bytes, tiles))
        self.register_buffer("kscales", _scales_and_shifts(s, b + 8 * s))
        self.register_buffer("scale", w.scale.float().contiguous())
        self.register_buffer("shift", w.shift.float().contiguous())

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            device.type == "cuda"
            and spec.bits == 4
            and kernel_group(spec.group_size, spec.in_features) is not None
            and spec.out_features % 8 == 0
            and torch.cuda.get_device_capability(device)[0] >= 8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm(xb, self.qdata, self.kgroup, self.kscales).to(x.dtype)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        eye = torch.eye(self.in_features, dtype=torch.bfloat16, device=self.qdata.device)
        return torch.ops.aten._weight_int4pack_mm(eye, self.qdata, self.kgroup, self.kscales).T.to(dtype)

    def codes(self) -> torch.Tensor:
        w = self.dequantize(torch.float32)
        gi = torch.arange(self.in_features, device=w.device) // self.group_size
        s, b = self.scale[gi].T, self.shift[gi].T
        return torch.round((w - b) / s).clamp(0, 15).to(torch.uint8)
