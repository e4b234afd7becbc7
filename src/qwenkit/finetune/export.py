"""Write a trained or merged model as a complete Hugging Face directory beside its tokenizer files."""

from __future__ import annotations

from pathlib import Path

import torch

from qwenkit.checkpoint.loader import open_checkpoint
from qwenkit.checkpoint.output_dir import write_json
from qwenkit.checkpoint.saver import save_sharded
from qwenkit.checkpoint.side_files import write_side_files
from qwenkit.config import ModelConfig
from qwenkit.errors import ConfigError


def check_exportable(model_path: str | Path) -> None:
    """Formats whose float weights we can write back under the source's own config."""
    config = ModelConfig.from_hf(open_checkpoint(model_path).hf_config)
    if config.family == "qwen":
        raise ConfigError(
            "full fine-tuning and merging write the Qwen1.5 layout; convert the Qwen v1 checkpoint first "
            "(qwenkit convert MODEL OUT --to qwen2)"
        )
    if config.quantization:
        raise ConfigError("cannot write weights into a quantized checkpoint; use the float model")


def write_model_dir(
    model_path: str | Path,
    tensors: dict[str, torch.Tensor],
    out: Path,
    dtype: torch.dtype,
    tied: bool,
    made_by: str,
) -> None:
    """config.json (the source's, with torch_dtype), safetensors shards, and the source's tokenizer,
    generation and license files (``made_by``: the command, named in a model card a license needs)."""
    source = open_checkpoint(model_path)
    names = {k: v for k, v in tensors.items() if not k.startswith("rotary.")}
    if tied:
        names.pop("lm_head.weight", None)
    save_sharded(names.items(), out, dtype=dtype, metadata={"format": "pt"})
    dtype_name = str(dtype).removeprefix("torch.")
    config = {**source.hf_config, "torch_dtype": dtype_name}
    if "dtype" in config:  # transformers 5's name for it, read before torch_dtype: the source's would stay
        config["dtype"] = dtype_name
    if not tied and config.get("tie_word_embeddings"):  # lm_head.weight is written: it is read, not tied
        config["tie_word_embeddings"] = False
    write_json(out / "config.json", config)
    write_side_files(source, out, made_by)
