"""Decode speed with the weights on 4 KB pages against 2 MB pages, in one process (not a test).

Streaming a 16-row int4 tile from memory ran 15% slower than from L2 on 4 KB pages on the Zen 4 VM and
at L2 speed on 2 MB pages (a TLB miss costs a nested page walk there). This measures what that is worth
through the engine: the model is loaded once (prepared-model cache off, so its weights are anonymous
memory), every weight tensor is copied into two arenas, one advised ``MADV_NOHUGEPAGE`` and one
``MADV_HUGEPAGE`` before it is touched, and the tensors are pointed (``Tensor.set_``) at one arena and
then the other, alternating for several rounds, batch 1 and batch 16 each time (separate runs of a
shared VM drift more than the effect). Linux only; the table says how much of the 2 MB arena the kernel
actually backed with huge pages (``AnonHugePages``) and whether every weight was moved.

    .venv/bin/python benchmarks/bench_page_size.py [--models bundled,0.5b,1.5b] [--quantize int4]
        [--rounds 8] [--tokens 32]
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import os
import statistics
import sys
from pathlib import Path

import torch
from bench_generate import decode_rate  # benchmarks/, beside this script
from bench_vs_llamacpp import SHAPES, write_anchor
from torch import nn

from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.default_model import default_model_path

HUGE = 2 << 20
MADV_HUGEPAGE, MADV_NOHUGEPAGE = 14, 15
MIN_BYTES = 64 << 10  # smaller tensors (norms, biases) stay where they are


def weight_tensors(model: nn.Module) -> list[torch.Tensor]:
    """Every distinct CPU tensor of at least MIN_BYTES the model holds: parameters, buffers and those in
    its modules' attributes (packed weights in dataclasses, the decode runs' argument lists)."""
    found: dict[int, torch.Tensor] = {}

    def visit(value: object) -> None:
        if isinstance(value, torch.Tensor):
            if value.device.type == "cpu" and value.is_contiguous() and value.nbytes >= MIN_BYTES:
                found.setdefault(id(value), value)
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):
            for f in dataclasses.fields(value):
                visit(getattr(value, f.name))
        elif isinstance(value, list | tuple):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for module in model.modules():
        visit(vars(module))
    return list(found.values())


class Arena:
    """One anonymous region for copies of ``tensors``, 2 MB aligned, advised before it is first touched."""

    def __init__(self, tensors: list[torch.Tensor], huge: bool) -> None:
        sizes = [-(-t.nbytes // 64) * 64 for t in tensors]
        total = sum(sizes)
        self._raw = torch.empty(total + HUGE, dtype=torch.uint8)
        start = (-self._raw.data_ptr()) % HUGE
        region = self._raw[start : start + total]
        libc = ctypes.CDLL(None, use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        if libc.madvise(region.data_ptr(), total, MADV_HUGEPAGE if huge else MADV_NOHUGEPAGE) != 0:
            raise OSError(ctypes.get_errno(), "madvise failed")
        self.copies, offset = [], 0
        for t, size in zip(tensors, sizes, strict=True):
            copy = region[offset : offset + t.nbytes].view(t.dtype).view(t.shape)
            copy.copy_(t)
            self.copies.append(copy)
            offset += size
        self.start, self.end = region.data_ptr(), region.data_ptr() + total

    def holds(self, t: torch.Tensor) -> bool:
        return self.start <= t.data_ptr() < self.end


def anon_huge_mib() -> int:
    with open("/proc/self/smaps_rollup") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("AnonHugePages:"))


def load(name: str, quantize: str | None, work: Path) -> nn.Module:
    if name == "bundled":
        return load_model(default_model_path(), dtype="bfloat16", progress=False, fast_kernels=True)[0]
    path = work / f"qwen2.5-{name}-random"
    if not (path / "config.json").exists():
        write_anchor(path, SHAPES[name])
    return load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="bundled,0.5b,1.5b")
    ap.add_argument("--quantize", default="int4", help="the random Qwen2.5 shapes' (the GGUF keeps its own)")
    ap.add_argument("--rounds", type=int, default=8, help="rounds of both arenas, alternating")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per request and round")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    args = ap.parse_args()
    if not sys.platform.startswith("linux"):
        sys.exit("bench_page_size.py needs Linux (madvise and /proc/self/smaps_rollup)")
    os.environ[prepared_cache.ENV_SWITCH] = "off"  # anonymous weights, not the cache's file mapping
    print(
        f"{torch.get_num_threads()} threads, {args.tokens} new tokens per request, batch 1 and 16, medians "
        f"of {args.rounds} rounds, the two arenas alternating\n"
    )
    print("| model | weights moved | 2 MB pages | b1 tok/s, 4 KB | 2 MB | gain | b16, 4 KB | 2 MB | gain |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.models.split(","):
        model = load(name, args.quantize, args.work)
        tensors = weight_tensors(model)
        before = anon_huge_mib()
        arenas = {huge: Arena(tensors, huge) for huge in (False, True)}
        huge_mib = anon_huge_mib() - before
        rates: dict[tuple[bool, int], list[float]] = {(h, b): [] for h in (False, True) for b in (1, 16)}
        with torch.no_grad():
            for r in range(args.rounds):
                for huge in (False, True) if r % 2 == 0 else (True, False):
                    for t, copy in zip(tensors, arenas[huge].copies, strict=True):
                        t.set_(copy)
                    for batch in (1, 16):
                        rates[(huge, batch)].append(decode_rate(model, batch, args.tokens))
            for t, copy in zip(tensors, arenas[True].copies, strict=True):
                t.set_(copy)
        moved = sum(t.nbytes for t in tensors)
        outside = sum(t.nbytes for t in weight_tensors(model) if not arenas[True].holds(t))
        m = {k: statistics.median(v) for k, v in rates.items()}
        print(
            f"| {name} | {moved / 2**20:.0f} MiB ({outside / 2**20:.0f} MiB not) | {huge_mib} MiB "
            f"| {m[(False, 1)]:.1f} | {m[(True, 1)]:.1f} | {m[(True, 1)] / m[(False, 1)] - 1:+.1%} "
            f"| {m[(False, 16)]:.1f} | {m[(True, 16)]:.1f} | {m[(True, 16)] / m[(False, 16)] - 1:+.1%} |",
            flush=True,
        )
        del model, tensors, arenas


if __name__ == "__main__":
    main()
