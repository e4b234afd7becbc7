"""Fast CPU matrix-vector kernels (C++; AVX-512, AVX-VNNI or AVX2) for batch 1..16 decode, with a fallback.

Imports only torch, the standard library and qwenkit.errors; model/ and quant/ may import it. API:

    from qwenkit import kernels
    kernels.available() -> bool        # loads (building once, ~30 s) or says once why not; False under
                                       # QWENKIT_KERNELS=torch. Call it before using any op below.
    kernels.isa_level() -> str | None  # the build's instruction set: a key of build.ISA_LEVELS
    p = kernels.prepare_bf16(w)                   # w (N, K) -> tiles of 16 rows (one stream each)
    kernels.linear_bf16(x, p, bias=None)          # x (..., K) bf16 -> (..., N) bf16, fp32 accumulation
    kernels.use_amx(on=True) -> bool              # bf16 products on AMX where the CPU has it; on by
                                                  # default (QWENKIT_AMX=off at load: vector tiles)
    kernels.amx_in_use() -> bool
    kernels.bf16_runs_on_amx(in_features) -> bool  # this layer's product on AMX (K a multiple of 64)
    kernels.int_amx_rows(bits) -> int | None  # integer products of this many rows and more on AMX-INT8
    kernels.decode_prefetch(on=None) -> bool      # 1-4 row integer products prefetch the next tile
                                                  # (default: Intel, AMD Zen 2); None only asks
    kernels.unpack_bf16(p, rows=None)             # the (N, K) weight or some rows (embedding lookup)
    p = kernels.prepare_int8(codes, scale, shift, group_size, zero_point=0)  # codes (N, K) uint8
    p = kernels.prepare_int4(codes, scale, shift, group_size, zero_point=0)  # codes uint8 in 0..15
        # w[n, k] = (codes[n, k] - zero_point) * scale[g, n] + shift[g, n], g = k // group_size;
        # scale/shift (K/group_size, N), shift may be None; group_size a multiple of 32 dividing K.
        # GPTQ/RTN groups, per-channel (group_size = K); GGUF blocks of 32: Q8_0 = (q + 128, d, None,
        # zero_point=128), Q4_0 = (q, d, None, zero_point=8), Q4_1 = (q, d, m, zero_point=0);
        # IQ4_NL/IQ4_XS = (indices, d, None, zero_point=IQ4_ZERO_POINT): w = IQ4_VALUES[index] * d,
        # where kernels.runs_iq4_table() (every build); kernels.iq4_codes(indices) -> int8 codes
    p = kernels.prepare_int5(codes, scale, shift, group_size, zero_point=0)  # codes uint8 in 0..31
        # Q5_0 = (q, d, None, zero_point=16), Q5_1/Q5_K = (q, d, m, 0); where kernels.runs_int5()
    p = kernels.prepare_q6_k(codes, sub, d)  # GGUF Q6_K: q 0..63, int8 scales per 16, d per 256
        # w = d * sub * (q - 32); linear_q6_k(x, p) where kernels.runs_q6_k(); q6_k_sub_scales(p)
    kernels.linear_int8(x, p, bias=None) / linear_int5(x, p, bias=None) / linear_int4(x, p, bias=None)
        # x (..., K) bf16 or fp32 -> (..., N) in x's dtype; x is rounded to int8 per block of 32.
    kernels.dequantize(p, dtype, rows=None) -> (N, K) or (len(rows), K) float weights
    kernels.unpack_codes(p) -> (N, K) uint8 codes
    kernels.rms_norm(x, w, eps), kernels.silu_mul(x), kernels.rope_(x, cos, sin),
    kernels.decode_attention(q, k, v, gather, pos, scale)
        # the decode step's small ops (bf16), one call each
    kernels.lora_add_(y, x, *kernels.pack_lora(at, bt), slots)  # served LoRA adapters' updates, in place
    run = kernels.decode_run([DecodeLayerWeights(...), ...], k_pools, v_pools)  # held by the library
    kernels.decode_layers(x, run, slots, gather, pos, cos, sin)
        # a decode step's decoder layers for its rows, each as the ops above, all in one call
    kernels.concat_bf16([p, ...]) / kernels.concat_int([p, ...])  # outputs stacked (fused projections)
    kernels.argmax(logits)                        # float32 or bf16 (M, V) -> (M,) int64, as torch.argmax(-1)
    kernels.widen(logits), kernels.finite_rows(logits)  # bf16 -> float32 logits; rows without inf/NaN
        # (argmax, finite_rows and the four below read float32 or bf16 logits alike)
    kernels.topk(logits, k), kernels.logsumexp(logits, scales)  # the sampler's row passes,
    kernels.sample_cdf(logits, scales, min_ps, uniforms)        # and a whole-vocabulary draw,
    kernels.sample_top_p(logits, scales, top_ps, min_ps, keys)  # a top-p draw without sorting

The ops are torch ops (torch.ops.qwenkit.*), CPU only, meant for M <= 16 rows (they accept any M, in
passes of 8 rows over each weight tile, but torch's GEMMs win for prefill).
`python -m qwenkit.kernels.build` prebuilds the library.
"""

