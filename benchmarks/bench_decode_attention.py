"""Decode attention over the paged KV pool: qwenkit's kernel vs torch SDPA on gathered keys (not a test).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_decode_attention.py              # B = 1 and 16
    PYTHONPATH=src .venv/bin/python benchmarks/bench_decode_attention.py --rows 1 --threads 1
    PYTHONPATH=src .venv/bin/python benchmarks/bench_decode_attention.py --rows 8 --threads 1 --keys 40 640 \
        --shapes 8/2/64 16/2/64 28/4/128     # the three models' shapes and these (H/Hkv/D, 24 layers)

One decode step's attention per layer: B rows, one query each, over S keys read from a KV pool laid out
as the engine lays it out (blocks of 16 slots, in shuffled order). The peer is what the engine runs
without the kernel (``StepAttention.attend``'s SDPA path): gather the keys and values into a copy, then
torch's scaled_dot_product_attention with a mask and grouped heads. Every model layer has a pool of its
own (larger than the caches at B = 16, as in a real step), called in turn; the figure is the fastest call
over several rounds of passes over all layers, the peer's and the kernel's rounds interleaved. The last
column is the kernel's time for all the model's layers (one decode step).
"""

from __future__ import annotations

import argparse
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial

import torch
import torch.nn.functional as F

from qwenkit import kernels

BLOCK = 16  # slots per KV block, the engine's default


@dataclass(frozen=True)
class Shape:
    model: str
    heads: int
    kv_heads: int
    dim: int
    keys: int
    layers: int


SHAPES = [
    Shape("Qwen2.5-0.5B", 14, 2, 64, 640, 24),
    Shape("SmolLM2-135M", 9, 3, 64, 600, 30),
    Shape("Qwen2.5-1.5B", 12, 2, 128, 640, 28),
]


@dataclass
class Layer:
    k: torch.Tensor  # (slots, Hkv, D)
    v: torch.Tensor


@dataclass
class Step:
    """One decode step's rows: queries (B, H, D), their slots (B, S), last positions (B,), the mask."""

    q: torch.Tensor
    gather: torch.Tensor
    positions: torch.Tensor
    mask: torch.Tensor  # (B, 1, 1, S) bool, for the peer
    scale: float


def build(shape: Shape, rows: int, seed: int = 0) -> tuple[list[Layer], Step]:
    """Pools for every layer (blocks of 16 slots in shuffled order) and the rows' step."""
    g = torch.Generator().manual_seed(seed)
    blocks_per_row = math.ceil(shape.keys / BLOCK)
    slots = rows * blocks_per_row * BLOCK
    order = torch.randperm(rows * blocks_per_row, generator=g).view(rows, blocks_per_row)
    gather = (order[:, :, None] * BLOCK + torch.arange(BLOCK)).reshape(rows, -1)[:, : shape.keys].contiguous()
    layers = [
        Layer(
            torch.randn(slots, shape.kv_heads, shape.dim, generator=g).bfloat16(),
            torch.randn(slots, shape.kv_heads, shape.dim, generator=g).bfloat16(),
        )
        for _ in range(shape.layers)
    ]
    q = torch.randn(rows, shape.heads, shape.dim, generator=g).bfloat16()
    positions = torch.full((rows,), shape.keys - 1, dtype=torch.long)
    mask = (torch.arange(shape.keys)[None] <= positions[:, None])[:, None, None]
    return layers, Step(q, gather, positions, mask, shape.dim**-0.5)


def sdpa(step: Step, layer: Layer) -> torch.Tensor:
    """The peer: gathered copies of the keys and values, then masked SDPA with grouped heads."""
    keys = layer.k[step.gather].transpose(1, 2)  # (B, Hkv, S, D)
    values = layer.v[step.gather].transpose(1, 2)
    q = step.q[:, :, None]
    return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask, enable_gqa=True)


def kernel(step: Step, layer: Layer) -> torch.Tensor:
    return kernels.decode_attention(step.q, layer.k, layer.v, step.gather, step.positions, step.scale)


def fastest_calls(calls: list[Callable[[Layer], object]], layers: list[Layer], rounds: int) -> list[float]:
    """Seconds of the fastest single call of each, over interleaved rounds, each a pass over all layers.

    Single calls, not the mean of a pass: on a shared machine a call that loses its core to another
    process says nothing about the kernel; interleaving gives both the same background load.
    """
    for call in calls:
        call(layers[0])
    best = [math.inf] * len(calls)
    for _ in range(rounds):
        for i, call in enumerate(calls):
            for layer in layers:
                start = time.perf_counter()
                call(layer)
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def custom_shape(text: str) -> Shape:
    """A shape from the command line: H/Hkv/D, 640 keys, 24 layers."""
    try:
        heads, kv_heads, dim = (int(part) for part in text.split("/"))
    except ValueError:
        raise SystemExit(f"--shapes takes H/Hkv/D, three whole numbers, got {text!r}") from None
    if heads % kv_heads or dim % 16:
        raise SystemExit(f"--shapes {text}: H must be a multiple of Hkv and D of 16")
    return Shape(f"{heads} / {kv_heads} / {dim}", heads, kv_heads, dim, 640, 24)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="decoding rows B per call")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--keys", type=int, nargs="+", help="S keys per row instead of each shape's own")
    ap.add_argument("--shapes", nargs="+", default=[], help="more shapes, H/Hkv/D (24 layers each)")
    args = ap.parse_args()
    shapes = SHAPES + [custom_shape(text) for text in args.shapes]
    if not kernels.available():
        raise SystemExit("qwenkit's CPU kernels are not available on this machine")
    torch.set_num_threads(args.threads)
    print(f"decode attention, one query per row over S keys, {args.threads} thread(s); µs per layer call")
    print("(peer: gathered keys + torch SDPA, as the engine runs without the kernel)\n")
    print("| model shape | H / Hkv / D | S | B | torch SDPA µs | qwenkit µs | speed-up | qwenkit ms/token |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for shape in [replace(base, keys=keys) for base in shapes for keys in args.keys or [base.keys]]:
        for rows in args.rows:
            layers, step = build(shape, rows)
            theirs, mine = fastest_calls([partial(sdpa, step), partial(kernel, step)], layers, args.rounds)
            heads = f"{shape.heads} / {shape.kv_heads} / {shape.dim}"
            print(
                f"| {shape.model} | {heads} | {shape.keys} | {rows} | {theirs * 1e6:.0f} | {mine * 1e6:.0f} "
                f"| {theirs / mine:.1f}x | {mine * shape.layers * 1e3:.2f} |",
                flush=True,
            )
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
