"""One normalized model configuration for every family.

This is the only module that reads Hugging Face ``config.json`` keys (the RoPE ones through
``rope_scaling.py``, which it calls). Qwen v1 (``qwen``), Qwen1.5/2/2.5 (``qwen2``), Qwen3 (``qwen3``),
their mixtures of experts (``qwen2_moe``, ``qwen3_moe``) and Llama (``llama``) all become the same frozen
``ModelConfig``; the network is switched by its fields, never by the family name. Anything we cannot run
faithfully is rejected here with a message naming the key, rather than silently ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.rope_scaling import LinearScaling, RopeScaling, YarnScaling, read_rope, rope_params

Family = Literal["qwen", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama"]
FAMILIES: tuple[str, ...] = ("qwen", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "llama")


@dataclass(frozen=True)
class ModelConfig:
    """Everything the network needs, in one place. Derived sizes are filled in ``__post_init__``."""

    family: Family
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the real FFN width (Qwen v1's config stores twice this)
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int = 0  # 0 -> same as num_attention_heads (MHA)
    head_dim: int = 0  # 0 -> hidden_size // num_attention_heads
    rotary_dim: int = 0  # 0 -> head_dim; Qwen v1's rotary_pct < 1 rotates only the first dims
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 32768  # the trained context window
    # Qwen2.5-1M's dual_chunk_attention_config (chunk_size, local_size, original_max_position_embeddings):
    # not run, only said (``dual_chunk_note``); full attention runs over every position, as in transformers
    dual_chunk_attention: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    use_dynamic_ntk: bool = False  # Qwen v1: NTK-aware RoPE base past max_position_embeddings
    use_logn_attn: bool = False  # Qwen v1: scale queries by log_{L}(position) past the trained length
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before RoPE
    tie_word_embeddings: bool = False
    torch_dtype: str | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    architectures: tuple[str, ...] = ()
    quantization: dict[str, Any] | None = field(default=None, compare=False, hash=False)
    # Mixture of experts (qwen2_moe, qwen3_moe); num_experts == 0 means every layer is dense.
    num_experts: int = 0
    num_experts_per_tok: int = 0  # top-k experts each token is routed to
    moe_intermediate_size: int = 0  # FFN width of one routed expert
    shared_expert_intermediate_size: int = 0  # 0 -> no shared expert (Qwen3-MoE)
    norm_topk_prob: bool = False  # renormalize the top-k routing weights to sum to 1
    decoder_sparse_step: int = 1  # layer i is sparse when (i + 1) % step == 0 ...
    mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
    # Training's load-balancing loss weight: router_aux_loss_coef where output_router_logits turns it on
    router_aux_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        sizes = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        self._check_positive(sizes)
        if self.num_key_value_heads == 0:
            set_(self, "num_key_value_heads", self.num_attention_heads)
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            set_(self, "head_dim", self.hidden_size // self.num_attention_heads)
        if self.rotary_dim == 0:
            set_(self, "rotary_dim", self.head_dim)
        # 0 above means "not given" (derived); a negative one, or a window of 0, ran until the first prompt
        self._check_positive(("num_key_value_heads", "head_dim", "rotary_dim", "max_position_embeddings"))
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads {self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.rotary_dim % 2 or self.rotary_dim > self.head_dim:
            raise ConfigError(
                f"rotary dim {self.rotary_dim} must be even and at most head_dim {self.head_dim}"
            )
        if self.num_experts:
            self._check_moe()

    def _check_positive(self, names: tuple[str, ...]) -> None:
        for name in names:
            if getattr(self, name) <= 0:
                raise ConfigError(f"config value {name}={getattr(self, name)} must be positive")

    def _check_moe(self) -> None:
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ConfigError(
                f"num_experts_per_tok={self.num_experts_per_tok} must be between 1 and "
                f"num_experts={self.num_experts}"
            )
        if self.moe_intermediate_size <= 0:
            raise ConfigError(f"moe_intermediate_size={self.moe_intermediate_size} must be positive")
        if self.decoder_sparse_step <= 0:
            raise ConfigError(f"decoder_sparse_step={self.decoder_sparse_step} must be positive")
        if self.shared_expert_intermediate_size < 0:
            raise ConfigError("shared_expert_intermediate_size must not be negative")

    def is_sparse_layer(self, layer_idx: int) -> bool:
        """Whether layer ``layer_idx`` has routed experts (transformers' rule for Qwen MoE)."""
        return (
            self.num_experts > 0
            and layer_idx not in self.mlp_only_layers
            and (layer_idx + 1) % self.decoder_sparse_step == 0
        )

    @property
    def sparse_layers(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.num_hidden_layers) if self.is_sparse_layer(i))

    @property
    def num_sparse_layers(self) -> int:
        """``len(sparse_layers)``, counted without a loop over the layers: `qwenkit info` on a config.json
        of 2e9 layers looped over every one."""
        if not self.num_experts:
            return 0
        layers, step = self.num_hidden_layers, self.decoder_sparse_step
        dense = {i for i in self.mlp_only_layers if 0 <= i < layers and (i + 1) % step == 0}
        return layers // step - len(dense)

    # ---- derived quantities used by `qwenkit info` and the memory check -------------------------------

    @property
    def num_parameters(self) -> int:
        """Parameter count of the float model (embeddings counted once when tied)."""
        h, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        attn += 2 * self.head_dim if self.qk_norm else 0
        dense_mlp = 3 * h * f + ((2 * f + h) if self.mlp_bias else 0)
        sparse = self.num_sparse_layers
        per_layer = attn + 2 * h
        embed = v * h * (1 if self.tie_word_embeddings else 2)
        mlps = (self.num_hidden_layers - sparse) * dense_mlp + sparse * self._moe_parameters(self.num_experts)
        return self.num_hidden_layers * per_layer + mlps + embed + h

    @property
    def num_active_parameters(self) -> int:
        """Parameters one token computes with: only its top-k experts of each sparse layer (plus the
        router and shared expert). Equals ``num_parameters`` for a dense model."""
        sparse = self.num_sparse_layers
        return self.num_parameters - sparse * (
            self._moe_parameters(self.num_experts) - self._moe_parameters(self.num_experts_per_tok)
        )

    def _moe_parameters(self, experts: int) -> int:
        """One sparse MLP block's parameters with ``experts`` routed experts counted."""
        h = self.hidden_size
        routed = experts * 3 * h * self.moe_intermediate_size
        router = self.num_experts * h
        shared = 3 * h * self.shared_expert_intermediate_size
        shared_gate = h if self.shared_expert_intermediate_size else 0
        return routed + router + shared + shared_gate

    @property
    def max_context(self) -> int:
        """The longest sequence the model is meant to run: the trained window, except that Qwen v1 with
        dynamic NTK extends it (the original's LogN table stops at 32768 positions), static YaRN
        stretches its original window by its factor and linear interpolation the trained window by its
        factor, as vLLM reads them: Qwen2.5's documented YaRN setting adds rope_scaling and leaves
        max_position_embeddings at the original 32768, meaning 131072. Llama 3.1's configs state the
        stretched window (131072) as max_position_embeddings, so llama3 scaling keeps it."""
        if self.use_dynamic_ntk:
            return max(self.max_position_embeddings, 32768)
        scaling = self.rope_scaling
        if isinstance(scaling, YarnScaling):
            return max(
                self.max_position_embeddings,
                round(scaling.original_max_position_embeddings * scaling.factor),
            )
        if isinstance(scaling, LinearScaling):
            return max(self.max_position_embeddings, round(self.max_position_embeddings * scaling.factor))
        return self.max_position_embeddings

    @property
    def dual_chunk_window(self) -> int | None:
        """The window a dual_chunk_attention_config's chunks were trained for (262,144 for Qwen2.5-1M),
        None where it states none (or no such config)."""
        dca = self.dual_chunk_attention or {}
        window = dca.get("original_max_position_embeddings") or dca.get("chunk_size")
        whole = isinstance(window, int) and not isinstance(window, bool) and window > 0
        return window if whole else None

    @property
    def dual_chunk_note(self) -> str | None:
        """The line loading says once for a dual_chunk_attention_config, which qwenkit does not run."""
        if self.dual_chunk_attention is None:
            return None
        window = self.dual_chunk_window
        trained = f" (the model was trained for {window:,} tokens)" if window else ""
        return (
            "config.json's dual_chunk_attention_config is not implemented: full attention runs over every "
            f"position, as in transformers{trained}"
        )

    def kv_cache_bytes_per_token(self, bytes_per_element: int) -> int:
        """Bytes of K and V for one token across all layers."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * bytes_per_element

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    # ---- construction from Hugging Face config.json ---------------------------------------------------

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> ModelConfig:
        """Normalize a Hugging Face ``config.json`` dict of any supported family."""
        model_type = cfg.get("model_type")
        if model_type not in FAMILIES:
            raise ConfigError(f"unsupported model_type {model_type!r}; qwenkit runs {', '.join(FAMILIES)}")
        act = cfg.get("hidden_act", cfg.get("activation_function", "silu"))
        if act not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {act!r}; Qwen and Llama use silu (SwiGLU)")
        _check_value_types(cfg)
        reader = _FAMILY_READERS[model_type]
        try:
            return reader(cfg)
        except KeyError as e:
            raise ConfigError(
                f"config.json for model_type {model_type!r} is missing key {e.args[0]!r}"
            ) from None
        except (TypeError, ValueError) as e:
            if isinstance(e, ConfigError):
                raise
            nulls = [k for k in (*_INT_KEYS, *_FLOAT_KEYS) if k in cfg and cfg[k] is None]
            if nulls:  # null where the reader needs a number (a few keys take null as their default)
                message = f"config.json: {nulls[0]} is null; give a number or remove the key"
                raise ConfigError(message) from None
            raise ConfigError(f"config.json has a value of the wrong type: {e}") from None

    @classmethod
    def from_dir(cls, path: str | Path) -> ModelConfig:
        """Read ``config.json`` (and ``quantize_config.json``) from a checkpoint directory."""
        return cls.from_hf(read_hf_config(path))


# Sizes and switches the readers turn into int/bool: int(2.7) and bool("false") would run another model.
_INT_KEYS = (
    "vocab_size", "padded_vocab_size", "hidden_size", "n_embd", "intermediate_size", "ffn_hidden_size",
    "num_hidden_layers", "n_layer", "num_attention_heads", "n_head", "num_key_value_heads", "head_dim",
    "kv_channels", "max_position_embeddings", "seq_length", "n_positions", "num_experts",
    "num_local_experts", "num_experts_per_tok", "moe_intermediate_size", "shared_expert_intermediate_size",
    "decoder_sparse_step",
)  # fmt: skip
_FLOAT_KEYS = (
    "rms_norm_eps", "layer_norm_epsilon", "rope_theta", "rotary_emb_base", "rotary_pct",
    "router_aux_loss_coef",
)  # fmt: skip
_BOOL_KEYS = (
    "tie_word_embeddings", "use_dynamic_ntk", "use_logn_attn", "no_bias", "attention_bias", "mlp_bias",
    "qkv_bias", "use_sliding_window", "norm_topk_prob", "output_router_logits",
)  # fmt: skip


_LARGEST_SIZE = 2**31 - 1  # every size a checkpoint gives is far below it (a vocabulary, a context)


def _check_value_types(cfg: dict[str, Any]) -> None:
    """Refuse, naming the key, a size that is not a whole number or a switch that is not true/false."""
    for key in _INT_KEYS:
        value = cfg.get(key)
        whole = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if value is not None and (isinstance(value, bool) or not whole):
            raise ConfigError(f"config.json: {key} must be a whole number, not {value!r}")
        if value is not None and abs(value) > _LARGEST_SIZE:  # 1e30 layers: building them never ended
            raise ConfigError(
                f"config.json: {key} is {value!r}, past any model's ({_LARGEST_SIZE:,} at most)"
            )
    # 5 was "'int' object is not iterable", no key named
    for key in ("rope_scaling", "rope_parameters", "dual_chunk_attention_config"):
        value = cfg.get(key)
        if value is not None and not isinstance(value, dict):
            raise ConfigError(f"config.json: {key} must be an object or null, not {value!r}")
    for key in _FLOAT_KEYS:
        value = cfg.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"config.json: {key} must be a number, not {value!r}")
    for key in _BOOL_KEYS:
        value = cfg.get(key)
        if value is not None and not isinstance(value, bool):
            raise ConfigError(f"config.json: {key} must be true or false, not {value!r}")


def read_hf_config(directory: str | Path) -> dict[str, Any]:
    """The ``config.json`` dict of a checkpoint directory, with ``quantize_config.json`` merged in as
    ``quantization_config`` when only the former AutoGPTQ file carries it."""
    d = Path(directory)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        if (d / "adapter_config.json").is_file():  # `finetune`'s output, given where its base goes
            raise CheckpointError(_adapter_not_model(d))
        raise CheckpointError(f"{d} is not a model directory: it has no config.json{_gguf_hint(d)}")
    cfg = _read_json_object(cfg_path)
    quant_path = d / "quantize_config.json"
    if quant_path.is_file() and "quantization_config" not in cfg:
        cfg["quantization_config"] = {"quant_method": "gptq", **_read_json_object(quant_path)}
    return cfg


def _gguf_hint(d: Path) -> str:
    """A GGUF repository downloaded whole is a directory of .gguf files: name them, as the file is what
    qwenkit takes (the directory has no config.json to read)."""
    try:
        names = sorted(p.name for p in d.glob("*.gguf"))
    except OSError:
        return ""
    if not names:
        return ""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"; it holds GGUF files: pass one of them ({', '.join(str(d / n) for n in names[:3])}{more})"


def _adapter_not_model(d: Path) -> str:
    """What to do with a LoRA adapter directory given as a model: its base, with --adapter or merged."""
    try:
        base = json.loads((d / "adapter_config.json").read_text(encoding="utf-8"))["base_model_name_or_path"]
    except (OSError, ValueError, TypeError, KeyError):
        base = None
    known = f" ({base})" if isinstance(base, str) and base else ""
    return (
        f"{d} is a LoRA adapter, not a model: run its base model{known} with --adapter {d}, "
        "or merge them first (qwenkit merge BASE ADAPTER OUT)"
    )


def _read_json_object(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def _eos_ids(cfg: dict[str, Any]) -> tuple[int, ...]:
    eos = cfg.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _quantization(cfg: dict[str, Any]) -> dict[str, Any] | None:
    q = cfg.get("quantization_config")
    return dict(q) if q else None


def _read_qwen_v1(cfg: dict[str, Any]) -> ModelConfig:
    """Qwen v1 (QWenLMHeadModel). Accepts both the Aug-2023 (n_embd...) and later spellings."""
    hidden = cfg.get("hidden_size", cfg.get("n_embd"))
    heads = cfg.get("num_attention_heads", cfg.get("n_head"))
    layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    doubled_ffn = cfg.get("intermediate_size", cfg.get("ffn_hidden_size"))
    if None in (hidden, heads, layers, doubled_ffn):
        raise ConfigError(
            "Qwen v1 config.json needs hidden_size, num_attention_heads, num_hidden_layers, "
            "intermediate_size (or n_embd, n_head, n_layer, ffn_hidden_size)"
        )
    if heads < 1:  # before dividing by it; the same words as ModelConfig's check
        raise ConfigError(f"config value num_attention_heads={heads} must be positive")
    kv_channels = int(cfg.get("kv_channels", hidden // heads))
    if kv_channels * heads != hidden:
        # The fused c_attn output is split by hidden_size, so projection and hidden sizes must agree.
        raise ConfigError(f"Qwen v1 kv_channels {kv_channels} x heads {heads} != hidden_size {hidden}")
    rotary_pct = float(cfg.get("rotary_pct", 1.0))
    if cfg.get("use_cache_quantization"):
        raise ConfigError("Qwen v1 use_cache_quantization (int8 KV cache) is not supported; set it to false")
    seq_length = int(cfg.get("seq_length", cfg.get("n_positions", 2048)))
    if seq_length < 2:
        # modeling_qwen.py builds its LogN table with logarithms to this base, whatever use_logn_attn
        # says; at 0 dynamic NTK divided by zero, at 1 LogN made every query past position 0 infinite
        raise ConfigError(f"Qwen v1 seq_length {seq_length} must be at least 2 (the trained context)")
    return ModelConfig(
        family="qwen",
        vocab_size=int(cfg.get("padded_vocab_size", cfg["vocab_size"])),
        hidden_size=int(hidden),
        intermediate_size=int(doubled_ffn) // 2,
        num_hidden_layers=int(layers),
        num_attention_heads=int(heads),
        head_dim=kv_channels,
        rotary_dim=int(kv_channels * rotary_pct),
        rms_norm_eps=float(cfg.get("layer_norm_epsilon", 1e-6)),
        rope_theta=float(cfg.get("rotary_emb_base", 10000.0)),
        max_position_embeddings=seq_length,
        use_dynamic_ntk=bool(cfg.get("use_dynamic_ntk", False)),
        use_logn_attn=bool(cfg.get("use_logn_attn", False)),
        qkv_bias=True,
        o_bias=not cfg.get("no_bias", True),
        mlp_bias=not cfg.get("no_bias", True),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=_v1_dtype(cfg),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg) or (151643,),
        architectures=tuple(cfg.get("architectures") or ("QWenLMHeadModel",)),
        quantization=_quantization(cfg),
    )


def _v1_dtype(cfg: dict[str, Any]) -> str | None:
    if cfg.get("torch_dtype"):
        return str(cfg["torch_dtype"])
    for flag, name in (("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")):
        if cfg.get(flag):
            return name
    return None


def _read_hf_standard(cfg: dict[str, Any]) -> ModelConfig:
    """qwen2, qwen3, their MoE variants and llama share transformers' standard decoder config keys."""
    family: Family = cfg["model_type"]
    if sliding := _sliding_layers(cfg, family):
        source = "layer_types" if cfg.get("layer_types") else "use_sliding_window=true"
        raise ConfigError(
            f"{source} makes layer(s) {_spans(sliding)} sliding-window attention, which qwenkit does not "
            "run (no released Qwen model enables it)"
        )
    if family == "llama" and cfg.get("pretraining_tp", 1) != 1:
        raise ConfigError("llama pretraining_tp != 1 is not supported")
    theta, scaling = read_rope(cfg)
    factors = (cfg.get("partial_rotary_factor"), rope_params(cfg).get("partial_rotary_factor"))
    partial = [f for f in factors if f is not None and f != 1]
    if partial:
        # transformers' qwen2/qwen3/llama rotate the whole head whatever this says (and fail with YaRN)
        raise ConfigError(
            f"partial_rotary_factor={partial[0]} is not supported for {family}: transformers rotates "
            "the whole head of this family, so the checkpoint's positions are ambiguous; remove it"
        )
    bias = bool(cfg.get("attention_bias", False))
    dtype = cfg.get("torch_dtype", cfg.get("dtype"))
    return ModelConfig(
        family=family,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        intermediate_size=int(cfg["intermediate_size"]),
        num_hidden_layers=int(cfg["num_hidden_layers"]),
        num_attention_heads=int(cfg["num_attention_heads"]),
        num_key_value_heads=int(cfg.get("num_key_value_heads") or cfg["num_attention_heads"]),
        # transformers' Qwen3Config defaults head_dim to 128; the others divide hidden_size by the heads
        head_dim=int(cfg.get("head_dim") or (128 if family == "qwen3" else 0)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
        qkv_bias=bool(cfg.get("qkv_bias", True)) if family in ("qwen2", "qwen2_moe") else bias,
        o_bias=False if family in ("qwen2", "qwen2_moe") else bias,
        mlp_bias=bool(cfg.get("mlp_bias", False)) if family == "llama" else False,  # Qwen MLPs: no bias
        qk_norm=family in ("qwen3", "qwen3_moe"),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        torch_dtype=str(dtype) if dtype else None,
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=_eos_ids(cfg),
        architectures=tuple(cfg.get("architectures") or ()),
        quantization=_quantization(cfg),
        dual_chunk_attention=dict(dca) if (dca := cfg.get("dual_chunk_attention_config")) else None,
        **(_moe(cfg) if family.endswith("_moe") else {}),
    )


def _sliding_layers(cfg: dict[str, Any], family: Family) -> Sequence[int]:
    """The layers transformers 5 runs with sliding-window attention, by its rules per family: a
    use_sliding_window=true whose max_window_layers leaves no layer sliding runs full attention there."""
    if family == "llama":
        return []  # transformers' Llama has no sliding window
    layers = range(int(cfg.get("num_hidden_layers") or 0))  # missing: named where the sizes are read
    types = cfg.get("layer_types")
    if types and family != "qwen3_moe":  # Qwen3-MoE has no layer_types: its window applies to every layer
        # (over the listed types only: a loop over a config.json's 2e9 layers never ended)
        return [i for i in layers[: len(types)] if types[i] == "sliding_attention"]
    if not cfg.get("use_sliding_window") or not cfg.get("sliding_window", 4096):
        return []
    limit = int(cfg.get("max_window_layers", 28))
    if family == "qwen3_moe":
        return layers
    if family == "qwen2_moe":
        return [i for i in layers[: max(limit, 0)] if (i + 1) % 2]
    return layers[max(limit, 0) :]


def _spans(indices: Sequence[int]) -> str:
    """[0, 1, 2, 5] -> '0-2, 5'."""
    if isinstance(indices, range) and indices.step == 1 and len(indices) > 1:  # (2e9 layers: not one by one)
        return f"{indices.start}-{indices.stop - 1}"
    spans: list[list[int]] = []
    for i in indices:
        if spans and spans[-1][1] == i - 1:
            spans[-1][1] = i
        else:
            spans.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in spans)


