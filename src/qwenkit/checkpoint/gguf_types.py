"""GGUF's type codes and block sizes: the small tables of the format that every GGUF open needs.

They are also in gguf-py (``gguf.constants``), but importing any part of gguf-py imports all of it
(reader, writer, quantizers, tensor-name maps, yaml): 0.2-0.3 s of every start on a 2-core VM
(2026-12-02), for two tables. So the tables live here, with the same names and values (a test
compares them with gguf-py's, member by member), and gguf-py is imported only where its code runs:
the float decoders of the rare block types, and the writers.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum


class GGMLQuantizationType(IntEnum):
    """ggml's tensor types (``enum ggml_type``); the numbers are what GGUF files store."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q8_1 = 9
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    Q8_K = 15
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    I8 = 24
    I16 = 25
    I32 = 26
    I64 = 27
    F64 = 28
    IQ1_M = 29
    BF16 = 30
    TQ1_0 = 34
    TQ2_0 = 35
    MXFP4 = 39
    NVFP4 = 40
    Q1_0 = 41


_T = GGMLQuantizationType
# (values a block, bytes a block), as ggml's type traits
GGML_QUANT_SIZES: dict[GGMLQuantizationType, tuple[int, int]] = {
    _T.F32: (1, 4), _T.F16: (1, 2), _T.Q4_0: (32, 18), _T.Q4_1: (32, 20), _T.Q5_0: (32, 22),
    _T.Q5_1: (32, 24), _T.Q8_0: (32, 34), _T.Q8_1: (32, 40), _T.Q2_K: (256, 84), _T.Q3_K: (256, 110),
    _T.Q4_K: (256, 144), _T.Q5_K: (256, 176), _T.Q6_K: (256, 210), _T.Q8_K: (256, 292),
    _T.IQ2_XXS: (256, 66), _T.IQ2_XS: (256, 74), _T.IQ3_XXS: (256, 98), _T.IQ1_S: (256, 50),
    _T.IQ4_NL: (32, 18), _T.IQ3_S: (256, 110), _T.IQ2_S: (256, 82), _T.IQ4_XS: (256, 136),
    _T.I8: (1, 1), _T.I16: (1, 2), _T.I32: (1, 4), _T.I64: (1, 8), _T.F64: (1, 8), _T.IQ1_M: (256, 56),
    _T.BF16: (1, 2), _T.TQ1_0: (256, 54), _T.TQ2_0: (256, 66), _T.MXFP4: (32, 17), _T.NVFP4: (64, 36),
    _T.Q1_0: (128, 18),
}  # fmt: skip


class GGUFValueType(IntEnum):
    """The types of GGUF metadata values."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


def quant_shape_to_byte_shape(shape: Sequence[int], quant_type: GGMLQuantizationType) -> tuple[int, ...]:
    """The byte array shape of a tensor of ``shape`` stored as ``quant_type`` blocks (rows whole blocks)."""
    block_size, type_size = GGML_QUANT_SIZES[quant_type]
    if shape[-1] % block_size:
        raise ValueError(f"rows of {shape[-1]} values are not whole {quant_type.name} blocks of {block_size}")
    return (*shape[:-1], shape[-1] // block_size * type_size)
