"""Kernels on qwenkit's own C++ ops (:mod:`qwenkit.kernels`; AVX-512 VNNI, else AVX2), CPU, 1-16 rows a call.

Weights live in the ops' tile layout (16 output rows per sequential stream). Activations are rounded
to int8 per block of 32 inputs (as llama.cpp's q8 activations) and dotted with VNNI (on AVX2, with
vpmaddubsw); the result is
``dot(w, x_rounded)`` computed exactly in float. Prompts go through the kernel too: at 64-512 rows it
beat both PyTorch's packed int kernels (2-3x) and dequantize + GEMM (4-10x) at the Qwen2.5-0.5B FFN
shapes. A weight whose shift is ``-z * scale`` for
one integer ``z`` everywhere (symmetric RTN, GGUF Q8_0/Q4_0) stores ``z`` instead of a shift tensor.
"""

from __future__ import annotations

import torch

from qwenkit import kernels
from qwenkit.kernels.ops import PackedInt
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.gptq_format import QuantizationError
from qwenkit.quant.kernels.base import LinearKernel, WeightSpec


def _zero_point(w: AffineWeight) -> int | None:
    """The integer z with ``shift == -z * scale`` exactly (in float32) for every group, if there is one."""
    z = 2 ** (w.bits - 1)
    return z if torch.equal(w.shift.float(), -z * w.scale.float()) else None


# How ``qwenkit profile`` names the instruction set the loaded kernels were built for.
INT_ISA_NAMES = {
    "avx512": "AVX-512 VNNI",
    "avx512vnni": "AVX-512 VNNI",
    "avxvnni": "AVX-VNNI",
    "avx2": "AVX2",
}


class _IsaNamed:
    """A kernel class's ``description`` with ``{isa}`` filled in from the loaded build, and ``{amx}`` with
    the rows from which prompts run on AMX-INT8 where they do (``kernels.int_amx_rows(bits)``, the codes'
    width as the tiles hold them; Q6_K's tiles never do, and its template has no ``{amx}``), read from the
    class or an instance alike (the registry lists the class descriptions)."""

    def __init__(self, template: str, bits: int = 8) -> None:
        self.template, self.bits = template, bits

    def __get__(self, obj: object, owner: type) -> str:
        rows = kernels.int_amx_rows(self.bits)
        return self.template.format(
            isa=INT_ISA_NAMES.get(kernels.isa_level() or "avx512"),
            amx=f"; AMX-INT8 from {rows} rows" if rows else "",
        )


