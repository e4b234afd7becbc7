"""Convert a Qwen v1 checkpoint (``QWenLMHeadModel``) into the Qwen1.5 (``qwen2``) layout.

The weights are the loader's own mapping (``checkpoint.sanitize``: renames, the fused ``c_attn`` split,
GPTQ column splits) streamed into the checkpoint saver, one tensor at a time, so memory stays near one
source shard plus one output shard. Around them this module writes what a ``qwen2`` directory needs and a
v1 directory lacks: a ``Qwen2ForCausalLM`` config.json (qwen_facts §5.2), generation_config.json with the
v1 stop ids as eos ids, a ``tokenizer.json`` built from ``qwen.tiktoken``, and the license files.

Everything is written into a temporary sibling of ``out_dir`` and renamed into place at the end (after
``verify``, when asked), so a failed or interrupted conversion never leaves a directory that looks done.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError, safe_open
from tqdm import tqdm

from qwenkit.checkpoint.files import WeightFiles, find_weight_files
from qwenkit.checkpoint.loader import DTYPES, DirectorySource, open_checkpoint
from qwenkit.checkpoint.output_dir import atomic_output_dir, check_out_dir, nearest_existing, write_json
from qwenkit.checkpoint.sanitize import sanitize
from qwenkit.checkpoint.saver import save_sharded
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.license import LICENSE_FILES, find_license

if TYPE_CHECKING:
    from qwenkit.convert.verify import VerifyResult

ENDOFTEXT_ID, IM_END_ID = 151643, 151645
# Sampling defaults a Qwen v1 generation_config.json carries that mean the same to transformers' qwen2.
SAMPLING_KEYS = ("do_sample", "temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens")
FLOAT16_OVERFLOW = 65520.0  # the smallest magnitude that rounds to inf in float16
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
_FLOAT_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
_INT_BYTES = {"I64": 8, "U64": 8, "I32": 4, "U32": 4, "I16": 2, "U16": 2, "I8": 1, "U8": 1, "BOOL": 1}


@dataclass
class ConversionResult:
    """What was written, and what a user should know about it."""

    out_dir: Path
    tensors: int = 0
    bytes_written: int = 0
    shards: int = 0
    torch_dtype: str = ""
    dropped_zero_biases: int = 0
    files: list[str] = field(default_factory=list)  # non-weight files written
    notes: list[str] = field(default_factory=list)
    source_dtypes: set[torch.dtype] = field(default_factory=set)  # float dtypes of the source tensors
    verification: VerifyResult | None = None  # when verify=True


def convert_v1_to_qwen2(
    src: str | Path,
    out_dir: str | Path,
    *,
    dtype: str | None = None,
    shard_bytes: int = 5 * 10**9,
    overwrite: bool = False,
    verify: bool = False,
    progress: bool = True,
) -> ConversionResult:
    """Convert the Qwen v1 directory ``src`` into a ``qwen2`` directory ``out_dir``.

    ``dtype`` None keeps each tensor's dtype (the conversion is then bit-exact). With ``verify`` the
    output is loaded next to its source and compared before it is moved into place; a mismatch raises
    ``CheckpointError`` and leaves nothing behind.
    """
    src, out = Path(src), Path(out_dir)
    source = open_checkpoint(src)
    hf = source.hf_config
    if hf.get("model_type") != "qwen":
        hint = " (it is already in the Qwen1.5 layout)" if hf.get("model_type") == "qwen2" else ""
        raise CheckpointError(
            f"{src} is not a Qwen v1 checkpoint: config.json has model_type {hf.get('model_type')!r}{hint}; "
            "--to qwen2 converts model_type 'qwen' (QWenLMHeadModel)"
        )
    config = ModelConfig.from_hf(hf)
    if config.rotary_dim != config.head_dim:
        raise ConfigError(f"rotary_pct {config.rotary_dim / config.head_dim:g} < 1 has no qwen2 equivalent")
    if config.tie_word_embeddings:  # the output says false and keeps lm_head: another model than the source
        raise ConfigError(
            "tie_word_embeddings: true is not a Qwen v1 setting (every release has its own lm_head); "
            "set it to false in config.json"
        )
    target = _target_dtype(dtype, config)
    check_out_dir(out, overwrite, source=src)
    weights = find_weight_files(src)  # a missing shard fails here, before anything is written
    _check_disk_space(weights, target, nearest_existing(out))

    result = ConversionResult(out_dir=out)
    with atomic_output_dir(out, overwrite) as tmp:
        _write(src, tmp, hf, config, weights, target, shard_bytes, progress, result)
        if verify:
            from qwenkit.convert.verify import verify_conversion

            result.verification = verify_conversion(
                src, tmp, progress=progress, lossy=_lossy(result.source_dtypes, target)
            )
            if not result.verification.passed:
                raise CheckpointError(
                    f"verification failed, nothing written to {out}: {result.verification.summary()}"
                )
    if config.use_dynamic_ntk or config.use_logn_attn:
        result.notes.append(long_context_note(config))
    return result


# ---- the weights ------------------------------------------------------------------------------------


def _write(
    src: Path,
    tmp: Path,
    hf: dict[str, Any],
    config: ModelConfig,
    weights: WeightFiles,
    target: torch.dtype | None,
    shard_bytes: int,
    progress: bool,
    result: ConversionResult,
) -> None:
    generation_src = _read_json(src / "generation_config.json")
    chat = generation_src.get("chat_format") == "chatml"
    # The output config is fixed before the weights so its meta model can check every tensor name and shape.
    out_cfg = qwen2_config(hf, config, torch_dtype="float32", chat=chat)
    expected = _expected_tensors(out_cfg)
    seen_dtypes = result.source_dtypes

    bar = tqdm(total=weights.total_bytes, unit="B", unit_scale=True, desc="converting", disable=not progress)
    with bar:
        # The loader's tensors: a GPTQ layer without g_idx (desc_act false) gets the plain one written, as
        # transformers + GPTQModel leave a missing g_idx uninitialized (garbage groups; vLLM fills it in).
        tensors = DirectorySource(src, hf).tensors()
        stream = _stream(config, tensors, expected, target, seen_dtypes, result, bar)
        # The saver casts after deciding where a shard ends, so a cast never holds more than one output shard.
        weight_map = save_sharded(
            stream, tmp, shard_bytes=shard_bytes, metadata={"source": "qwen v1"}, dtype=target
        )
    missing = sorted(set(expected) - set(weight_map))
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise CheckpointError(f"{src} lacks tensor(s) a qwen2 model needs: {', '.join(missing[:5])}{more}")
    result.shards = len(set(weight_map.values()))

    dtype_name = _dtype_name(target or _main_dtype(seen_dtypes, config))
    result.torch_dtype = dtype_name
    out_cfg["torch_dtype"] = dtype_name
    write_json(tmp / "config.json", out_cfg)
    generation, notes = generation_config(generation_src, chat)
    write_json(tmp / "generation_config.json", generation)
    result.notes += notes
    result.files += ["config.json", "generation_config.json"]
    if config.quantization:
        quant = {k: v for k, v in config.quantization.items() if k != "quant_method"}
        write_json(tmp / "quantize_config.json", quant)
        result.files.append("quantize_config.json")
    result.files += _write_tokenizer(src, tmp, out_cfg["max_position_embeddings"], chat, result.notes)
    result.files += _copy_license(src, tmp, result.notes)
    if _lossy(seen_dtypes, target):
        src_names = ", ".join(sorted(_dtype_name(d) for d in seen_dtypes))
        result.notes.append(
            f"{src_names} -> {dtype_name} rounds the weights; the output is close to, "
            "not identical with, its source"
        )


def _stream(
    config: ModelConfig,
    tensors: Iterator[tuple[str, torch.Tensor]],
    expected: dict[str, tuple[int, ...] | None],
    target: torch.dtype | None,
    seen_dtypes: set[torch.dtype],
    result: ConversionResult,
    bar: tqdm,
) -> Iterator[tuple[str, torch.Tensor]]:
    """sanitize's output, checked against the qwen2 model, zero GPTQ biases dropped, cast to ``target``."""

    def counted() -> Iterator[tuple[str, torch.Tensor]]:
        for name, tensor in tensors:
            yield name, tensor
            bar.update(tensor.numel() * tensor.element_size())

    for name, tensor in sanitize(config, counted()):
        if name not in expected:
            if _is_bias_qwen2_lacks(name, expected):
                if tensor.any():
                    raise CheckpointError(
                        f"{name} is a non-zero bias, but Qwen2 has no bias on {name.rsplit('.', 2)[-2]}; "
                        "converting would change the model"
                    )
                result.dropped_zero_biases += 1
                continue
            raise CheckpointError(f"unexpected tensor {name!r} for a Qwen v1 model (after renaming)")
        shape = expected[name]
        if shape is not None and tuple(tensor.shape) != shape:
            raise CheckpointError(
                f"tensor {name!r} has shape {tuple(tensor.shape)}, but config.json implies {shape}"
            )
        if tensor.is_floating_point():
            seen_dtypes.add(tensor.dtype)
            if target == torch.float16 and tensor.dtype != target:
                check_float16_fits(name, tensor)
        result.tensors += 1
        cast = target if target is not None and tensor.is_floating_point() else tensor.dtype
        result.bytes_written += tensor.numel() * cast.itemsize
        bar.set_postfix(tensors=result.tensors, refresh=False)
        yield name, tensor


