"""GGUF tensors -> Hugging Face tensors: names, dequantization, and llama.cpp's layout changes undone.

llama.cpp renames every tensor (``blk.N.attn_q.weight``), stores most of them quantized, for the
``llama`` architecture permutes the rows of ``attn_q``/``attn_k`` so its rotary kernel can rotate
adjacent pairs, and stacks a MoE layer's routed experts into one 3-D tensor per projection
(``ffn_gate_exps`` is (experts, moe_ffn, hidden)). This module turns one GGUF tensor back into what
the Hugging Face checkpoint held, so the rest of qwenkit only ever sees Hugging Face names and the
rotate-half layout.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from qwenkit.checkpoint.gguf_quant import take_rows
from qwenkit.checkpoint.gguf_types import GGMLQuantizationType
from qwenkit.quant.affine import AffineWeight

Q = GGMLQuantizationType
# The types we read and test. gguf-py can decode more (the IQ and ternary types), but we refuse what we
# have not checked rather than hand a model weights we cannot vouch for.
SUPPORTED_TYPES: frozenset[GGMLQuantizationType] = frozenset(
    {
        Q.F32, Q.F16, Q.BF16,
        Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0,
        Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K,
        Q.IQ4_NL, Q.IQ4_XS,
    }
)  # fmt: skip

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
    "cls.output.weight": "score_head.weight",  # a reranker's rows of "yes" and "no" (gguf_rank)
}
# GGUF block tensor -> Hugging Face module under model.layers.N
_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",  # Qwen v1's mlp.w2: the branch that goes through SiLU
    "ffn_up": "mlp.up_proj",  # Qwen v1's mlp.w1
    "ffn_down": "mlp.down_proj",
    "attn_qkv": "self_attn.qkv",  # Qwen v1's fused c_attn; split into q/k/v_proj on the way out
    # Mixture of experts. *_exps hold every routed expert stacked on dim 0; split per expert on the way out.
    "ffn_gate_inp": "mlp.gate",  # the router
    "ffn_gate_exps": "mlp.experts.gate_proj",
    "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_STACKED = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\w+_proj)\.(\w+)$")
_BLOCK_NAME = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
# Which block tensors each architecture may carry; anything else is refused before any data is read.
_ARCH_BLOCK_TENSORS = {
    "llama": {"attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
              "ffn_down"},
    "qwen2": {"attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
              "ffn_down"},
    "qwen3": {"attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
              "attn_k_norm", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen": {"attn_norm", "ffn_norm", "attn_qkv", "attn_output", "ffn_gate", "ffn_up", "ffn_down"},
}  # fmt: skip
_MOE = {"ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"}
_SHARED_EXPERT = {"ffn_gate_inp_shexp", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp"}
# Dense ffn_* stay allowed: a layer listed in mlp_only_layers keeps a plain FFN.
_ARCH_BLOCK_TENSORS["qwen2moe"] = _ARCH_BLOCK_TENSORS["qwen2"] | _MOE | _SHARED_EXPERT
_ARCH_BLOCK_TENSORS["qwen3moe"] = _ARCH_BLOCK_TENSORS["qwen3"] | _MOE


@dataclass(frozen=True)
class HeadLayout:
    """What undoing llama.cpp's layout changes needs to know about attention heads."""

    architecture: str
    num_attention_heads: int
    num_key_value_heads: int


