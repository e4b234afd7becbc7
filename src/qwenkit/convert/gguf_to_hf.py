"""Convert a GGUF file into a Hugging Face checkpoint directory.

The mapping is the GGUF reader's (``read_gguf``: names, dequantization, llama's q/k permutation, Qwen
v1's fused QKV) and the writing is the checkpoint saver's; this module only joins them and writes the
JSON files beside the weights. The directory is built under a temporary name next to ``out_dir`` and
renamed at the end, so an interrupted conversion never leaves a half-written checkpoint behind.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from qwenkit.checkpoint.gguf import read_gguf
from qwenkit.checkpoint.gguf_rank import refuse_rank
from qwenkit.checkpoint.loader import DTYPES
from qwenkit.checkpoint.output_dir import atomic_output_dir, check_out_dir, write_json
from qwenkit.checkpoint.saver import save_sharded
from qwenkit.checkpoint.side_files import write_side_files
from qwenkit.convert.v1_to_qwen2 import check_float16_fits
from qwenkit.errors import CheckpointError


def convert_gguf_to_hf(
    gguf_path: str | Path,
    out_dir: str | Path,
    dtype: str | torch.dtype = "float32",
    overwrite: bool = False,
    shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write config.json, model.safetensors (sharded past ``shard_bytes``), tokenizer.json,
    tokenizer_config.json and generation_config.json for the model in ``gguf_path``; return ``out_dir``.

    Weights are dequantized to float32 and stored in ``dtype``. An existing ``out_dir`` is refused
    unless ``overwrite`` is true, and then replaced only once the new directory is complete.
    """
    out = Path(out_dir)
    torch_dtype = _dtype(dtype)
    check_out_dir(out, overwrite, source=Path(gguf_path))  # not the directory that holds the GGUF
    ckpt = read_gguf(gguf_path)  # checks the whole file before anything is written
    refuse_rank(ckpt, "a Hugging Face causal LM's directory")
    if "tokenizer.ggml.model" in ckpt.metadata:
        ckpt.tokenizer_config  # noqa: B018  # builds the tokenizer: one it refuses costs no weight decoding
    with atomic_output_dir(out, overwrite) as tmp:
        config: dict[str, Any] = {**ckpt.hf_config, "torch_dtype": _dtype_name(torch_dtype)}
        save_sharded(
            _refuse_float16_overflow(ckpt.tensors(), torch_dtype),
            tmp,
            shard_bytes=shard_bytes,
            metadata={"source": "gguf"},
            dtype=torch_dtype,
        )
        if ckpt.headless:  # an embedding model's, with no head of its own: none tied (Qwen3-Embedding-8B's)
            config["tie_word_embeddings"] = False
        write_json(tmp / "config.json", config)
        write_side_files(ckpt, tmp, "`qwenkit convert --to hf`")
    return out


def _refuse_float16_overflow(
    tensors: Iterator[tuple[str, torch.Tensor]], dtype: torch.dtype
) -> Iterator[tuple[str, torch.Tensor]]:
    """Pass the tensors on; one that float16 would turn into inf is refused (as ``--to qwen2`` does)."""
    for name, tensor in tensors:
        if dtype == torch.float16 and tensor.is_floating_point():
            check_float16_fits(name, tensor)
        yield name, tensor


def _dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype not in DTYPES.values():
            raise CheckpointError(f"cannot save weights as {dtype}; choose {', '.join(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise CheckpointError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, d in DTYPES.items() if d == dtype)