def _expected_tensors(out_cfg: dict[str, Any]) -> dict[str, tuple[int, ...] | None]:
    """Every tensor name the qwen2 model takes, with its shape (None where GPTQ packing decides it)."""
    from torch import nn

    from qwenkit.model import Transformer

    cfg = ModelConfig.from_hf(out_cfg)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected: dict[str, tuple[int, ...] | None] = {
        n: tuple(p.shape) for n, p in model.named_parameters() if not n.startswith("rotary.")
    }
    if cfg.quantization:
        # GPTQ quantizes every Linear inside the blocks; their float weight becomes four packed tensors.
        for module_name, module in model.named_modules():
            if isinstance(module, nn.Linear) and module_name.startswith("model.layers."):
                del expected[f"{module_name}.weight"]
                expected |= {f"{module_name}.{kind}": None for kind in GPTQ_TENSORS}
    return expected


def _is_bias_qwen2_lacks(name: str, expected: dict[str, Any]) -> bool:
    module = name.removesuffix(".bias")
    return name.endswith(".bias") and (f"{module}.weight" in expected or f"{module}.qweight" in expected)


# ---- config, generation config, tokenizer, license ---------------------------------------------------


def qwen2_config(v1: dict[str, Any], config: ModelConfig, torch_dtype: str, chat: bool) -> dict[str, Any]:
    """The ``Qwen2ForCausalLM`` config.json for a v1 config (qwen_facts §5.2)."""
    out: dict[str, Any] = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,  # the real FFN width: v1's value halved
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_attention_heads,  # v1 is plain multi-head attention
        "head_dim": config.head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": config.rope_theta,  # v1 rotary_emb_base: 10000, or 1e6 for Qwen-72B
        "rope_scaling": None,  # nothing in qwen2 reproduces v1 dynamic NTK + LogN (§5.3)
        # The trained length: past it v1 relied on dynamic NTK / LogN, which qwen2 does not have.
        "max_position_embeddings": config.max_position_embeddings,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": config.num_hidden_layers,
        "attention_dropout": 0.0,
        "initializer_range": v1.get("initializer_range", 0.02),
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": config.bos_token_id if config.bos_token_id is not None else ENDOFTEXT_ID,
        "eos_token_id": IM_END_ID if chat else ENDOFTEXT_ID,
        "torch_dtype": torch_dtype,
    }
    if config.quantization:
        out["quantization_config"] = {**config.quantization, "quant_method": "gptq"}
    return out


