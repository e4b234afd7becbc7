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
}


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
        "intermediate_size": shapes["blk.0.ffn_up.weight"][0],
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
    if architecture in ("llama", "qwen3"):
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
