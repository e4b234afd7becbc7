"""GGUF quantized blocks -> integer codes with per-group scale and shift, exactly, without dequantizing.

Every block format below stores ``w = code * scale + shift`` for contiguous groups of 32 weights, with a
float16 scale (and minimum) per group, so a block decodes to a row of uint8 codes and one (scale, shift)
pair per group:

=======  ====  =========================================  ===============================
type     bits  codes                                      scale, shift
=======  ====  =========================================  ===============================
Q8_0     8     int8 q + 128                               d, -128 d
Q4_0     4     nibble q                                   d, -8 d
Q4_1     4     nibble q                                   d, m
Q5_0     8     5-bit q + 112 (in 8-bit codes)             d, -128 d
Q5_1     8     5-bit q                                    d, m
Q4_K     4     nibble q, 8 sub-blocks of 32 per 256       d * sc, -dmin * m (6-bit sc, m)
Q5_K     8     5-bit q, 8 sub-blocks of 32 per 256        d * sc, -dmin * m
IQ4_NL   8     table[nibble] + 128                        d, -128 d
IQ4_XS   8     table[nibble] + 128, 8 sub-blocks per 256  d * (ls - 32), -128 d (6-bit ls)
=======  ====  =========================================  ===============================

The IQ4 types' nibbles index a fixed table of 16 int8 values (ggml's ``kvalues_iq4nl``, -127..113, not
evenly spaced), so no 4-bit code times a scale gives them: they load as int8 codes (the table's value +
128, Q8_0's zero point), the values exactly, marked ``AffineWeight.iq4`` so that a kernel that looks the
table up (``Avx512Iq4Kernel``, every build) holds them as 4-bit indices again (the int8 kernels ran
them before, at twice the file's bytes for those weights). The Q5 types' codes span 32 values (Q5_0's
``q + 112`` on Q8_0's zero point, so its projections fuse with Q8_0 ones where they run as int8), marked
``AffineWeight.q5_base``, so that the 5-bit kernel (``Avx512Int5Kernel``, every build) holds them at
5 bits again.

Each product ``code * scale`` is exact in float32 (at most 8 code bits times an 11-bit float16
mantissa), and each scale and shift is exact, so ``code * scale + shift`` rounds once, where gguf-py's
own dequantizer rounds: the two agree bit for bit (tests/gguf/test_gguf_quant.py). The K types (and
IQ4_XS) are the exception: a sub-block's ``d * sc`` and ``dmin * m`` have up to 17 significant bits, and
kept exact they need float32, 8 bytes per 32 weights (0.75 bytes a weight for Q4_K's 0.56). They are
rounded to the nearest float16 value instead, so the kernels hold them at 2 bytes each: a weight moves by
at most 2^-11 of ``|code * scale| + |shift|``, under a hundredth of the block's own step.
Q6_K (the output tensor and half the ``ffn_down``/``attn_v`` of every Q4_K_M file) has an int8 scale
per 16 weights times a float16 d per 256. Where its kernel runs (``Avx512Q6KKernel``, every build) it
loads exactly (:func:`decode_q6_k`: codes 0..63 on zero point 32, ``scale = d * sc`` per 16, exact in
float32, and d as ``AffineWeight.superscale``). Elsewhere, and Q2_K and Q3_K everywhere (groups of 16,
which no other kernel runs), they are decoded to float by gguf-py and rounded again to int8 codes per
group of 32 (:func:`requantize_int8`, Q8_0's layout): each weight moves by at most half an int8 step of
its group (1/254 of the group's largest), an eighth of Q6_K's own step and about what a bfloat16 copy's
rounding moves it (up to 1/256 of the weight itself), at half a bfloat16 copy's bytes.

Decoding is one pass of qwenkit's C++ kernels over the blocks where they run (``decode_gguf_blocks``,
``requantize_q6_k``), else numpy over all blocks at once (a view of the memory-mapped bytes, no per-block
Python); the two give the same values bit for bit (tests/gguf/test_gguf_quant.py). A 1.5B Q4_K_M file's
load took 21.9 s on numpy and gguf-py (2026-12-01, Xeon, one thread), most of it here.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from qwenkit.checkpoint.gguf_types import GGML_QUANT_SIZES, GGMLQuantizationType
from qwenkit.kernels import available as kernels_available
from qwenkit.kernels import ops as kernel_ops
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.quantizer import round_scale

Q = GGMLQuantizationType
GROUP = 32
# bits of the codes each type decodes to (the kernel's width, not the format's)
AFFINE_BITS: dict[GGMLQuantizationType, int] = {
    Q.Q8_0: 8,
    Q.Q4_0: 4,
    Q.Q4_1: 4,
    Q.Q5_0: 8,
    Q.Q5_1: 8,
    Q.Q4_K: 4,
    Q.Q5_K: 8,
    Q.IQ4_NL: 8,
    Q.IQ4_XS: 8,
}
# what IQ4_NL's and IQ4_XS's 4-bit indices stand for (ggml's kvalues_iq4nl), as int8 codes + 128
IQ4_CODES = kernel_ops.iq4_codes(torch.arange(16)).numpy()
IQ4_TYPES = (Q.IQ4_NL, Q.IQ4_XS)  # marked AffineWeight.iq4: kernels may hold their codes at 4 bits
# the 5-bit types' lowest 8-bit code (AffineWeight.q5_base): kernels may hold their codes at 5 bits
Q5_BASES = {Q.Q5_0: 112, Q.Q5_1: 0, Q.Q5_K: 0}


def take_rows(w: AffineWeight, index: torch.Tensor | slice) -> AffineWeight:
    """The weight's output rows ``index`` (a permutation or a slice), codes and scales alike."""
    return replace(
        w,
        codes=w.codes[index].contiguous(),
        scale=w.scale[:, index].contiguous(),
        shift=w.shift[:, index].contiguous(),
        superscale=None if w.superscale is None else w.superscale[:, index].contiguous(),
    )


