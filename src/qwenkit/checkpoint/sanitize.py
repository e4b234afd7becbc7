"""Map a source checkpoint's tensor names onto ours (Hugging Face Qwen2 names), in one place.

Qwen v1 is the only family with different names: ``transformer.h.N.*``, a fused ``c_attn`` holding
[Q; K; V] stacked on the output dimension, and ``w2`` as the SwiGLU gate (``w1`` is the up projection).
GPTQ tensor sets of ``c_attn`` split the same way along their output columns. The v1 -> qwen2 converter
is this function plus the saver; there is no second copy of the mapping.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import torch

from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError

_V1_RENAMES = [
    (re.compile(r"^transformer\.wte\.weight$"), "model.embed_tokens.weight"),
    (re.compile(r"^transformer\.ln_f\.weight$"), "model.norm.weight"),
    (re.compile(r"^transformer\.h\.(\d+)\.ln_1\.weight$"), r"model.layers.\1.input_layernorm.weight"),
    (
        re.compile(r"^transformer\.h\.(\d+)\.ln_2\.weight$"),
        r"model.layers.\1.post_attention_layernorm.weight",
    ),
    (re.compile(r"^transformer\.h\.(\d+)\.attn\.c_proj\.(\w+)$"), r"model.layers.\1.self_attn.o_proj.\2"),
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.w2\.(\w+)$"), r"model.layers.\1.mlp.gate_proj.\2"),  # gate
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.w1\.(\w+)$"), r"model.layers.\1.mlp.up_proj.\2"),  # up
    (re.compile(r"^transformer\.h\.(\d+)\.mlp\.c_proj\.(\w+)$"), r"model.layers.\1.mlp.down_proj.\2"),
]
_V1_C_ATTN = re.compile(r"^transformer\.h\.(\d+)\.attn\.c_attn\.(\w+)$")
# Non-persistent buffers some exporters saved anyway; they carry no weights.
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\.attn\.masked_bias|\.attn\.bias)$")


def sanitize(
    config: ModelConfig, tensors: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield tensors under our names. Names we do not know pass through for the loader to report."""
    for name, tensor in tensors:
        if _IGNORED.search(name):
            continue
        if config.family != "qwen":
            yield name, tensor
            continue
        yield from _sanitize_v1(config, name, tensor)


def _sanitize_v1(config: ModelConfig, name: str, tensor: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    m = _V1_C_ATTN.match(name)
    if m:
        layer, kind = m.groups()
        prefix = f"model.layers.{layer}.self_attn"
        for proj, part in zip(
            ("q_proj", "k_proj", "v_proj"), split_c_attn(config, kind, tensor), strict=True
        ):
            yield f"{prefix}.{proj}.{kind}", part
        return
    if name == "lm_head.weight":
        yield name, tensor
        return
    for pattern, replacement in _V1_RENAMES:
        if pattern.match(name):
            yield pattern.sub(replacement, name), tensor
            return
    yield name, tensor  # unknown: the loader names it as unexpected


def split_c_attn(config: ModelConfig, kind: str, tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Split one fused c_attn tensor into its Q, K, V parts.

    Float weight/bias are [3H, ...] stacked on dim 0. GPTQ qweight/scales are [.., 3H] and qzeros
    [.., 3H / pack] stacked on dim 1 (output columns); g_idx indexes inputs and is shared by all three.
    """
    h = config.num_attention_heads * config.head_dim
    if kind in ("weight", "bias"):
        dim, total = 0, tensor.shape[0]
    elif kind in ("qweight", "scales", "qzeros"):
        dim, total = 1, tensor.shape[1]
    elif kind == "g_idx":
        return tensor.clone(), tensor.clone(), tensor  # separate storage: safetensors refuses shared memory
    else:
        raise CheckpointError(f"unexpected fused attention tensor c_attn.{kind}")
    if total % 3:
        raise CheckpointError(f"c_attn.{kind} has {total} output rows, not a multiple of 3 (Q, K, V)")
    part = total // 3
    if kind != "qzeros" and part != h:
        raise CheckpointError(f"c_attn.{kind} splits into parts of {part}, expected hidden size {h}")
    return tuple(t.contiguous() for t in tensor.split(part, dim=dim))
