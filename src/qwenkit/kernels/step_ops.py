"""The decode step's row ops on the C++ CPU kernels: the sampler's passes over a step's logits, the decoder
layer's norm, SwiGLU, RoPE and attention, and whole decoder layers in one call. The norm, SwiGLU and RoPE
serve a prompt's hundreds of rows too (faster than torch's chains of kernels there, and with the same
rounding for a token either way); whole layers in one call are for a decode step's few rows (callers
check ``SMALL_OP_ROWS``)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain

import torch

from qwenkit.kernels.ops import available, op


def argmax(x: torch.Tensor) -> torch.Tensor:
    """``x.argmax(-1)`` for float32 or bf16 logits (M, V): the first index of each row's maximum (or
    first NaN), vectorized and in parallel over chunks of the rows (torch's is one scalar pass per row).
    The sampler's row passes read bf16 logits as they come from the model's head, each value widened
    as it is read, so a step's logits are not first copied to float32 (3 MB for 16 rows of a 49k
    vocabulary, 10 MB of a 152k one)."""
    return op("argmax_rows")(x)


def widen(x: torch.Tensor) -> torch.Tensor:
    """``x.float()`` for bf16 logits (M, V), on the kernels' threads: a step's own torch ops run on OpenMP,
    whose worker then spins for milliseconds beside the kernels' workers."""
    return op("widen_rows")(x)


def finite_rows(x: torch.Tensor) -> torch.Tensor:
    """(M,) bool: whether each row of float32 or bf16 logits (M, V) holds no inf or NaN (as ``widen``,
    why)."""
    return op("finite_rows")(x)