# Types loaded as int8 codes by rounding their decoded floats again (groups of 16: no kernel runs them).
REQUANTIZED = (Q.Q2_K, Q.Q3_K, Q.Q6_K)
REQUANTIZED_BITS = 8


def requantize_int8(weight: torch.Tensor) -> AffineWeight:
    """A float (out, in) weight as symmetric int8 codes per group of 32 (``in`` a multiple of 32): each
    group's scale is its largest |w| / 127 rounded up to a float16 value, code = round(w / scale) + 128,
    so ``|w - (code - 128) * scale| <= scale / 2``."""
    out_f, in_f = weight.shape
    if in_f % GROUP:
        raise ValueError(f"cannot requantize a weight of {in_f} inputs in groups of {GROUP}")
    groups = weight.float().reshape(out_f, in_f // GROUP, GROUP)
    scale = round_scale(groups.abs().amax(-1, keepdim=True) / 127)  # (out, G, 1), never 0
    codes = (torch.round(groups / scale).clamp(-127, 127) + 128).to(torch.uint8).reshape(out_f, in_f)
    scale = scale.view(out_f, -1).T.contiguous()
    return AffineWeight(codes, scale, -128 * scale, GROUP, REQUANTIZED_BITS)


def requantize_q6_k(raw: np.ndarray, shape: tuple[int, ...]) -> AffineWeight:
    """:func:`requantize_int8` of a Q6_K weight's gguf-py floats, the same codes and scales, in one pass of
    qwenkit's kernels over the raw blocks (``raw``: the tensor's bytes; ``shape``: (out, in)). Needs
    ``kernels.available()``. A 1.5B model's Q6_K tensors: 3.1 s on one thread instead of 14 s, and no float
    copy of the weight (0.9 GB for its embedding)."""
    n, k = shape
    codes, scale = kernel_ops.run_pass(
        "requantize_q6_k", n * k, torch.from_numpy(np.ascontiguousarray(raw).reshape(-1)), n, k
    )
    return AffineWeight(codes, scale, -128 * scale, GROUP, REQUANTIZED_BITS)


def decode_q6_k(raw: np.ndarray, shape: tuple[int, ...]) -> AffineWeight:
    """A Q6_K weight exactly (``raw``: its bytes; ``shape``: (out, in)), for the Q6_K kernel: codes q in
    0..63 on zero point 32, scale ``d * sc`` per 16 inputs (exact in float32: an 11-bit d times an int8),
    and d itself as ``superscale``. One pass of qwenkit's kernels; only where ``kernels.runs_q6_k()``."""
    n, k = shape
    codes, sub, d = kernel_ops.run_pass(
        "decode_q6_k", n * k, torch.from_numpy(np.ascontiguousarray(raw).reshape(-1)), n, k
    )
    scale = d.repeat_interleave(16, dim=0) * sub.float()
    return AffineWeight(codes, scale, -kernel_ops.Q6_K_ZERO_POINT * scale, 16, 8, superscale=d)


def can_decode(qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """True for a 2-D weight of a type above (GGUF rows are whole blocks, so ``in`` divides evenly)."""
    return qtype in AFFINE_BITS and len(shape) == 2


def decode_affine(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> AffineWeight:
    """Decode one 2-D GGUF tensor's blocks (``data``: its raw bytes, any shape) into codes, scales, shifts.

    ``shape`` is (out, in) in PyTorch order.
    """
    if not can_decode(qtype, shape):
        raise ValueError(f"cannot decode {qtype.name} of shape {shape} as integer codes")
    out_f, in_f = shape
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    blocks = np.ascontiguousarray(data).view(np.uint8).reshape(-1, type_size)
    if blocks.shape[0] * block_size != out_f * in_f:
        raise ValueError(f"{qtype.name} data holds {blocks.shape[0]} blocks, not {out_f} x {in_f} weights")
    if kernels_available():  # one C++ pass, the same values as the numpy decoders below
        codes, scale, shift = kernel_ops.run_pass(
            "decode_gguf_blocks", out_f * in_f, torch.from_numpy(blocks.reshape(-1)), int(qtype), out_f, in_f
        )
        return AffineWeight(
            codes, scale, shift, GROUP, AFFINE_BITS[qtype], qtype in IQ4_TYPES, Q5_BASES.get(qtype)
        )
    codes, scale, shift = _DECODERS[qtype](blocks)  # (nb, block) uint8, (nb, subblocks) float32 x2
    groups = in_f // GROUP
    return AffineWeight(
        codes=torch.from_numpy(codes.reshape(out_f, in_f)),
        scale=torch.from_numpy(np.ascontiguousarray(scale.reshape(out_f, groups).T)),
        shift=torch.from_numpy(np.ascontiguousarray(shift.reshape(out_f, groups).T)),
        group_size=GROUP,
        bits=AFFINE_BITS[qtype],
        iq4=qtype in IQ4_TYPES,
        q5_base=Q5_BASES.get(qtype),
    )


def _f16(raw: np.ndarray) -> np.ndarray:
    """(nb, 2) uint8 -> (nb,) float32."""
    return np.ascontiguousarray(raw).view(np.float16).reshape(-1).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 16) bytes -> (nb, 32) codes: low nibbles are elements 0..15, high nibbles 16..31."""
    out = np.empty((qs.shape[0], 2 * qs.shape[1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, : qs.shape[1]])
    np.right_shift(qs, 4, out=out[:, qs.shape[1] :])
    return out


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """(nb, 4) bytes, a little-endian uint32 whose bit j is element j's fifth bit -> (nb, 32) of 0 or 16."""
    bits = np.unpackbits(np.ascontiguousarray(qh), axis=1, bitorder="little")  # (nb, 32)
    return bits << 4


def _q8_0(b: np.ndarray):
    d = _f16(b[:, 0:2])
    return b[:, 2:] ^ np.uint8(0x80), d, -128 * d  # int8 + 128 is the sign bit flipped


def _q4_0(b: np.ndarray):
    d = _f16(b[:, 0:2])
    return _nibbles(b[:, 2:]), d, -8 * d


def _q4_1(b: np.ndarray):
    return _nibbles(b[:, 4:]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _q5_0(b: np.ndarray):
    # q - 16 held as (q + 112) - 128: Q8_0's zero point, so both run the int8 kernel's integer zero point
    # (no float shift) and a layer's Q5_0 and Q8_0 projections fuse into one product
    d = _f16(b[:, 0:2])
    return (_nibbles(b[:, 6:]) | _high_bits(b[:, 2:6])) + np.uint8(112), d, -128 * d


def _q5_1(b: np.ndarray):
    return _nibbles(b[:, 8:]) | _high_bits(b[:, 4:8]), _f16(b[:, 0:2]), _f16(b[:, 2:4])


def _k_scales(b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-block header -> (nb, 8) sub-block scales ``d * sc`` and shifts ``-dmin * m``,
    each rounded to the nearest float16 value (see the module's note)."""
    from gguf.quants import Q4_K  # the fallback without the kernels: gguf-py is slow to import

    d, dmin = _f16(b[:, 0:2]), _f16(b[:, 2:4])
    sc, m = Q4_K.get_scale_min(b[:, 4:16])
    scale, shift = d[:, None] * sc.astype(np.float32), -(dmin[:, None] * m.astype(np.float32))
    return _to_f16_values(scale), _to_f16_values(shift)


def _to_f16_values(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to the nearest float16 value, kept as float32 (so the kernels pack them at
    two bytes); values beyond float16's normal range (where it keeps fewer than 11 bits) stay float32."""
    with np.errstate(over="ignore"):
        r = x.astype(np.float16).astype(np.float32)
    normal = np.isfinite(r) & ((np.abs(x) >= np.finfo(np.float16).tiny) | (x == 0))
    return np.where(normal, r, x)


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """(nb, 128) bytes -> (nb, 256): each 32-byte run holds sub-block 2c in low and 2c+1 in high nibbles."""
    q = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (q & 0x0F).reshape(-1, 256)


def _q4_k(b: np.ndarray):
    scale, shift = _k_scales(b)
    return _k_nibbles(b[:, 16:]), scale, shift


def _q5_k(b: np.ndarray):
    scale, shift = _k_scales(b)
    qh = b[:, 16:48].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    high = ((qh & 1) << 4).reshape(-1, 256)  # bit s of byte j: element j of sub-block s
    return _k_nibbles(b[:, 48:]) | high, scale, shift


def _iq4_nl(b: np.ndarray):
    d = _f16(b[:, 0:2])
    return IQ4_CODES[_nibbles(b[:, 2:])], d, -128 * d


def _iq4_xs(b: np.ndarray):
    d = _f16(b[:, 0:2])
    high = b[:, 2:4].copy().view(np.uint16)  # (nb, 1): 2 bits a sub-block
    high = (high >> (2 * np.arange(8, dtype=np.uint16))) & 3
    low = (b[:, 4:8, None] >> np.array([0, 4], dtype=np.uint8)).reshape(-1, 8) & 0x0F
    scale = _to_f16_values(d[:, None] * ((low | (high.astype(np.uint8) << 4)).astype(np.float32) - 32))
    nibbles = _nibbles(b[:, 8:].reshape(-1, 16)).reshape(-1, 256)  # 8 runs of IQ4_NL's layout
    return IQ4_CODES[nibbles], scale, -128 * scale


_DECODERS = {
    Q.Q8_0: _q8_0,
    Q.Q4_0: _q4_0,
    Q.Q4_1: _q4_1,
    Q.Q5_0: _q5_0,
    Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k,
    Q.Q5_K: _q5_k,
    Q.IQ4_NL: _iq4_nl,
    Q.IQ4_XS: _iq4_xs,
}