def _moe(cfg: dict[str, Any]) -> dict[str, Any]:
    """The mixture-of-experts keys of qwen2_moe / qwen3_moe, with transformers' defaults."""
    qwen2 = cfg["model_type"] == "qwen2_moe"
    mlp_only = cfg.get("mlp_only_layers") or []
    if not isinstance(mlp_only, list) or not all(isinstance(i, int) for i in mlp_only):
        raise ConfigError(f"mlp_only_layers must be a list of layer indices, not {mlp_only!r}")
    # transformers 5 writes Qwen3-MoE's count as num_local_experts; released configs say num_experts.
    experts, local = cfg.get("num_experts"), cfg.get("num_local_experts")
    if not qwen2 and None not in (experts, local) and experts != local:  # transformers runs the latter
        raise ConfigError(
            f"config.json gives num_experts={experts} and num_local_experts={local}; keep the one that "
            "matches the checkpoint's experts"
        )
    return dict(
        num_experts=int(cfg.get("num_experts", cfg.get("num_local_experts", 60 if qwen2 else 128))),
        num_experts_per_tok=int(cfg.get("num_experts_per_tok", 4 if qwen2 else 8)),
        moe_intermediate_size=int(cfg.get("moe_intermediate_size", 1408 if qwen2 else 768)),
        shared_expert_intermediate_size=int(cfg.get("shared_expert_intermediate_size", 5632)) if qwen2 else 0,
        norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
        decoder_sparse_step=int(cfg.get("decoder_sparse_step", 1)),
        mlp_only_layers=tuple(sorted(set(mlp_only))),
        router_aux_loss_coef=(
            float(cfg.get("router_aux_loss_coef", 0.001)) if cfg.get("output_router_logits") else 0.0
        ),
    )


_FAMILY_READERS = {
    "qwen": _read_qwen_v1,
    "qwen2": _read_hf_standard,
    "qwen3": _read_hf_standard,
    "qwen2_moe": _read_hf_standard,
    "qwen3_moe": _read_hf_standard,
    "llama": _read_hf_standard,
}
