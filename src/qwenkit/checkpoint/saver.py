"""Write tensors as sharded safetensors with a Hugging Face ``model.safetensors.index.json``.

Tensors arrive as a stream and leave in shards of at most ``shard_bytes``, so a writer never holds more
than one shard in memory (what the v1 -> qwen2 converter and the quantizer rely on). Shards are written
tensor by tensor: ``safetensors.torch.save_file`` first serializes a whole shard into one bytes object,
which would hold every shard twice.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import re
from collections.abc import Iterable
from pathlib import Path

import torch

from qwenkit.errors import ConfigError

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS. glibc keeps freed blocks under its 32 MB mmap threshold
    (most layer tensors) in the heap, so without this a streamed shard stays in RSS after it is written."""
    with contextlib.suppress(OSError, AttributeError):  # not glibc: nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


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
    dtype: torch.dtype | None = None,
) -> dict[str, str]:
    """Stream tensors into ``model-0000i-of-0000n.safetensors`` shards; return the weight map.

    ``dtype`` casts floating tensors; the cast happens after the previous shard is flushed, so casting
    never holds more than one output shard.
    """
    out = Path(out_dir)
    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_files: list[str] = []
    current = 0
    total = 0

    def flush() -> None:
        name = f"model-{len(shard_files) + 1:05d}.safetensors"
        write_safetensors(out / name, shards[-1], metadata={"format": "pt", **(metadata or {})})
        shard_files.append(name)
        shards[-1] = {}
        release_freed_memory()

    weight_map: dict[str, str] = {}
    for name, tensor in tensors:
        cast = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
        size = tensor.numel() * cast.itemsize
        if shards[-1] and current + size > shard_bytes:
            flush()
            current = 0
        shards[-1][name] = tensor.to(cast).contiguous()
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


_DTYPE_CODES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
    torch.bool: "BOOL",
}  # fmt: skip


def write_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Write one safetensors file, streaming each tensor's bytes (format: 8-byte header length, JSON
    header of dtype/shape/offsets padded to 8 bytes, then the raw little-endian data)."""
    header: dict[str, object] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for name, t in tensors.items():
        if t.dtype not in _DTYPE_CODES:
            raise ConfigError(f"cannot save tensor {name!r} of dtype {t.dtype} as safetensors")
        size = t.numel() * t.element_size()
        header[name] = {
            "dtype": _DTYPE_CODES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for t in tensors.values():
            if t.numel():
                f.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
