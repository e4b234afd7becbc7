"""The loaded model, ready to run, cached on disk so the next start skips decoding and packing.

Loading a GGUF file in its own precision (or any checkpoint with ``--quantize`` or GPTQ weights) spends
most of its time decoding blocks and packing codes into the kernels' layouts; for the bundled 135M model
that was 0.7 s of a 2.2 s start. A bfloat16 checkpoint on the kernels is packed into their tiles too: a
fresh copy of every weight, 1.0-1.7 s for a Qwen2.5-0.5B at every start. Here the finished model (every
module with its packed tensors) is saved once with ``torch.save`` under ``$QWENKIT_CACHE/prepared/``
(default ``~/.cache/qwenkit``) and later memory-mapped back: no copy, no packing, and the pages stay
clean file pages the kernel can drop.

An entry is used only when all of these hold, otherwise the model is built again and the entry rewritten:

* its key matches: the checkpoint's identity (size, modification time and a hash of the first MiB of
  each file), the load options (dtype, ``--quantize``, ``--gguf-dequantize``, fast kernels), which CPU
  kernels this process runs (built or not, ``QWENKIT_KERNELS``, the CPU's flags), the qwenkit code
  (size and modification time of its Python, C++ and header files), the torch version and
  :data:`LAYOUT_VERSION`;
* it unpickles with only torch's ``weights_only`` types and qwenkit's own module and dataclass types
  (plus ``torch.nn`` modules) resolvable: nothing else named in the file can run;
* the model's config equals the checkpoint's, every linear layer has the skeleton's input and output
  sizes and every other parameter the skeleton's shape, and the checksum of every tensor's bytes
  (:func:`checksum`) is the one written beside them.

The whole model is pickled, so whatever ``load_model`` builds (fused layers included) is cached as is,
as long as every object in it is a tensor, a plain Python value, an ``nn.Module`` or a dataclass defined
in qwenkit (or a ``torch.nn`` module); anything else (a function or op handle stored on a module, a
lock, an enum) makes the write fail with one line and the cache unused. Change what a prepared module
stores (a new packing, fused layers) and bump :data:`LAYOUT_VERSION`: older entries then miss and are
replaced (any edit of qwenkit's source files already does, through the code version in the key).
Writes are atomic (temporary file, then rename), and skipped
when the disk would keep less than 1 GiB beyond twice the entry; a cache directory that cannot be
written only costs the speed-up; ``QWENKIT_PREPARED_CACHE=off`` turns it off. An entry takes about
what the model takes in memory; entries of a checkpoint whose files changed are removed when the new
one is written, and the directory is kept under ``QWENKIT_PREPARED_CACHE_MAX_GB`` (GiB, default 20) by
removing the entries used least recently (each use marks its entry); an entry larger than that alone
is not written (``rm -r ~/.cache/qwenkit/prepared`` removes them all).
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import functools
import gc
import hashlib
import importlib
import os
import pickle
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from qwenkit.checkpoint.gguf_split import part_files
from qwenkit.config import ModelConfig
from qwenkit.env_switch import ON_OFF, env_choice
from qwenkit.kernels import ops as kernel_ops
from qwenkit.model.transformer import MissingHead
from qwenkit.user_cache import cache_root_or_none

FORMAT = 2  # the entry's own layout (the dict below)
# Bump when a prepared module's tensors or attributes change meaning or layout (2: fused q/k/v, gate/up;
# 3: each layer's decode_weights; 4: decode_weights with q/k/v as one or three products, GGUF Q5_0 codes
# re-centred, K-type scales as float16 values, Q6_K/Q2_K/Q3_K as int8 codes; 5: MoE blocks' expert_weights,
# routers' packed weights, GGUF experts as integer codes).
LAYOUT_VERSION = 5
HEAD_BYTES = 1 << 20
ENV_SWITCH = "QWENKIT_PREPARED_CACHE"
MIN_FREE_BYTES = 1 << 30  # an entry is written only if the disk keeps this much free beyond twice its size
ALLOWED_PREFIXES = ("qwenkit.", "torch.nn.modules.")
MAX_SIZE_ENV = "QWENKIT_PREPARED_CACHE_MAX_GB"
DEFAULT_MAX_GIB = 20.0


@dataclass(frozen=True)
class CacheEntry:
    """Where a prepared model would live, and the full key it must carry."""

    path: Path
    key: str
    stale: str  # glob of this checkpoint path's entries; those not starting with ``current`` are removed
    current: str  # name prefix of the entries for this version of the checkpoint's files


def enabled() -> bool:
    return env_choice(ENV_SWITCH, ON_OFF, "on") == "on"


def entry_for(source_path: Path, options: dict[str, Any]) -> CacheEntry | None:
    """The entry for this checkpoint loaded with these options in this process; None when there is no
    cache directory (no HOME, said once)."""
    root = cache_root_or_none()
    if root is None:
        return None
    from qwenkit import kernels

    version = {
        "format": FORMAT,
        "layout": LAYOUT_VERSION,
        "qwenkit": _code_version(),
        "torch": torch.__version__,
        "cpu": _cpu_flags_hash(),
        "identity": _identity(source_path),
    }
    choice = {
        "kernels": kernels.available(),
        "kernels_env": env_choice(kernels.ENV_SWITCH, kernels.KERNEL_CHOICES, "auto"),
        **options,
    }
    source = str(source_path.resolve())
    key = repr([source, sorted(version.items()), sorted(choice.items())])
    # <checkpoint path>-<its files, qwenkit, torch, CPU>-<load options>: an entry of the same path with
    # another middle part can never be used again and is removed when this one is written
    current = f"{_short(source)}-{_short(repr(sorted(version.items())))}-"
    path = root / "prepared" / f"{current}{_short(repr(sorted(choice.items())))}.pt"
    return CacheEntry(path, key, f"{current.split('-')[0]}-*.pt", current)


def load(entry: CacheEntry, config: ModelConfig, skeleton: nn.Module) -> nn.Module | None:
    """The cached model if the entry exists and passes every check, else None (one line on stderr
    when an entry was there but unusable)."""
    if not entry.path.is_file():
        return None
    try:
        with _gc_paused():
            model = _read(entry, config, skeleton)
    except Exception as e:  # anything wrong with the file means: build it again
        print(f"qwenkit: rebuilding the prepared-model cache ({_reason(e)})", file=sys.stderr)
        entry.path.unlink(missing_ok=True)
        return None
    _mark_used(entry.path)
    return model


def store(entry: CacheEntry, model: nn.Module) -> None:
    """Write the model for the next start; any failure only costs the speed-up."""
    try:
        data = {"format": FORMAT, "key": entry.key, "checksum": checksum(model), "model": model}
        entry.path.parent.mkdir(parents=True, exist_ok=True)
        size = _storage_bytes(model)
        if shutil.disk_usage(entry.path.parent).free < 2 * size + MIN_FREE_BYTES:
            return  # never fill the disk for a speed-up
        cap = max_bytes()
        if size > cap:
            return  # it alone would exceed the cache's size
        # A name of its own, but no file yet: torch.save opening an existing (empty) file truncates it,
        # and ext4 then writes the whole file to disk when it is closed (auto_da_alloc, for programs that
        # replace files by truncating): 0.6 s a GiB on this VM's disk (2026-12-02), before the first token.
        tmp = entry.path.with_name(f"{entry.path.name}.{os.getpid()}.{secrets.token_hex(8)}.tmp")
        try:
            with _without_zip_crc():
                torch.save(data, tmp)
            _check_globals(tmp)
            os.replace(tmp, entry.path)
            _mark_used(entry.path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    except OSError:
        return  # a read-only or full cache directory only costs the speed-up
    except (RuntimeError, ValueError, TypeError, AttributeError, pickle.PicklingError) as e:
        # something in the model that does not pickle, or that the reader would refuse
        print(f"qwenkit: could not cache the prepared model ({_reason(e)})", file=sys.stderr)
        return
    for old in entry.path.parent.glob(entry.stale):
        if not old.name.startswith(entry.current):
            old.unlink(missing_ok=True)  # the same checkpoint path, but an older version of its files
    _remove_crashed_writes(entry.path.parent)
    _remove_least_recently_used(entry.path.parent, cap, keep=entry.path)


def max_bytes() -> int:
    """The cache directory's size limit: ``QWENKIT_PREPARED_CACHE_MAX_GB`` GiB (default 20); a value
    that is not a positive number is named on stderr and the default used."""
    text = os.environ.get(MAX_SIZE_ENV, "").strip()
    gib = DEFAULT_MAX_GIB
    if text:
        try:
            gib = float(text)
            if not gib > 0 or gib == float("inf"):
                raise ValueError
        except ValueError:
            message = f"{MAX_SIZE_ENV}={text!r} is not a positive number of GiB; using {DEFAULT_MAX_GIB:g}"
            print(f"qwenkit: {message}", file=sys.stderr)
            gib = DEFAULT_MAX_GIB
    return int(gib * (1 << 30))


def _mark_used(path: Path) -> None:
    """Stamp the entry's modification time with now (the fine clock, not the file system's coarse
    one): the least recently used entries are the first removed."""
    now = time.time_ns()
    with contextlib.suppress(OSError):  # a read-only cache: nothing will be removed from it either
        os.utime(path, ns=(now, now))


def _remove_least_recently_used(directory: Path, cap: int, keep: Path) -> None:
    """Delete entries, least recently used first, until the directory's entries take at most ``cap``
    bytes; ``keep`` (the entry just written) stays. An entry another process has mapped stays readable
    to it (its pages live until unmapped)."""
    entries = []
    for path in directory.glob("*.pt"):
        try:
            st = path.stat()
        except OSError:
            continue  # removed meanwhile
        entries.append((st.st_mtime_ns, st.st_size, path))
    total = sum(size for _, size, _ in entries)
    for _, size, path in sorted(entries, key=lambda e: (e[0], e[2].name)):
        if total <= cap:
            break
        if path == keep:
            continue
        try:
            path.unlink()
        except OSError:
            continue
        total -= size


STALE_WRITE_SECONDS = 3600  # a temporary file untouched this long is a killed writer's, not one in progress


def _remove_crashed_writes(directory: Path) -> None:
    """Delete the temporary files of writes that never finished (a process killed mid-save leaves its
    ``.tmp``, often the size of a model); another process's write in progress is recent and stays."""
    now = time.time()
    for tmp in directory.glob("*.tmp"):
        try:
            if now - tmp.stat().st_mtime > STALE_WRITE_SECONDS:
                tmp.unlink()
        except OSError:
            continue  # gone already, or not ours to remove