def generation_config(v1: dict[str, Any], chat: bool) -> tuple[dict[str, Any], list[str]]:
    """generation_config.json: v1 eos and single-token stop words become the eos list (<|im_end|> first
    for chat models), sampling defaults carry over; v1-only keys (chat_format, stop_words_ids,
    max_window_size) are dropped. Returns the config and notes for the user."""
    notes: list[str] = []
    eos: list[int] = [IM_END_ID] if chat else []
    source_eos = v1.get("eos_token_id", ENDOFTEXT_ID)
    stops = v1.get("stop_words_ids") or []
    for token_id in [
        *(source_eos if isinstance(source_eos, list) else [source_eos]),
        *(s[0] for s in stops if len(s) == 1),
    ]:
        if int(token_id) not in eos:
            eos.append(int(token_id))
    long_stops = [s for s in stops if len(s) > 1]
    if long_stops:
        notes.append(f"multi-token stop words {long_stops} cannot be eos ids; pass them as stop strings")
    out: dict[str, Any] = {
        "bos_token_id": ENDOFTEXT_ID,
        "pad_token_id": int(v1.get("pad_token_id", ENDOFTEXT_ID)),
        "eos_token_id": eos if len(eos) > 1 else eos[0],
    }
    out |= {key: v1[key] for key in SAMPLING_KEYS if key in v1}
    return out, notes


