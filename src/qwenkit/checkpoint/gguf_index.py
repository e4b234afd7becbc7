"""A GGUF file's header (metadata and tensor table): parsed here, and cached for the next start.

The format (llama.cpp's docs/gguf.md, versions 2 and 3, little-endian): magic, version, tensor and
key-value counts, the key-values (each a string key, a value type and the value: a number, a bool, a
string, or an array of one type), the tensor infos (name, dimensions innermost first, block type, offset
from the data start), then the data, aligned to ``general.alignment`` (default 32). gguf-py's reader
builds a numpy memory-map slice for every element of every array: 5 s for the bundled model's 49k-token
vocabulary and 49k merges (2026-12-01), about three times that for a Qwen vocabulary, paid at the first
open of every file. Here each value is read with one ``struct`` call (numeric arrays with one numpy
call), which gives the same values (a test compares them with gguf-py's on the bundled model and on
files holding every value type). Problems come as :class:`GGUFHeaderError` saying what is wrong and
where; the caller adds the file's name.

The parsed header of a file of 16 MiB and more is also kept under the user's cache directory
(``$QWENKIT_CACHE`` or ``~/.cache/qwenkit``, in ``gguf-index/``) and reused while the file is unchanged.
The cache key hashes the file's size, modification time and first MiB (which holds the header): any
rewrite of the file changes it. Entries are written atomically (temporary file, then rename), a
corrupt or unreadable entry is parsed again and rewritten, and a cache directory that cannot be written
only costs the speed-up.
"""

from __future__ import annotations

import hashlib
import json
import math
import mmap
import os
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qwenkit.checkpoint.gguf_types import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType
from qwenkit.user_cache import cache_root_or_none

FORMAT = 1  # bump when the entry layout changes
HEAD_BYTES = 1 << 20
MIN_CACHED_BYTES = 16 << 20  # smaller files parse in milliseconds: not worth a cache entry


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of the file: GGUF name, block type, PyTorch-order shape, and where its bytes are (in
    ``part``, 0-based, of a model split into several files: ``gguf_split``)."""

    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]
    offset: int
    n_bytes: int
    part: int = 0


@dataclass(frozen=True)
class GGUFIndex:
    metadata: dict[str, Any]
    tensors: list[TensorEntry]


def read_index(path: Path) -> GGUFIndex:
    """The file's header, from the cache when it holds this version of the file, else parsed (and cached).

    Parsing errors are gguf-py's own (``ValueError`` and friends); the caller words them.
    """
    root = cache_root_or_none() if path.stat().st_size >= MIN_CACHED_BYTES else None
    if root is None:
        return _parse(path)
    entry = root / "gguf-index" / f"{_key(path)}.json"
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


class GGUFHeaderError(ValueError):
    """A GGUF header that cannot be read, and why (without the file's name: the caller adds it)."""


MAGIC = b"GGUF"
VERSIONS = (2, 3)  # 1 had 32-bit counts and lengths; llama.cpp has not read it since 2023
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
# struct formats of the scalar value types; numpy reads arrays of them with the same codes
_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "B", GGUFValueType.INT8: "b", GGUFValueType.UINT16: "H", GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I", GGUFValueType.INT32: "i", GGUFValueType.FLOAT32: "f", GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q", GGUFValueType.INT64: "q", GGUFValueType.FLOAT64: "d",
}  # fmt: skip
_SCALARS = {t: struct.Struct("<" + f) for t, f in _SCALAR_FORMATS.items()}
_U32, _U64 = _SCALARS[GGUFValueType.UINT32], _SCALARS[GGUFValueType.UINT64]


def _parse(path: Path) -> GGUFIndex:
    """The header of the GGUF file at ``path``; :class:`GGUFHeaderError` says what stops it."""
    with path.open("rb") as f:
        start = f.read(4)
        if start != MAGIC:
            raise GGUFHeaderError(f"not a GGUF file (it starts with {start!r}, not {MAGIC!r})")
        if os.fstat(f.fileno()).st_size < 24:
            raise GGUFHeaderError("the header is truncated: the file ends before its counts")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _HeaderReader(buf).read()


