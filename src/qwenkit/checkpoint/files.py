"""Find a checkpoint's weight files and read their tensors lazily (memory-mapped, one at a time).

Supports safetensors (single file or sharded with ``model.safetensors.index.json``) and legacy
``pytorch_model*.bin`` through ``torch.load(weights_only=True, mmap=True)``, which never unpickles
arbitrary objects.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import json
import os
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from qwenkit.checkpoint.gguf_split import part_files
from qwenkit.errors import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".json", ".gguf", ".tiktoken", ".model")


def files_sha256(path: Path, sample: int | None = None) -> str:
    """One hash over a checkpoint file, or over a directory's weight, config and tokenizer files (names
    and contents). ``sample`` bytes: each file's size and its first and last ``sample`` bytes instead
    of all of it (a safetensors header and the last tensor's values): seconds saved on a large model
    where what is asked is "the same files?", not proof against tampering. A split GGUF's first part
    stands for all its parts."""
    files = (
        part_files(path)
        if path.is_file()
        else sorted(f for f in path.iterdir() if f.is_file() and f.suffix in _IDENTITY_SUFFIXES)
    )
    digest = hashlib.sha256()
    for f in files:
        digest.update(f.name.encode())
        with open(f, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            if sample is not None and size > 2 * sample:
                digest.update(f"{size}".encode())
                digest.update(fh.read(sample))
                fh.seek(size - sample)
                digest.update(fh.read(sample))
                continue
            while block := fh.read(1 << 20):
                digest.update(block)
    return digest.hexdigest()


@dataclass(frozen=True)
class WeightFiles:
    """The weight files of a checkpoint directory and, when sharded, which tensor lives in which file."""

    directory: Path
    files: tuple[Path, ...]
    weight_map: dict[str, str] = field(default_factory=dict)  # tensor name -> file name; empty if unsharded
    # ``.bin`` files already unpickled (memory-mapped) to learn their names and shapes, handed to the
    # read of the tensors that follows instead of unpickling each file a second time
    read_ahead: dict[Path, dict[str, torch.Tensor]] = field(default_factory=dict, compare=False, repr=False)

    def torch_state(self, path: Path) -> dict[str, torch.Tensor]:
        """A ``.bin`` file's state dict (memory-mapped), read once and kept for ``iter_tensors``."""
        if path not in self.read_ahead:
            self.read_ahead[path] = load_torch_state(path, mmap=True)
        return self.read_ahead[path]

    @property
    def total_bytes(self) -> int:
        return sum(f.stat().st_size for f in self.files)


def find_weight_files(directory: str | Path) -> WeightFiles:
    """Locate the weights: an index file wins, then *.safetensors, then pytorch_model*.bin."""
    d = Path(directory)
    for index_name in (SAFETENSORS_INDEX, BIN_INDEX):
        index_path = d / index_name
        if index_path.is_file():
            return _from_index(d, index_path)
    safetensors = sorted(d.glob("*.safetensors"))
    if safetensors:
        return WeightFiles(d, tuple(safetensors))
    bins = sorted(d.glob("pytorch_model*.bin"))
    if bins:
        return WeightFiles(d, tuple(bins))
    raise CheckpointError(
        f"{d} has no weights (looked for *.safetensors, {SAFETENSORS_INDEX}, pytorch_model*.bin)"
    )


def _from_index(d: Path, index_path: Path) -> WeightFiles:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path} is not a valid index (needs a 'weight_map'): {e}") from None
    names = sorted(set(weight_map.values()))
    missing = [n for n in names if not (d / n).is_file()]
    if missing:
        raise CheckpointError(f"{index_path.name} lists shard(s) missing from {d}: {', '.join(missing)}")
    return WeightFiles(d, tuple(d / n for n in names), dict(weight_map))