def hf_name(gguf_name: str, architecture: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None if this architecture has no such tensor.

    ``attn_qkv`` maps to a pseudo-name ``...self_attn.qkv.*`` that ``convert_tensor`` splits.
    """
    if gguf_name in _TOP_LEVEL:
        return _TOP_LEVEL[gguf_name]
    m = _BLOCK_NAME.match(gguf_name)
    if m is None:
        return None
    layer, kind, suffix = m.groups()
    if kind not in _ARCH_BLOCK_TENSORS.get(architecture, ()):
        return None
    return f"model.layers.{layer}.{_BLOCK[kind]}.{suffix}"


def dequantize_tensor(data: np.ndarray, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> torch.Tensor:
    """Decode one tensor to float32 with gguf-py's own dequantizer.

    ``shape`` is in PyTorch order (GGUF stores dimensions innermost first). F32 data comes back as a
    view of the (copy-on-write) memory map, so it is not copied; every other type is decoded into a
    fresh float32 array that torch then shares.
    """
    if qtype == Q.F32:
        array = data.view(np.float32)
    elif qtype == Q.F16:
        array = data.view(np.float16).astype(np.float32)
    else:  # block types (and BF16): gguf-py's decoders, imported only here (0.2-0.3 s to import)
        from gguf.quants import dequantize

        array = dequantize(data, qtype)
    if array.dtype != np.float32:  # BF16/F16 are already widened by gguf-py; this is a guard
        array = array.astype(np.float32)
    return torch.from_numpy(array.reshape(shape))


def unpermute_rows(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's ``permute`` of q/k rows for the ``llama`` architecture.

    The converter regroups each head's rows from rotate-half order [x0..x(d/2-1), y0..y(d/2-1)] into
    interleaved pairs [x0, y0, x1, y1, ...], i.e. it views rows as (head, 2, d/2) and swaps the last
    two axes. Viewing the stored rows as (head, d/2, 2) and swapping back restores Hugging Face's order.
    Works for weights (rows, in) and biases (rows,).
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot unpermute {rows} rows into {n_head} heads of even size")
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def split_names(name: str, shape: tuple[int, ...]) -> list[str]:
    """The Hugging Face names ``convert_tensor`` yields for ``name`` of ``shape``, without any data."""
    if ".self_attn.qkv." in name:
        return [name.replace(".qkv.", f".{p}.") for p in ("q_proj", "k_proj", "v_proj")]
    if (m := _STACKED.match(name)) is not None:
        prefix, proj, suffix = m.groups()
        return [f"{prefix}.{e}.{proj}.{suffix}" for e in range(shape[0])]
    return [name]


# Weights that may stay as integer codes: the projections a QuantizedLinear replaces (a MoE layer's
# routed experts too: llama.cpp's stacked tensor is split into one layer per expert) and the token
# embedding. Routers stay float: a small error in a router logit changes which experts run.
_IN_PRECISION = re.compile(
    r"^(lm_head|model\.embed_tokens"
    r"|model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|self_attn\.qkv|mlp\.(gate|up|down)_proj"
    r"|mlp\.shared_expert\.(gate|up|down)_proj|mlp\.experts\.(gate|up|down)_proj))\.weight$"
)


def keeps_precision(name: str) -> bool:
    """True for a weight that is loaded as integer codes when its GGUF type allows (see gguf_quant)."""
    return _IN_PRECISION.match(name) is not None


def is_stacked(name: str) -> bool:
    """True for llama.cpp's stacked routed experts (``ffn_*_exps``: (experts, rows, cols))."""
    return _STACKED.match(name) is not None


def convert_affine(name: str, w: AffineWeight, heads: HeadLayout) -> Iterator[tuple[str, AffineWeight]]:
    """``convert_tensor`` for integer codes: the same row permutation and QKV split, applied to the rows
    of codes, scales and shifts alike (quantization groups run along the input, so rows move whole)."""
    rows = w.codes.shape[0]
    if heads.architecture == "llama" and (".self_attn.q_proj." in name or ".self_attn.k_proj." in name):
        n_head = heads.num_attention_heads if ".q_proj." in name else heads.num_key_value_heads
        yield name, take_rows(w, unpermute_rows(torch.arange(rows), n_head))
        return
    if ".self_attn.qkv." in name:
        if rows % 3:
            raise ValueError(f"{name} has {rows} rows, not a multiple of 3 (Q, K, V)")
        part = rows // 3
        for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            yield name.replace(".qkv.", f".{proj}."), take_rows(w, slice(i * part, (i + 1) * part))
        return
    yield name, w


def convert_tensor(name: str, tensor: torch.Tensor, heads: HeadLayout) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield the Hugging Face tensor(s) one dequantized GGUF tensor stands for.

    ``name`` is already the Hugging Face name from ``hf_name``.
    """
    if heads.architecture == "llama":
        if ".self_attn.q_proj." in name:
            tensor = unpermute_rows(tensor, heads.num_attention_heads)
        elif ".self_attn.k_proj." in name:
            tensor = unpermute_rows(tensor, heads.num_key_value_heads)
    if (m := _STACKED.match(name)) is not None:
        # llama.cpp's stacked experts (E, rows, cols) -> one Hugging Face tensor per expert.
        prefix, proj, suffix = m.groups()
        if tensor.dim() != 3:
            raise ValueError(f"{name} should be stacked experts (3-D), not shape {tuple(tensor.shape)}")
        for e in range(tensor.shape[0]):
            yield f"{prefix}.{e}.{proj}.{suffix}", tensor[e]
        return
    if name.endswith(".mlp.shared_expert_gate.weight") and tensor.dim() == 1:
        tensor = tensor[None]  # llama.cpp may store the (1, hidden) sigmoid gate as (hidden,)
    if ".self_attn.qkv." in name:
        # Qwen v1's c_attn: [Q; K; V] stacked on the output rows, each hidden_size long (v1 has no GQA),
        # heads contiguous within each block and rotate-half order, so no permutation is needed.
        if tensor.shape[0] % 3:
            raise ValueError(f"{name} has {tensor.shape[0]} rows, not a multiple of 3 (Q, K, V)")
        for proj, part in zip(("q_proj", "k_proj", "v_proj"), tensor.chunk(3, dim=0), strict=True):
            yield name.replace(".qkv.", f".{proj}."), part
        return
    yield name, tensor
