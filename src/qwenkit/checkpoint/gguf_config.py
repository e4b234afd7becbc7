"""GGUF metadata -> the ``config.json`` dict a Hugging Face checkpoint of the same model would carry.

A GGUF has no config.json: llama.cpp writes the hyperparameters as ``{arch}.*`` keys. We rebuild the
Hugging Face dict (not our own ``ModelConfig``) so that ``config.py`` stays the one place that
interprets configs, and so a converted directory loads in transformers too.

Where the file and its tensors could disagree (vocabulary size, FFN width of Qwen v1, head size), the
tensor shapes win: they are what the weights actually are.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# GGUF architecture -> (Hugging Face model_type, architectures). Qwen v1 becomes a qwen2 checkpoint:
# its fused c_attn is split into q/k/v_proj on read, which is exactly the v1 -> Qwen1.5 conversion.
ARCHITECTURES: dict[str, tuple[str, str]] = {
    "llama": ("llama", "LlamaForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "qwen": ("qwen2", "Qwen2ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
}
# llama.cpp's graphs renormalize the top-k routing weights for Qwen3-MoE, not for Qwen2-MoE; a file's
# {arch}.expert_weights_norm key, when present, says so explicitly.
_NORM_TOPK_DEFAULT = {"qwen2moe": False, "qwen3moe": True}


def build_hf_config(
    architecture: str, metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, Any]:
    """The Hugging Face config dict for a GGUF of ``architecture``.

    ``metadata`` holds the file's scalar keys; ``shapes`` maps GGUF tensor names to their shapes in
    PyTorch order (rows first). Raises ``KeyError`` naming a missing required key.
    """
    model_type, hf_arch = ARCHITECTURES[architecture]

    def key(name: str, default: Any = None) -> Any:
        full = f"{architecture}.{name}"
        if default is None and full not in metadata:
            raise KeyError(full)
        return metadata.get(full, default)

    hidden = int(key("embedding_length"))
    heads = int(key("attention.head_count"))
    kv_heads = int(key("attention.head_count_kv", heads))
    head_dim = _head_dim(architecture, metadata, shapes, hidden, heads)
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        # Qwen v1's feed_forward_length may be stored doubled (its config convention); the ffn tensors
        # are always the real width, so read it from them.
        "intermediate_size": _dense_ffn_width(architecture, metadata, shapes),
        "num_hidden_layers": int(key("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": int(key("context_length")),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if architecture in ARCHITECTURES and architecture.endswith("moe"):
        config.update(_moe_config(architecture, metadata, shapes, int(key("block_count"))))
    if architecture in ("llama", "qwen3", "qwen3moe"):
        # Both have a head_dim field and an attention_bias switch (qwen2 always has qkv biases).
        config["head_dim"] = head_dim
        config["attention_bias"] = "blk.0.attn_q.bias" in shapes
    if architecture == "llama":
        config["mlp_bias"] = False
    if model_type in ("qwen2", "qwen3"):
        config["use_sliding_window"] = False
    rope_dims = metadata.get(f"{architecture}.rope.dimension_count")
    if rope_dims is not None and int(rope_dims) != head_dim:
        raise ValueError(f"partial rotary embedding ({rope_dims} of {head_dim} dims) is not supported")
    if (scaling := _rope_scaling(architecture, metadata)) is not None:
        config["rope_scaling"] = scaling
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):  # fmt: skip
        if (value := metadata.get(f"tokenizer.ggml.{gguf_key}")) is not None:
            config[name] = int(value)
    return config


def _dense_ffn_width(
    architecture: str, metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]
) -> int:
    """The dense FFN width: from the first dense layer's ffn_up, else the metadata (an all-MoE file)."""
    for name, shape in shapes.items():
        if name.startswith("blk.") and name.endswith(".ffn_up.weight"):
            return shape[0]
    return (
        int(metadata.get(f"{architecture}.feed_forward_length", 0)) or shapes["blk.0.ffn_up_exps.weight"][1]
    )


def _moe_config(
    architecture: str, metadata: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]], layers: int
) -> dict[str, Any]:
    """qwen2_moe / qwen3_moe keys. Counts come from metadata, widths from the tensors, and a layer
    with neither a router (``ffn_gate_inp``) nor experts is dense (``mlp_only_layers``): one with only
    one of them stays sparse, so the loader names the tensor it lacks."""
    moe = ("ffn_gate_inp", "ffn_gate_exps", "ffn_up_exps", "ffn_down_exps")
    sparse = [i for i in range(layers) if any(f"blk.{i}.{t}.weight" in shapes for t in moe)]
    if not sparse:
        raise ValueError(f"a {architecture} file with no ffn_gate_inp (router) tensor in any layer")
    first = next((i for i in sparse if f"blk.{i}.ffn_up_exps.weight" in shapes), None)
    if first is None:
        raise ValueError(f"a {architecture} file with no ffn_up_exps (experts) tensor in any layer")
    experts, moe_ffn, _ = shapes[f"blk.{first}.ffn_up_exps.weight"]
    stated = metadata.get(f"{architecture}.expert_count")
    if stated is not None and int(stated) != experts:
        raise ValueError(f"expert_count {stated} disagrees with blk.{first}.ffn_up_exps ({experts} experts)")
    used = metadata.get(f"{architecture}.expert_used_count")
    if used is None:
        raise KeyError(f"{architecture}.expert_used_count")
    norm = metadata.get(f"{architecture}.expert_weights_norm", _NORM_TOPK_DEFAULT[architecture])
    config: dict[str, Any] = {
        "num_experts": experts,
        "num_experts_per_tok": int(used),
        "moe_intermediate_size": moe_ffn,
        "norm_topk_prob": bool(norm),
        "decoder_sparse_step": 1,
        "mlp_only_layers": [i for i in range(layers) if i not in sparse],
    }
    if architecture == "qwen2moe":
        shexp = shapes.get(f"blk.{first}.ffn_up_shexp.weight")
        config["shared_expert_intermediate_size"] = shexp[0] if shexp else 0
    return config


def _head_dim(
    architecture: str,
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    hidden: int,
    heads: int,
) -> int:
    """Per-head size: stated key_length, else Qwen3's q_norm width, else rope width, else hidden/heads."""
    if (stated := metadata.get(f"{architecture}.attention.key_length")) is not None:
        return int(stated)
    if "blk.0.attn_q_norm.weight" in shapes:
        return shapes["blk.0.attn_q_norm.weight"][0]
    if "blk.0.attn_q.weight" in shapes:
        return shapes["blk.0.attn_q.weight"][0] // heads
    return hidden // heads


def _rope_scaling(architecture: str, metadata: Mapping[str, Any]) -> dict[str, Any] | None:
    """llama.cpp's ``rope.scaling.*`` keys as a Hugging Face ``rope_scaling`` dict (None if absent)."""
    kind = metadata.get(f"{architecture}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "type": kind}
    if (factor := metadata.get(f"{architecture}.rope.scaling.factor")) is not None:
        scaling["factor"] = float(factor)
    if (original := metadata.get(f"{architecture}.rope.scaling.original_context_length")) is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling
