"""GGUF metadata -> the ``config.json`` dict a Hugging Face checkpoint of the same model would carry.

A GGUF has no config.json: llama.cpp writes the hyperparameters as ``{arch}.*`` keys. We rebuild the
Hugging Face dict (not our own ``ModelConfig``) so that ``config.py`` stays the one place that
interprets configs, and so a converted directory loads in transformers too.

Where the file and its tensors could disagree (vocabulary size, FFN width of Qwen v1, head size), the
tensor shapes win: they are what the weights actually are.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from qwenkit.checkpoint.gguf_tokenizer import special_token_ids

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
    architecture: str,
    metadata: Mapping[str, Any],
    shapes: Mapping[str, tuple[int, ...]],
    rope_freqs: np.ndarray | None = None,
) -> dict[str, Any]:
    """The Hugging Face config dict for a GGUF of ``architecture``.

    ``metadata`` holds the file's scalar keys; ``shapes`` maps GGUF tensor names to their shapes in
    PyTorch order (rows first); ``rope_freqs``: the values of a ``rope_freqs.weight`` tensor (Llama 3.1's
    rope scaling as llama.cpp writes it). Raises ``KeyError`` naming a missing required key, ``ValueError``
    naming what cannot be read.
    """
    model_type, hf_arch = ARCHITECTURES[architecture]

    def key(name: str, default: Any = None) -> Any:
        full = f"{architecture}.{name}"
        if default is None and full not in metadata:
            raise KeyError(full)
        return metadata.get(full, default)

    def count(name: str, default: int | None = None) -> int:
        """A positive whole number; llama.cpp's per-layer array form is read where every layer agrees."""
        full, value = f"{architecture}.{name}", key(name, default)
        if isinstance(value, list) and value and all(v == value[0] for v in value):
            value = value[0]
        if isinstance(value, list):
            shown = f"{value[:8]}"[:-1] + (", ...]" if len(value) > 8 else "]")
            raise ValueError(f"{full} differs between layers ({shown}); qwenkit runs one value for all")
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{full} is {value!r}, not a positive whole number")
        return value

    def real(name: str, default: float | None = None) -> float:
        full, value = f"{architecture}.{name}", key(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise ValueError(f"{full} is {value!r}, not a number")
        return float(value)

    hidden = count("embedding_length")
    heads = count("attention.head_count")
    kv_heads = count("attention.head_count_kv", heads)
    head_dim = _head_dim(architecture, metadata, shapes, hidden, heads)
    config: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "vocab_size": shapes["token_embd.weight"][0],
        "hidden_size": hidden,
        # Qwen v1's feed_forward_length may be stored doubled (its config convention); the ffn tensors
        # are always the real width, so read it from them.
        "intermediate_size": _dense_ffn_width(architecture, metadata, shapes),
        "num_hidden_layers": count("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "hidden_act": "silu",
        "max_position_embeddings": count("context_length"),
        "rms_norm_eps": real("attention.layer_norm_rms_epsilon"),
        "rope_theta": real("rope.freq_base", 10000.0),
        # llama.cpp writes output.weight only when the head is not the embedding matrix.
        "tie_word_embeddings": "output.weight" not in shapes,
    }
    if architecture in ARCHITECTURES and architecture.endswith("moe"):
        config.update(_moe_config(architecture, metadata, shapes, count("block_count")))
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
    if rope_freqs is not None:
        if scaling is not None:
            kind = scaling["rope_type"]
            raise ValueError(f"both rope.scaling.type {kind!r} and rope_freqs.weight are given")
        if (llama3 := llama3_from_rope_freqs(rope_freqs, config["rope_theta"], head_dim)) is not None:
            config["rope_scaling"] = llama3
    # ids outside the vocabulary are dropped, as llama.cpp drops them (the tokenizer says so on stderr)
    special = special_token_ids(metadata) if "tokenizer.ggml.tokens" in metadata else {}
    for name, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                           ("pad_token_id", "padding_token_id")):  # fmt: skip
        if gguf_key in special:
            config[name] = special[gguf_key]
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