def topk(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.topk(x.float(), k)`` for float32 or bf16 logits (M, V) without NaN: the k largest of each
    row, sorted descending, ties to the lower index; one vector pass per row against a running threshold
    (torch's took 0.5 ms for 16 rows of a 49k vocabulary, this a tenth of that)."""
    return op("topk_rows")(x, k)


def logsumexp(x: torch.Tensor, scales: Sequence[float]) -> torch.Tensor:
    """``torch.logsumexp(x.float() * scales[:, None], -1)`` for float32 or bf16 logits (M, V) and a
    scale > 0 per row (1 / its temperature), in one kernel: torch's took 2.5 ms for 16 rows of a 49k
    vocabulary."""
    return op("logsumexp_rows")(x, [float(s) for s in scales])


def sample_cdf(
    x: torch.Tensor, scales: Sequence[float], min_ps: Sequence[float], uniforms: Sequence[float]
) -> torch.Tensor:
    """(M,) int64 draws from softmax(x * scale) of float32 or bf16 logits (M, V) per row, tokens below
    min_p times the most likely one removed: the first index whose cumulative probability exceeds the row's
    uniform in [0, 1). One kernel, no (M, V) temporaries (torch's chain took 12 ms at 16 x 152k)."""
    return op("sample_cdf_rows")(
        x, [float(s) for s in scales], [float(p) for p in min_ps], [float(u) for u in uniforms]
    )


def sample_top_p(
    x: torch.Tensor,
    scales: Sequence[float],
    top_ps: Sequence[float],
    min_ps: Sequence[float],
    keys: Sequence[int],
) -> torch.Tensor:
    """(M,) int64 top-p draws from softmax(x * scale) of float32 or bf16 logits (M, V), min-p applied
    within the nucleus, by the race argmax p / E with E hashed from each token's id and the row's key
    (the noise of the sampler's ``_keyed_exp``). The nucleus comes from a histogram of the
    probabilities: nothing is sorted but the tokens at its edge."""
    return op("sample_top_p_rows")(
        x,
        [float(s) for s in scales],
        [float(p) for p in top_ps],
        [float(p) for p in min_ps],
        [int(k) for k in keys],
    )


SMALL_OP_ROWS = 16  # a step of at most this many decoding rows runs its layers in one decode_layers call


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * bf16(rms_norm(x.float()))`` for bf16 x (..., K) and weight (K,), in one call."""
    return op("rms_norm")(x, weight, eps)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for bf16 x = [gate | up] (..., 2F) -> (..., F), rounded as torch rounds it."""
    return op("silu_mul")(x)


def pack_lora(at: torch.Tensor, bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`lora_add_`'s tiles of at (S, K, R), A transposed, and bt (S, R, N), B transposed, R a
    multiple of 16: (S, R/16, K, 16) and (S, ceil(N/16), R, 16) in bf16, N zero-padded, so that every
    pass of the kernel reads its weights straight through memory, half the bytes of float32 (the
    products still run in float32)."""
    S, K, R = at.shape
    N = bt.shape[2]
    at_tiles = (
        at.reshape(S, K, R // 16, 16)
        .permute(0, 2, 1, 3)
        .to(torch.bfloat16, memory_format=torch.contiguous_format)
    )
    padded = torch.nn.functional.pad(bt, (0, -N % 16))
    bt_tiles = (
        padded.reshape(S, R, -1, 16)
        .permute(0, 2, 1, 3)
        .to(torch.bfloat16, memory_format=torch.contiguous_format)
    )
    return at_tiles, bt_tiles


def lora_add_(
    y: torch.Tensor, x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor, slots: torch.Tensor
) -> None:
    """Served LoRA adapters' updates, in place: row m of bf16 y (M, N) gains ``bf16(B_s A_s x[m])`` for
    its slot s = slots[m] (0: none), with bf16 x (M, K) and the adapters' pairs in :func:`pack_lora`'s
    tiles (at, bt); each row's sums in an order fixed whatever the other rows are, A and B read once for
    all the rows of an adapter."""
    op("lora_add_")(y, x, at, bt, slots)


def decode_attention(
    q: torch.Tensor,
    k_pool: torch.Tensor,
    v_pool: torch.Tensor,
    gather: torch.Tensor,
    positions: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """One query per row over its keys, read in place from the KV pool (no gathered copy).

    q (B, H, D) bf16; pools (slots, Hkv, D) bf16; gather (B, S) int64 slot of each key; positions (B,):
    row b sees keys 0..positions[b]. Returns (B, H, D) bf16; query head i reads KV head i // (H / Hkv).
    """
    return op("decode_attention")(q, k_pool, v_pool, gather, positions, scale)


def prefill_attention_runs(head_dim: int) -> bool:
    """Whether :func:`prefill_attention` runs here: AMX in use and a head dim it takes (a multiple of 32,
    up to 256). Elsewhere torch's SDPA attends a prompt chunk."""
    return available() and torch.ops.qwenkit.prefill_attention_runs(head_dim)


def prefill_attention(
    q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, slots: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Causal attention of a prompt chunk's n queries (positions start .. start + n - 1) over keys 0 ..
    start + n - 1, read in place from the KV pool on AMX (no gathered copy, no mask).

    q (n, H, D) bf16, each row's heads D apart; pools (slots, Hkv, D) bf16 holding the chunk's own keys
    already; slots (start + n,) int64: where key position j is. Returns (n, H, D) bf16.
    """
    return op("prefill_attention")(q, k_pool, v_pool, slots, start, scale)


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
    """Rotate-half RoPE in place on bf16 x (B, T, heads, D) (last dimension contiguous), the first rot
    features of each head, with cos/sin (B, T, rot): bf16 rounds each step as torch does in bf16,
    float32 rotates in float and rounds once (Qwen v1)."""
    op("rope_")(x, cos, sin)


@dataclass(frozen=True)
class ExpertWeights:
    """A MoE layer's routed experts as :func:`moe_experts` reads them (built by ``quant.fused``): for
    expert e, ``tensors[e]`` its gate/up then its down product (packed weight or codes, scale, shift,
    bias each; an empty tensor where absent) and ``ints[e]`` per product its bits, group size, outputs,
    zero point and bias mode, as in :class:`DecodeLayerWeights`."""

    tensors: list[list[torch.Tensor]]
    ints: list[list[int]]


def moe_experts(
    x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, experts: ExpertWeights
) -> torch.Tensor:
    """Routed experts of a MoE layer over bf16 rows x (M, hidden): each row's ``weights``-weighted sum of
    its experts ``ids`` (M, top_k), bit for bit what ``MoEMLP``'s loop over experts computes, in one call
    that is passed only the experts some row picks."""
    active = torch.unique(ids).tolist()
    tensors = [t for e in active for t in experts.tensors[e]]
    ints = [v for e in active for v in (e, *experts.ints[e])]
    return op("moe_experts")(x, ids, weights, tensors, ints)


@dataclass(frozen=True)
class DecodeLayerWeights:
    """A decoder layer's weights as :func:`decode_layers`' argument lists (built by ``quant.fused``).

    tensors: input norm weight, post-attention norm weight, then for q/k/v (or q alone), o, gate/up and
    down: packed weight or codes, scale, shift, bias; then the q and k norm weights (Qwen3); then k and
    v as two more linears where q/k/v are three products (weights of different kinds); then a MoE
    layer's router weight and its shared expert's gate (Qwen2-MoE) packed for :func:`linear_bf16`; an
    empty tensor where absent (a MoE layer's gate/up and down are its shared expert's). ints: heads, KV
    heads, head dim, then per linear (k's and v's last): bits (16 for bf16, 0 absent), group size,
    outputs, zero point, bias mode (0 none, 1 added before rounding, 2 added to the rounded output); then
    a MoE layer's routed experts, top k and whether the top k weights are renormalized (0, 0, 0 for a
    dense layer); then served LoRA adapters' at and bt (:func:`lora_add_`) of q/k/v (their outputs side
    by side), o, gate/up and down (empty where absent). floats: the two norms' eps, the attention scale,
    the q and k norms' eps. experts: a MoE layer's routed experts.
    """

    tensors: list[torch.Tensor]
    ints: list[int]
    floats: list[float]
    experts: ExpertWeights | None = None


@dataclass(frozen=True)
class DecodeRun:
    """A run of consecutive decoder layers' weights and their K/V pools, held by the C++ library once
    (:func:`decode_run`), so that a decode step passes only what changes: passing about 900 tensors and
    1,000 ints with every step cost the bundled 135M model 90 us a step, 2% of its batch-1 step."""

    handle: torch.ScriptObject
    layers: int


def decode_run(
    weights: Sequence[DecodeLayerWeights], k_pools: Sequence[torch.Tensor], v_pools: Sequence[torch.Tensor]
) -> DecodeRun:
    """Layers ``weights`` with the pools ``k_pools[i]``/``v_pools[i]`` they write and read, for
    :func:`decode_layers`. The run holds references to all of them."""
    op("decode_layers")  # loads the library, which defines the class
    tensors = list(chain.from_iterable(w.tensors for w in weights))
    ints = list(chain.from_iterable(w.ints for w in weights))
    floats = list(chain.from_iterable(w.floats for w in weights))
    experts = [w.experts for w in weights if w.experts is not None]
    expert_tensors = [t for e in experts for per_expert in e.tensors for t in per_expert]
    expert_ints = [i for e in experts for per_expert in e.ints for i in per_expert]
    handle = torch.classes.qwenkit.DecodeRun(
        tensors, ints, floats, list(k_pools), list(v_pools), expert_tensors, expert_ints
    )
    return DecodeRun(handle, len(weights))


def decode_layers(
    x: torch.Tensor,
    run: DecodeRun,
    slots: torch.Tensor,
    gather: torch.Tensor,
    positions: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    adapters: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consecutive decoder layers for a decode step's rows x (M <= 16, hidden) bf16, in one call, each
    bit for bit what its modules compute: layer i of the run writes the step's K/V into its pools at
    ``slots``, attends as :func:`decode_attention` over ``gather``/``positions`` and rotates with cos/sin
    (1, M, rot) as :func:`rope_`. Returns (M, hidden). One call for all layers: a call per layer cost
    about 15 us of Python and argument parsing (the bundled model decodes 4.6% faster at batch 1). The
    rows go through in :func:`decode_row_groups` groups side by side, with the same results.
    ``adapters``: each row's served LoRA adapter slot, for the layers' :func:`lora_add_` updates."""
    return op("decode_layers")(run.handle, x, slots, gather, positions, cos, sin, adapters)


def decode_row_groups(run: DecodeRun, rows: int) -> int:
    """How many groups of rows :func:`decode_layers` takes through ``run``'s layers side by side, each on
    one thread with all of its work: 2 for 9-16 rows of small int4 layers (at most 8M multiply-adds a
    layer and row) where the kernels run on two threads, else 1 (every op split across the threads).
    The bundled model's 16-row steps decode 12% faster so on two cores (2026-12-04); larger layers, int8
    and bf16 ones lose by it (csrc/decode_layers.h, ``DecodeRun::row_groups``)."""
    return int(op("decode_row_groups")(run.handle, rows))