def _storage_bytes(model: nn.Module) -> int:
    storages = {s.data_ptr(): s.nbytes() for s in (t.untyped_storage() for t in model.state_dict().values())}
    return sum(storages.values())


def checksum(model: nn.Module) -> int:
    """Sum and XOR of the 64-bit words of every distinct tensor storage of the model's parameters and
    buffers: any changed word changes the sum. Four times faster than CRC-32 (10 ms for the bundled
    model's 100 MB); it guards against damage, not against someone forging an entry."""
    total, xor, seen = 0, 0, set()
    tensors = [t for _, t in model.named_parameters(remove_duplicate=False)]
    tensors += [t for _, t in model.named_buffers(remove_duplicate=False) if t is not None]
    for t in tensors:
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() == 0:
            continue
        seen.add(storage.data_ptr())
        words_sum, words_xor = _sum_and_xor(torch.empty(0, dtype=torch.uint8).set_(storage))
        total, xor = total + words_sum, xor ^ words_xor
    return ((total % 2**64) << 64) | xor


def _sum_and_xor(raw: torch.Tensor) -> tuple[int, int]:
    """The sum (mod 2^64) of the bytes' 64-bit words plus their trailing bytes, and the XOR of the words:
    in one pass of the kernels on every thread where they are loaded (0.3 -> 0.1 s for a 1.5B model's
    1 GB), else numpy's two reductions, the same numbers."""
    if kernel_ops.loaded():
        words_sum, words_xor = kernel_ops.run_pass("checksum_words", raw.numel(), raw)
        return words_sum % 2**64, words_xor % 2**64
    data = raw.numpy()  # the storage's bytes, no copy
    words = data[: data.size // 8 * 8].view(np.uint64)
    words_sum = int(words.sum(dtype=np.uint64)) + int(data[words.size * 8 :].sum(dtype=np.uint64))
    return words_sum % 2**64, int(np.bitwise_xor.reduce(words)) if words.size else 0


def _without_zip_crc() -> contextlib.AbstractContextManager:
    """``torch.save`` without a CRC-32 of every record: a third of the write's time (0.5 s a GiB on this
    VM, 2026-12-02), and redundant beside the entry's own checksum, which every read verifies (torch's
    reader does not check the CRCs). Torch before 2.6 has no switch and computes them."""
    try:
        from torch.utils.serialization import config
    except ImportError:
        return contextlib.nullcontext()
    if not hasattr(config.save, "compute_crc32"):
        return contextlib.nullcontext()
    return config.patch({"save.compute_crc32": False})


@contextmanager
def _gc_paused() -> Iterator[None]:
    """No cyclic garbage collection while ~700 tensors and ~1000 modules are unpickled: with torch
    imported, the collections it triggers scan every object and took 0.19 s of a 0.27 s read."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class CacheMismatch(Exception):
    """An entry that does not describe the model asked for."""


def _read(entry: CacheEntry, config: ModelConfig, skeleton: nn.Module) -> nn.Module:
    data = torch.load(entry.path, mmap=True, weights_only=False, pickle_module=_restricted_pickle)
    if not isinstance(data, dict) or data.get("format") != FORMAT or data.get("key") != entry.key:
        raise CacheMismatch("written for another checkpoint or version")
    model = data["model"]
    if type(model) is not type(skeleton) or getattr(model, "config", None) != config:
        raise CacheMismatch("another model configuration")
    _check_shapes(model, skeleton)
    if checksum(model) != data.get("checksum"):
        raise CacheMismatch("checksum mismatch: the file is damaged")
    return model


class _RestrictedUnpickler(pickle.Unpickler):
    """The C unpickler (``weights_only``'s pure-Python one took 0.3 s for the bundled model's 700
    tensors), resolving only what :func:`_allowed` admits: the standard way to restrict globals."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _compat_pickle.NAME_MAPPING:  # protocol 2 writes Python 2 names
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        full = f"{module}.{name}"
        obj = _torch_allowed().get(full)
        if obj is None:
            obj = _allowed(full)
        if obj is None:
            raise CacheMismatch(f"the file names {full!r}, which a prepared model never holds")
        return obj


class _restricted_pickle:  # stands in for the ``pickle`` module in torch.load
    Unpickler = _RestrictedUnpickler
    load = staticmethod(pickle.load)  # only reached for the legacy format, which torch.save never writes


@functools.cache
def _torch_allowed() -> dict[str, Any]:
    """torch's own ``weights_only`` allowlist: tensors, storages, dtypes, ``OrderedDict`` and friends."""
    from torch._weights_only_unpickler import _get_allowed_globals

    return _get_allowed_globals()


def _allowed(name: str) -> Any:
    """The object a qwenkit module/dataclass type or torch.nn module name means, else None."""
    obj = _resolve(name) if name.startswith(ALLOWED_PREFIXES) else None
    ok = isinstance(obj, type) and (issubclass(obj, nn.Module) or is_dataclass(obj))
    return obj if ok else None


def _check_shapes(model: nn.Module, skeleton: nn.Module) -> None:
    """Every linear layer of the skeleton is there with its sizes; every other parameter with its shape."""
    cached = dict(model.named_modules(remove_duplicate=False))
    expected = dict(skeleton.named_modules(remove_duplicate=False))
    for name, module in expected.items():
        got = cached.get(name)
        if got is None:
            got = _fused_product(cached, name)  # one product computing this layer and its siblings
            if got is None:
                raise CacheMismatch(f"module {name!r} is missing")
            parent = name.rpartition(".")[0]
            parts = [expected.get(f"{parent}.{part}") for part in got.fused_from]
            if any(part is None for part in parts):
                raise CacheMismatch(f"{name!r} is fused with layers the model does not have")
            want = (module.in_features, sum(part.out_features for part in parts))
            sizes = (getattr(got, "in_features", None), getattr(got, "out_features", None))
            if sizes != want:
                raise CacheMismatch(
                    f"the product fused from {name!r} has (in, out) sizes {sizes}, not {want}"
                )
            continue
        if name == "lm_head" and isinstance(got, MissingHead):  # a headless checkpoint's, as it loaded
            continue
        if hasattr(module, "in_features") and hasattr(module, "out_features"):  # float or GPTQ linear
            want = (module.in_features, module.out_features)
            sizes = (getattr(got, "in_features", None), getattr(got, "out_features", None))
            if sizes != want:
                raise CacheMismatch(f"{name!r} has (in, out) sizes {sizes}, not {want}")
            continue
        for pname, p in module.named_parameters(recurse=False):
            q = getattr(got, pname, None)
            if isinstance(got, nn.Module) and isinstance(q, torch.Tensor) and q.shape == p.shape:
                continue
            if isinstance(module, nn.Embedding):
                sizes = (getattr(got, "num_embeddings", None), getattr(got, "embedding_dim", None))
                if sizes == (module.num_embeddings, module.embedding_dim):
                    continue  # a quantized or packed embedding: no weight of its own
            raise CacheMismatch(f"{name}.{pname} does not have shape {tuple(p.shape)}")
    for t in model.state_dict().values():
        if t.is_meta:
            raise CacheMismatch("a tensor without data")


def _fused_product(cached: dict[str, nn.Module], name: str) -> nn.Module | None:
    """The module under ``name``'s owner that computes it fused with its siblings (``quant.fused`` marks
    such a product with ``fused_from``, the names of the layers it replaced), or None."""
    parent, _, child = name.rpartition(".")
    owner = cached.get(parent)
    if owner is None:
        return None
    return next((m for m in owner.modules() if child in getattr(m, "fused_from", ())), None)


def _check_globals(path: str | Path) -> None:
    """Refuse, before writing it, a file the reader would refuse (its unpickler admits the same names)."""
    torch_allowed = _torch_allowed()
    for name in torch.serialization.get_unsafe_globals_in_checkpoint(path):
        if name not in torch_allowed and _allowed(name) is None:
            raise ValueError(f"the model holds a {name}, which the cache does not store")


def _resolve(name: str) -> Any:
    module, _, qualname = name.rpartition(".")
    while module:
        try:
            obj: Any = importlib.import_module(module)
        except ImportError:
            module, _, outer = module.rpartition(".")
            qualname = f"{outer}.{qualname}"
            continue
        for part in qualname.split("."):
            obj = getattr(obj, part, None)
        return obj
    return None


def _identity(path: Path) -> str:
    """Size, modification time and first-MiB hash of the checkpoint file (every part of a split GGUF), or
    of each file directly in the checkpoint directory."""
    files = part_files(path) if path.is_file() else sorted(p for p in path.iterdir() if p.is_file())
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(HEAD_BYTES))
    return h.hexdigest()


CODE_SUFFIXES = (".py", ".cpp", ".h")  # what builds a prepared model: Python, and the kernels that pack it


def _code_version(root: Path | None = None) -> str:
    """Name, size and modification time of every qwenkit source file (the kernels' headers included:
    they hold the packings): any edit or upgrade of the code that builds the model misses the old
    entries. ``os.scandir`` (1 ms) where ``Path.rglob`` took 5-6 ms of every start."""
    root = Path(__file__).resolve().parents[1] if root is None else root
    prefix = len(str(root)) + 1
    files, folders = [], [str(root)]
    while folders:
        with os.scandir(folders.pop()) as entries:
            for entry in entries:
                if entry.is_dir(follow_symlinks=False):
                    folders.append(entry.path)
                elif entry.name.endswith(CODE_SUFFIXES):
                    st = entry.stat()
                    files.append((entry.path[prefix:], st.st_size, st.st_mtime_ns))
    h = hashlib.sha256()
    for name, size, mtime in sorted(files):
        h.update(f"{name}:{size}:{mtime};".encode())
    return h.hexdigest()


def _cpu_flags_hash() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    flags = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return _short(flags)


def _short(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _reason(e: BaseException) -> str:
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:160]