from qwenkit.kernels.ops import (
    ENV_SWITCH,
    IQ4_VALUES,
    IQ4_ZERO_POINT,
    KERNEL_CHOICES,
    Q6_K_GROUP,
    Q6_K_ZERO_POINT,
    KernelInputError,
    KernelsUnavailableError,
    PackedBf16,
    PackedInt,
    amx_in_use,
    available,
    bf16_runs_on_amx,
    decode_prefetch,
    int_amx_rows,
    iq4_codes,
    is_iq4_table,
    isa_level,
    linear_bf16,
    linear_int4,
    linear_int5,
    linear_int8,
    linear_q6_k,
    prepare_bf16,
    prepare_int4,
    prepare_int5,
    prepare_int8,
    prepare_q6_k,
    q6_k_sub_scales,
    runs_int5,
    runs_iq4_table,
    runs_q6_k,
    unpack_bf16,
    use_amx,
)
from qwenkit.kernels.step_ops import (
    SMALL_OP_ROWS,
    DecodeLayerWeights,
    DecodeRun,
    ExpertWeights,
    argmax,
    decode_attention,
    decode_layers,
    decode_row_groups,
    decode_run,
    finite_rows,
    logsumexp,
    lora_add_,
    moe_experts,
    pack_lora,
    prefill_attention,
    prefill_attention_runs,
    rms_norm,
    rope_,
    sample_cdf,
    sample_top_p,
    silu_mul,
    topk,
    widen,
)
from qwenkit.kernels.unpack import (
    concat_bf16,
    concat_int,
    dequantize,
    dequantize_rows,
    unpack_codes,
)

__all__ = [
    "ENV_SWITCH",
    "IQ4_VALUES",
    "IQ4_ZERO_POINT",
    "KERNEL_CHOICES",
    "Q6_K_GROUP",
    "Q6_K_ZERO_POINT",
    "SMALL_OP_ROWS",
    "DecodeLayerWeights",
    "DecodeRun",
    "ExpertWeights",
    "KernelInputError",
    "KernelsUnavailableError",
    "PackedBf16",
    "PackedInt",
    "amx_in_use",
    "argmax",
    "available",
    "bf16_runs_on_amx",
    "concat_bf16",
    "concat_int",
    "decode_attention",
    "decode_layers",
    "decode_prefetch",
    "decode_row_groups",
    "decode_run",
    "dequantize",
    "dequantize_rows",
    "finite_rows",
    "int_amx_rows",
    "iq4_codes",
    "is_iq4_table",
    "isa_level",
    "linear_bf16",
    "linear_int4",
    "linear_int5",
    "linear_int8",
    "linear_q6_k",
    "logsumexp",
    "lora_add_",
    "moe_experts",
    "pack_lora",
    "prefill_attention",
    "prefill_attention_runs",
    "prepare_bf16",
    "prepare_int4",
    "prepare_int5",
    "prepare_int8",
    "prepare_q6_k",
    "q6_k_sub_scales",
    "rms_norm",
    "rope_",
    "runs_int5",
    "runs_iq4_table",
    "runs_q6_k",
    "sample_cdf",
    "sample_top_p",
    "silu_mul",
    "topk",
    "unpack_bf16",
    "unpack_codes",
    "use_amx",
    "widen",
]
