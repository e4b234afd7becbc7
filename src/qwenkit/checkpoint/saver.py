"""Write tensors as sharded safetensors with a Hugging Face ``model.safetensors.index.json``.

Tensors arrive as a stream and leave in shards of at most ``shard_bytes``, so a writer never holds more
than one shard in memory (what the v1 -> qwen2 converter and the quantizer rely on).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import save_file

from qwenkit.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(text: str) -> int:
    """'5GB' -> 5_000_000_000 (Hugging Face's convention: GB is 10^9, GiB is 2^30)."""
    m = _SIZE.match(text)
    if not m:
        raise ConfigError(f"cannot read size {text!r}; write it like 5GB, 500MB or 2GiB")
    number, unit = float(m.group(1)), (m.group(2) or "B").lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ConfigError(f"size {text!r} must be positive")
    return size


def save_sharded(
    tensors: Iterable[tuple[str, torch.Tensor]],
    out_dir: str | Path,
    shard_bytes: int = 5 * 10**9,
    metadata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Stream tensors into ``model-0000i-of-0000n.safetensors`` shards; return the weight map."""
    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_files: list[str] = []
    current = 0
    total = 0

    def flush() -> None:
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt", **(metadata or {})})
        shard_files.append(name)
        shards[-1] = {}

    weight_map: dict[str, str] = {}
    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shards[-1] and current + size > shard_bytes:
            flush()
            current = 0
        shards[-1][name] = tensor.contiguous()
        weight_map[name] = str(len(shard_files))  # shard ordinal, renamed below
        current += size
        total += size
    if shards[-1]:
        flush()

    n = len(shard_files)
    final_names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    if n == 1:
        final_names = ["model.safetensors"]
    for old, new in zip(shard_files, final_names, strict=True):
        (out / old).rename(out / new)
    weight_map = {k: final_names[int(v)] for k, v in weight_map.items()}
    if n > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return weight_map