def llama3_from_rope_freqs(divisors: np.ndarray, theta: float, head_dim: int) -> dict[str, Any] | None:
    """llama.cpp's ``rope_freqs.weight`` (Llama 3.1's rope scaling written as one divisor per frequency) read
    back as the transformers ``llama3`` rope_scaling that gives the same frequencies; None when every
    divisor is 1. A divisor is 1 for wavelengths under original/high_freq_factor, ``factor`` over
    original/low_freq_factor, and between them 1/d = (1 - s)/factor + s, where the blend s =
    (original/wavelength - low)/(high - low) is a line in 1/wavelength: two dimensions in that band fix it.
    The line fixes only ratios, so low_freq_factor is taken as 1, as in every Llama 3.x release; any other
    choice gives the same frequencies."""
    d = np.asarray(divisors, dtype=np.float64).reshape(-1)
    where = "rope_freqs.weight"
    if d.size != head_dim // 2:
        raise ValueError(f"{where} has {d.size} values; a head size of {head_dim} needs {head_dim // 2}")
    if not np.isfinite(d).all() or (d < 1 - 1e-6).any():
        raise ValueError(f"{where} holds values below 1 or not finite; not Llama 3 rope scaling")
    if np.allclose(d, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(d.max())
    inverse_wavelength = theta ** (-np.arange(0, head_dim, 2) / head_dim) / (2 * math.pi)
    short, long = np.isclose(d, 1.0, rtol=1e-6), np.isclose(d, factor, rtol=1e-6)
    band = ~(short | long)
    if band.sum() < 2 or not long.any():
        raise ValueError(
            f"cannot read Llama 3 rope scaling back from {where}: it needs two frequencies between "
            f"its unscaled and fully scaled ones, and has {int(band.sum())}"
        )
    blend = (1 / d[band] - 1 / factor) / (1 - 1 / factor)
    slope, offset = np.polyfit(inverse_wavelength[band], blend, 1)
    if slope <= 0 or offset >= 0:
        raise ValueError(f"{where} does not follow Llama 3's rope scaling (its blend does not rise)")
    low, high, original = 1.0, float(f"{1 - 1 / offset:.6g}"), round(-slope / offset)
    fitted = (original * inverse_wavelength - low) / (high - low)
    ordered = (fitted[short] >= 1 - 1e-4).all() and (fitted[long] <= 1e-4).all()
    if not ordered or np.abs(fitted[band] - blend).max() > 1e-4:
        raise ValueError(f"{where} does not follow Llama 3's rope scaling (its divisors fit no blend line)")
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": original,
    }


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
    # llama.cpp's converter writes a YaRN rope_scaling's beta_fast/beta_slow here: the same correction
    # range in ggml's rope. Its attention and extrapolation factors mean something else there than in
    # transformers (llama.cpp multiplies its own mscale by attn_factor): other than llama.cpp's defaults,
    # they are refused rather than guessed.
    for name, key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
        if (value := metadata.get(f"{architecture}.rope.scaling.{name}")) is not None:
            scaling[key] = value
    for name, defaults in _LLAMA_CPP_ONLY.items():
        value = metadata.get(f"{architecture}.rope.scaling.{name}")
        if value is not None and value not in defaults:
            raise ValueError(
                f"{architecture}.rope.scaling.{name} is {value!r}; qwenkit runs {kind} RoPE scaling as "
                "transformers does, which has no such setting (remove the key or convert from the Hugging "
                "Face model)"
            )
    return scaling


# rope.scaling keys llama.cpp reads and transformers has no counterpart for, with the values that change
# nothing there (an extrapolation factor of -1 is llama.cpp's "auto": 1 for YaRN)
_LLAMA_CPP_ONLY = {
    "yarn_attn_factor": (1.0,),
    "yarn_ext_factor": (1.0, -1.0),
    "yarn_log_multiplier": (0.0,),
    "attn_factor": (1.0,),
}