def _write_tokenizer(src: Path, tmp: Path, max_length: int, chat: bool, notes: list[str]) -> list[str]:
    tiktoken_file = src / "qwen.tiktoken"
    if not tiktoken_file.is_file():
        notes.append(f"{src} has no qwen.tiktoken: no tokenizer written; copy one from the original model")
        return []
    from qwenkit.tokenizer.tiktoken_to_hf import convert_tiktoken

    convert_tiktoken(tiktoken_file, tmp, model_max_length=max_length)
    if not chat:  # a base model ends documents with <|endoftext|>, as Qwen1.5 base tokenizers say
        cfg_path = tmp / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        cfg["eos_token"] = "<|endoftext|>"
        write_json(cfg_path, cfg)
    return ["tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"]


def _copy_license(src: Path, tmp: Path, notes: list[str]) -> list[str]:
    copied = []
    for name in LICENSE_FILES:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / name)
            copied.append(name)
    if not copied:
        lic = find_license(src)
        terms = f" ({lic.terms})" if lic else ""
        notes.append(
            f"{src} has no LICENSE or NOTICE file to copy; the weights' license still applies{terms}"
        )
    return copied


def long_context_note(config: ModelConfig) -> str:
    """What changes past the trained length when v1's long-context tricks are dropped (qwen_facts §5.3)."""
    tricks = [
        t
        for t, on in (
            ("dynamic NTK RoPE", config.use_dynamic_ntk),
            ("LogN attention scaling", config.use_logn_attn),
        )
        if on
    ]
    return (
        f"the source uses {' and '.join(tricks)}, which Qwen2 does not have: up to its trained length "
        f"({config.max_position_embeddings} tokens) the converted model computes the same function; past it "
        "the outputs differ (qwen2's rope_scaling 'dynamic' uses another formula, so none is written, and "
        f"max_position_embeddings is set to {config.max_position_embeddings})"
    )


# ---- helpers ----------------------------------------------------------------------------------------


def _target_dtype(dtype: str | None, config: ModelConfig) -> torch.dtype | None:
    if dtype is None:
        return None
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    if config.quantization and dtype != "float16":
        raise ConfigError("GPTQ checkpoints keep their float16 scales; drop --dtype or pass float16")
    return DTYPES[dtype]


def _main_dtype(seen: set[torch.dtype], config: ModelConfig) -> torch.dtype:
    """The source's float dtype; for a mix (rare), the one config.json names, else the widest."""
    if len(seen) == 1:
        return next(iter(seen))
    if config.torch_dtype in DTYPES and DTYPES[config.torch_dtype] in seen:
        return DTYPES[config.torch_dtype]
    return max(seen, key=lambda d: torch.finfo(d).bits) if seen else torch.float32


def _lossy(source_dtypes: set[torch.dtype], target: torch.dtype | None) -> bool:
    """Whether casting changed values: anything but keeping the dtype or widening to float32."""
    return target is not None and target != torch.float32 and any(d != target for d in source_dtypes)


def check_float16_fits(name: str, tensor: torch.Tensor) -> None:
    """CheckpointError where float16 would turn a value of tensor ``name`` into inf: a checkpoint
    written that way would compute another function."""
    if not tensor.numel():
        return
    lo, hi = torch.aminmax(tensor)  # a reduction: no tensor-sized temporary
    peak = max(-float(lo), float(hi))
    if math.isfinite(peak) and peak >= FLOAT16_OVERFLOW:
        raise CheckpointError(
            f"{name} holds {peak:g}, which overflows float16; convert to bfloat16 or float32"
        )


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)


def _check_disk_space(weights: WeightFiles, target: torch.dtype | None, where: Path) -> None:
    """Refuse early when the output clearly cannot fit (estimated from the safetensors headers)."""
    need = 0
    for path in weights.files:
        if path.suffix != ".safetensors":
            need += path.stat().st_size
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    s = f.get_slice(name)
                    numel, kind = math.prod(s.get_shape()), s.get_dtype()
                    if kind in _FLOAT_BYTES and target is not None:
                        need += numel * target.itemsize
                    else:  # kept as is: integer (GPTQ) tensors, or floats without --dtype
                        need += numel * _FLOAT_BYTES.get(kind, _INT_BYTES.get(kind, 4))
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    free = shutil.disk_usage(where).free
    if need > free:
        raise CheckpointError(
            f"not enough disk space in {where}: the output needs about {_gb(need)}, {_gb(free)} free"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON: {e}") from None
    return data if isinstance(data, dict) else {}


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"