def iter_tensors(weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) file by file. safetensors tensors are views of the memory-mapped file."""
    for path in weights.files:
        expected = (
            {k for k, v in weights.weight_map.items() if v == path.name} if weights.weight_map else None
        )
        seen: set[str] = set()
        for name, tensor in _read_file(path, weights):
            if expected is not None and name not in expected:
                raise CheckpointError(
                    f"{path.name} holds tensor {name!r}, but the index maps it to "
                    f"{weights.weight_map.get(name, 'no file')}"
                )
            seen.add(name)
            yield name, tensor
        if expected is not None and expected - seen:
            absent = sorted(expected - seen)
            raise CheckpointError(
                f"{path.name} lacks tensor(s) the index puts there: {', '.join(absent[:5])}"
                + (f" and {len(absent) - 5} more" if len(absent) > 5 else "")
            )


def tensor_names(weights: WeightFiles) -> set[str]:
    """Every tensor name of the checkpoint, without reading a tensor: the index's map, else the
    safetensors headers (a ``.bin`` file's pickle is read memory-mapped)."""
    if weights.weight_map:
        return set(weights.weight_map)
    names: set[str] = set()
    for path in weights.files:
        if path.suffix != ".safetensors":
            names |= set(weights.torch_state(path))
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                names |= set(f.keys())
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
    return names


def _read_file(path: Path, weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                    yield name, f.get_tensor(name)
        except SafetensorError as e:
            raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None
        return
    state = weights.read_ahead.pop(path, None)  # read once only: the tensors are then the model's
    yield from (state if state is not None else load_torch_state(path, mmap=True)).items()


def load_torch_state(path: Path, mmap: bool = False) -> dict[str, torch.Tensor]:
    """A ``pytorch_model.bin``-style file's tensors by a weights-only ``torch.load`` (which never runs
    code from the file), or a one-line error naming the file and why it cannot be read."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # torch raises many types for corrupt or unsafe pickles
        raise CheckpointError(
            f"{path} could not be read as a weights-only PyTorch checkpoint: {_torch_load_reason(e)}"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: entry {name!r} is not a tensor")
    return state


_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*(.+?)(?:\n\s*\n|$)", re.DOTALL)


def _torch_load_reason(e: Exception) -> str:
    """What torch.load's error says is wrong, in one line: its weights-only refusal is a page of advice
    (with terminal escapes) around one ``WeightsUnpickler error:`` detail."""
    text = _ANSI.sub("", str(e))
    if m := _UNPICKLER.search(text):
        detail = " ".join(m.group(1).split()).split(". ")[0].rstrip(".")
        return f"it is not a PyTorch file of tensors alone ({detail})"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


_MADV_DONTNEED = 4
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None
    fn = libc.madvise
    fn.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return fn


def release_pages(address: int, nbytes: int) -> None:
    """Drop the whole pages of ``[address, address + nbytes)`` from this process's resident set.

    For a weight that has been consumed (quantized into a new layer), while the file mapping it came
    from stays open for the tensors still to come: the file's pages would otherwise all count against
    the process until the end of the load. Only pages wholly inside the range are touched, so neighbours
    are safe. Clean pages of a file mapping are re-read from the file if touched again; pages of a
    private copy read back as zeros, which is why this is only for memory nobody will read.
    """
    madvise = _madvise()
    start = -(-address // _PAGE) * _PAGE
    end = (address + nbytes) // _PAGE * _PAGE
    if madvise is not None and end > start:
        madvise(start, end - start, _MADV_DONTNEED)  # a hint: failure only keeps the pages


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):  # not glibc
        return None
    fn.argtypes = (ctypes.c_size_t,)
    return fn


def trim_heap() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise), after a large transient."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


class HeapTrimmer:
    """Trims the heap once every ``every`` weights built during a load. glibc keeps freed temporaries,
    and the layers' long-lived tensors allocated between them fragment the heap, so it grows by what
    the build freed unless trimmed (~17 MB of SmolLM2's load and ~300 MB of Qwen2.5-0.5B's under
    ``--quantize``; 120-230 MB of a Qwen2.5-0.5B-shape GPTQ int4 checkpoint's, 1.18x -> 1.4-1.95x its
    weights, in the runs where the load ran fastest). A trim costs about a ms, hence not every layer."""

    def __init__(self, every: int = 1 << 22) -> None:
        self.every = every
        self._since = 0

    def built(self, elements: int) -> None:
        """Count a layer of ``elements`` weights just built; trim when enough have gone by."""
        self._since += elements
        if self._since > self.every:
            trim_heap()
            self._since = 0
