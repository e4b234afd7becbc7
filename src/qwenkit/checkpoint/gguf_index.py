"""A GGUF file's header (metadata and tensor table), parsed once and cached for the next start.

gguf-py reads every metadata value element by element through numpy memory-map slices; for a model with
a 49k-token vocabulary and 49k merges that is most of a second, at every start. The parsed header is
small (a JSON of ~2 MB for SmolLM2), so for files of 16 MiB and more it is kept under the user's cache
directory (``$QWENKIT_CACHE`` or ``~/.cache/qwenkit``, in ``gguf-index/``) and reused while the file is
unchanged.

The cache key hashes the file's size, modification time and first MiB (which holds the header): any
rewrite of the file changes it. Entries are written atomically (temporary file, then rename), a
corrupt or unreadable entry is parsed again and rewritten, and a cache directory that cannot be written
only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGMLQuantizationType, GGUFReader

from qwenkit.checkpoint.user_cache import cache_root

FORMAT = 1  # bump when the entry layout changes
HEAD_BYTES = 1 << 20
MIN_CACHED_BYTES = 16 << 20  # smaller files parse in milliseconds: not worth a cache entry


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: GGUF name, block type, PyTorch-order shape, and where its bytes are."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFIndex:
    metadata: dict[str, Any]
    tensors: list[TensorEntry]


def read_index(path: Path) -> GGUFIndex:
    """The file's header, from the cache when it holds this version of the file, else parsed (and cached).

    Parsing errors are gguf-py's own (``ValueError`` and friends); the caller words them.
    """
    if path.stat().st_size < MIN_CACHED_BYTES:
        return _parse(path)
    entry = cache_root() / "gguf-index" / f"{_key(path)}.json"
    cached = _load(entry)
    if cached is not None:
        return cached
    index = _parse(path)
    _store(entry, index)
    return index


def _key(path: Path) -> str:
    st = path.stat()
    h = hashlib.sha256(f"{FORMAT}:{st.st_size}:{st.st_mtime_ns}:".encode())
    with path.open("rb") as f:
        h.update(f.read(HEAD_BYTES))
    return h.hexdigest()


def _parse(path: Path) -> GGUFIndex:
    reader = GGUFReader(path, mode="r")
    metadata = {name: field.contents() for name, field in reader.fields.items()}
    tensors = [
        TensorEntry(
            t.name,
            t.tensor_type,
            tuple(int(d) for d in reversed(t.shape.tolist())),  # GGUF lists the innermost dimension first
            int(t.data_offset),
            int(t.n_bytes),
        )
        for t in reader.tensors
    ]
    return GGUFIndex(metadata, tensors)


def _load(entry: Path) -> GGUFIndex | None:
    try:
        raw = json.loads(entry.read_text(encoding="utf-8"))
        tensors = [
            TensorEntry(name, GGMLQuantizationType(qtype), tuple(shape), offset, n_bytes)
            for name, qtype, shape, offset, n_bytes in raw["tensors"]
        ]
        return GGUFIndex(raw["metadata"], tensors)
    except (OSError, ValueError, KeyError, TypeError):
        return None  # missing or damaged: parse the file again


def _store(entry: Path, index: GGUFIndex) -> None:
    data = {
        "metadata": index.metadata,
        "tensors": [[t.name, int(t.tensor_type), list(t.shape), t.offset, t.n_bytes] for t in index.tensors],
    }
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=entry.name, suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(data, f)
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only or full cache directory only costs the speed-up