class _Avx512IntKernel(LinearKernel):
    bits_needed: int

    def __init__(self, w: AffineWeight | PackedInt) -> None:
        """From an AffineWeight (packed here by ``pack``), or from weights already packed
        (``kernels.concat_int`` of fused projections)."""
        packed = w if isinstance(w, PackedInt) else self.pack(w)
        super().__init__(packed)  # a PackedInt has the same bits/group_size/in/out attributes
        self.packed = packed
        self.bits = self.bits_needed  # the codes' width as given (``codes()``); the packing is the kernel's
        self.register_buffer("qcodes", self.packed.codes)  # memory accounting and state_dict see them
        self.register_buffer("qscale", self.packed.scale)
        self.register_buffer("qshift", self.packed.shift)

    @staticmethod
    def pack(w: AffineWeight) -> PackedInt:
        """The kernel's own layout of ``w`` (int8/int4 codes, a zero point where one fits)."""
        zp = _zero_point(w)
        prepare = kernels.prepare_int8 if w.bits == 8 else kernels.prepare_int4
        shift = None if zp is not None else w.shift.float()
        return prepare(w.codes.cpu(), w.scale.float(), shift, w.group_size, zero_point=zp or 0)

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            device.type == "cpu"
            and spec.bits == cls.bits_needed
            and spec.group_size % 32 == 0
            and spec.in_features % spec.group_size == 0
            and kernels.available()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bits = self.packed.bits
        linear = {
            8: kernels.linear_int8,
            6: kernels.linear_q6_k,
            5: kernels.linear_int5,
            4: kernels.linear_int4,
        }[bits]
        if x.dtype == torch.float16:  # the ops take bfloat16 or float32: --dtype float16 runs in float32
            return linear(x.float(), self.packed).to(torch.float16)
        return linear(x, self.packed)

    def codes(self) -> torch.Tensor:
        return kernels.unpack_codes(self.packed)

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return kernels.dequantize(self.packed, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return kernels.dequantize_rows(self.packed, ids).to(dtype)


class Avx512Int8Kernel(_Avx512IntKernel):
    key = "avx512_int8"
    description = _IsaNamed("qwenkit {isa} int8 (int8 activations{amx})")  # type: ignore[assignment]
    bits_needed = 8


class Avx512Int4Kernel(_Avx512IntKernel):
    key = "avx512_int4"
    description = _IsaNamed("qwenkit {isa} int4 (int8 activations{amx})", bits=4)  # type: ignore[assignment]
    bits_needed = 4


class Avx512Iq4Kernel(_Avx512IntKernel):
    """IQ4_NL/IQ4_XS weights (8-bit codes of their table values, ``AffineWeight.iq4``) held as 4-bit
    indices: the AVX-512 int4 tile looks each up in the table (one ``vpshufb`` per 64 codes); AVX2 and
    AVX-VNNI look a block's up into int8 codes in L1 and run the int8 tile's arithmetic on them (the int4
    tile's int16 pair sums would overflow on the table's bytes). Either way they read half the bytes of
    the int8 codes and compute the same weights."""

    key = "avx512_iq4"
    description = _IsaNamed("qwenkit {isa} int4 IQ4 table (int8 activations{amx})", bits=4)  # type: ignore[assignment]
    bits_needed = 8

    @staticmethod
    def pack(w: AffineWeight) -> PackedInt:
        return _iq4_packed(w)

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return spec.iq4 and super().supports(spec, device) and kernels.runs_iq4_table()

    def codes(self) -> torch.Tensor:
        return kernels.iq4_codes(kernels.unpack_codes(self.packed))


class Avx512Int5Kernel(_Avx512IntKernel):
    """GGUF Q5_0/Q5_1/Q5_K weights (8-bit codes spanning 32 values, ``AffineWeight.q5_base``) held at 5
    bits: each 32 inputs' low nibbles as the int4 tile's, their fifth bits in 64 bytes more, merged in
    registers (AVX-512: a shift and a ``vpternlogd`` per 64 codes; AVX2: a shift, an AND and an OR per
    32). 0.625 bytes a code instead of 1, the same weights and results as the int8 kernel, every build."""

    key = "avx512_int5"
    description = _IsaNamed("qwenkit {isa} int5 (int8 activations{amx})", bits=5)  # type: ignore[assignment]
    bits_needed = 8

    @staticmethod
    def pack(w: AffineWeight) -> PackedInt:
        return _int5_packed(w)

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return spec.q5 and super().supports(spec, device) and kernels.runs_int5()

    def codes(self) -> torch.Tensor:
        codes, p = kernels.unpack_codes(self.packed), self.packed
        return codes if p.shift is not None else codes + (INT5_ZERO_POINT_AS_8 - p.zero_point)


class Avx512Q6KKernel(_Avx512IntKernel):
    """GGUF Q6_K weights (codes 0..63, scale d x an int8 per 16 inputs, ``AffineWeight.superscale``) as the
    file holds them: 6-bit codes (per sub-block of 16, three quads' codes in three vectors' low six bits, the
    fourth quad's two bits at a time in their top bits), the int8 scales inline in the tile stream and d
    per 256 inputs, 0.8125 bytes a weight instead of int8 codes' 1.06 (and exactly the file's weights,
    where the int8 codes were rounded again). The tile sums each sub-block of 16 apart and scales it in
    int32 (AVX2: ``vpmaddwd`` by the scale widens two quads' pair sums). Every build of the kernels."""

    key = "avx512_q6_k"
    description = _IsaNamed("qwenkit {isa} Q6_K (int8 activations)")  # type: ignore[assignment]
    bits_needed = 8

    @staticmethod
    def pack(w: AffineWeight) -> PackedInt:
        return _q6_k_packed(w)

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return (
            spec.q6_k
            and device.type == "cpu"
            and spec.group_size == 16
            and spec.in_features % kernels.Q6_K_GROUP == 0
            and kernels.runs_q6_k()
        )


def _q6_k_packed(w: AffineWeight) -> PackedInt:
    """A Q6_K AffineWeight's codes, int8 sub-block scales (``scale / superscale``) and d, packed. Raises
    when the scales are not d times int8 values, or the shift not the zero point's."""
    d = w.superscale.float().cpu()
    scale = w.scale.float().cpu()
    d16 = d.repeat_interleave(kernels.Q6_K_GROUP // 16, dim=0)
    sub = torch.where(d16 != 0, scale / torch.where(d16 != 0, d16, 1.0), 0.0).round()
    if not (torch.equal(sub * d16, scale) and bool((sub.abs() <= 128).all()) and bool((sub < 128).all())):
        raise QuantizationError("Q6_K weights must have scales of d times an int8 per 16 inputs")
    if not torch.equal(w.shift.float().cpu(), -kernels.Q6_K_ZERO_POINT * scale):
        raise QuantizationError(f"Q6_K weights must sit on zero point {kernels.Q6_K_ZERO_POINT}")
    return kernels.prepare_q6_k(w.codes.cpu(), sub.to(torch.int8), d)


# The 8-bit zero point a 5-bit zero point stands for (Q5_0 loads as q + 112 on Q8_0's 128; 5 bits: q on 16).
INT5_ZERO_POINT_AS_8 = 128


def _int5_packed(w: AffineWeight) -> PackedInt:
    """A 5-bit-spanning AffineWeight packed for the 5-bit tile: codes less ``q5_base`` on the zero point
    moved with them when the weight's is 128 (Q5_0: 16), else the codes as they are with the weight's
    own shift (base 0 only: the shift's floats are kept as they are). Raises if a code lies outside the
    32 values or the base fits neither form."""
    base = w.q5_base or 0
    codes = w.codes.cpu()
    if codes.numel() and (int(codes.min()) < base or int(codes.max()) > base + 31):
        raise QuantizationError(f"5-bit weights must be codes in {base}..{base + 31}")
    zero_point = INT5_ZERO_POINT_AS_8 - base
    if _zero_point(w) == INT5_ZERO_POINT_AS_8 and 0 <= zero_point < 32:
        return kernels.prepare_int5(codes - base, w.scale.float(), None, w.group_size, zero_point=zero_point)
    if base:
        raise QuantizationError(f"5-bit codes from {base} need the zero point {INT5_ZERO_POINT_AS_8}")
    return kernels.prepare_int5(codes, w.scale.float(), w.shift.float(), w.group_size)


def _iq4_packed(w: AffineWeight) -> PackedInt:
    """An IQ4-valued AffineWeight's codes as table indices, packed for the int4 tile with the table's zero
    point. Raises if a code is not one of the table's, or the shift is not the zero point's."""
    index = torch.full((256,), 255, dtype=torch.uint8)
    index[kernels.iq4_codes(torch.arange(16)).long()] = torch.arange(16, dtype=torch.uint8)
    codes = w.codes.cpu()
    indices = torch.empty_like(codes)
    rows = max(1, (1 << 20) // max(1, codes.shape[1]))  # the lookup's int64 copy: ~8 MB at a time
    for r in range(0, codes.shape[0], rows):
        indices[r : r + rows] = index[codes[r : r + rows].long()]
    if bool((indices == 255).any()) or _zero_point(w) != kernels.IQ4_ZERO_POINT:
        raise QuantizationError("IQ4 weights must be codes of the IQ4 table's values on zero point 128")
    zero_point = kernels.IQ4_ZERO_POINT
    return kernels.prepare_int4(indices, w.scale.float(), None, w.group_size, zero_point=zero_point)