class _HeaderReader:
    """Reads a header front to back; every read checks it stays inside the file. Values are copied out
    as Python objects (slices of an mmap are bytes), so nothing keeps the map open."""

    def __init__(self, buf: mmap.mmap) -> None:
        self.buf, self.pos, self.end = buf, 0, len(buf)

    def read(self) -> GGUFIndex:
        self.pos = 4  # past the magic, which _parse has checked
        version = self.u32("the version")
        if version and not version & 0xFFFF:
            raise GGUFHeaderError(
                "a big-endian GGUF file: qwenkit reads little-endian ones (llama.cpp's default)"
            )
        if version not in VERSIONS:
            raise GGUFHeaderError(
                f"GGUF version {version}; qwenkit reads versions {VERSIONS[0]} and {VERSIONS[1]}"
            )
        tensor_count, kv_count = self.u64("the tensor count"), self.u64("the key-value count")
        # each key-value takes at least 12 bytes and each tensor info 24: bounds a corrupt count early
        if 12 * kv_count + 24 * tensor_count > self.end - self.pos:
            raise GGUFHeaderError(
                f"the header is truncated or corrupt: {kv_count:,} key-values and {tensor_count:,} tensors "
                f"cannot fit in the file's {self.end:,} bytes"
            )
        metadata: dict[str, Any] = {
            "GGUF.version": version, "GGUF.tensor_count": tensor_count, "GGUF.kv_count": kv_count,
        }  # fmt: skip
        types: dict[str, int] = {}
        for i in range(kv_count):
            key = self.string(f"key-value {i}'s key")
            if key in metadata:
                raise GGUFHeaderError(f"metadata key {key} appears twice")
            types[key] = self.u32(f"the type of {key}")
            metadata[key] = self.value(types[key], key)
        infos = [self.tensor_info(i) for i in range(tensor_count)]
        alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if types.get("general.alignment", GGUFValueType.UINT32) != GGUFValueType.UINT32 or (
            alignment <= 0 or alignment & (alignment - 1)
        ):
            raise GGUFHeaderError(f"general.alignment must be a uint32 power of two, not {alignment!r}")
        data_start = -(-self.pos // alignment) * alignment
        tensors = [
            TensorEntry(name, qtype, shape, data_start + offset, n_bytes)
            for name, qtype, shape, offset, n_bytes in infos
        ]
        return GGUFIndex(metadata, tensors)

    def take(self, n: int, what: str) -> int:
        """Moves past n bytes and returns where they start."""
        start = self.pos
        if start + n > self.end:
            raise GGUFHeaderError(
                f"the header is truncated: {what} at byte {start:,} runs past the end of the file "
                f"({self.end:,} bytes)"
            )
        self.pos = start + n
        return start

    def u32(self, what: str) -> int:
        return _U32.unpack_from(self.buf, self.take(4, what))[0]

    def u64(self, what: str) -> int:
        return _U64.unpack_from(self.buf, self.take(8, what))[0]

    def string(self, what: str) -> str:
        n = self.u64(what)
        start = self.take(n, what)
        return self.decode(self.buf[start : start + n], what)

    @staticmethod
    def decode(raw: bytes, what: str) -> str:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise GGUFHeaderError(f"{what} is not UTF-8 text ({e.reason} at byte {e.start})") from None

    def value(self, vtype: int, what: str) -> Any:
        scalar = _SCALARS.get(vtype)  # type: ignore[call-overload]
        if scalar is not None:
            return scalar.unpack_from(self.buf, self.take(scalar.size, what))[0]
        if vtype == GGUFValueType.STRING:
            return self.string(what)
        if vtype == GGUFValueType.ARRAY:
            return self.array(what)
        raise GGUFHeaderError(f"{what} has value type {vtype}, which GGUF does not define")

    def array(self, what: str) -> list[Any]:
        """An array's items: numbers in one numpy read, strings one by one, nested arrays as lists."""
        itype = self.u32(f"the item type of {what}")
        n = self.u64(f"the length of {what}")
        fmt = _SCALAR_FORMATS.get(itype)  # type: ignore[call-overload]
        if fmt is not None:
            size = _SCALARS[itype].size * n  # type: ignore[index]
            start = self.take(size, what)
            return np.frombuffer(self.buf[start : start + size], dtype="<" + fmt).tolist()
        if itype == GGUFValueType.STRING:
            return self.strings(n, what)
        if n > (self.end - self.pos) // 12:  # every nested array takes 12 bytes or more
            self.take(12 * n, what)
        return [self.value(itype, f"{what}[{i}]") for i in range(n)]

    def strings(self, n: int, what: str) -> list[str]:
        """n strings (a vocabulary's tokens or merges: the loop that decides the parse's speed)."""
        if n > (self.end - self.pos) // 8:
            self.take(8 * n, what)  # raises: not even the lengths fit
        buf, pos, end, length_at = self.buf, self.pos, self.end, _U64.unpack_from
        out: list[str] = []
        append = out.append
        for i in range(n):
            size = length_at(buf, pos)[0] if pos + 8 <= end else end
            if pos + 8 + size > end:
                self.pos = pos
                self.string(f"{what}[{i}]")  # raises, naming the item
            raw = buf[pos + 8 : pos + 8 + size]
            pos += 8 + size
            try:
                append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                self.decode(raw, f"{what}[{i}]")
        self.pos = pos
        return out

    def tensor_info(self, i: int) -> tuple[str, GGMLQuantizationType, tuple[int, ...], int, int]:
        """(name, block type, shape outermost first, offset from the data start, bytes)."""
        name = self.string(f"tensor {i}'s name")
        n_dims = self.u32(f"the dimension count of {name}")
        if n_dims > MAX_DIMS:
            raise GGUFHeaderError(f"tensor {name} has {n_dims} dimensions; GGUF allows at most {MAX_DIMS}")
        dims = [self.u64(f"the dimensions of {name}") for _ in range(n_dims)]
        raw_type = self.u32(f"the type of {name}")
        offset = self.u64(f"the offset of {name}")
        try:
            qtype = GGMLQuantizationType(raw_type)
        except ValueError:
            raise GGUFHeaderError(f"tensor {name} has block type {raw_type}, unknown to gguf-py") from None
        if qtype not in GGML_QUANT_SIZES:
            raise GGUFHeaderError(
                f"tensor {name} has block type {qtype.name}, which gguf-py has no sizes for"
            )
        block, block_bytes = GGML_QUANT_SIZES[qtype]
        if dims and dims[0] % block:
            raise GGUFHeaderError(
                f"tensor {name}: rows of {dims[0]} values are not whole {qtype.name} blocks of {block}"
            )
        n_bytes = math.prod(dims) // block * block_bytes
        return name, qtype, tuple(reversed(dims)), offset, n_bytes


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
                f.write(json.dumps(data))  # one C-encoder pass: json.dump encodes in Python, 3x slower
            os.replace(tmp, entry)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    except OSError:
        pass  # a read-only or full cache directory only costs the speed-up
