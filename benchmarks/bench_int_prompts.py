"""Integer products of a prompt's rows: AMX-INT8 against the AVX-512 VNNI tiles, per layer shape (not a test).

    .venv/bin/python benchmarks/bench_int_prompts.py                        # Qwen2.5-0.5B shapes, 512 rows
    .venv/bin/python benchmarks/bench_int_prompts.py --models 0.5b 1.5b --rows 32 128 512

Both paths give the same outputs bit for bit (tests/kernels/test_amx.py), so ``kernels.use_amx`` switches
between them call by call: each case alternates the two in rounds and keeps each one's fastest call.
bf16 on AMX (the same shapes, ``linear_bf16``) is the row beside them: what a prompt costs unquantized.
Prints markdown: milliseconds a product and multiply-adds a second per path, and a step of every layer
(the model's products, each as often as a token runs it; the head aside, as a prompt computes it once).
Needs a CPU with AMX-INT8 (Sapphire Rapids or later) for the AMX column; elsewhere it says so and stops.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from bench_cpu_kernels import MODELS

from qwenkit import kernels

# name -> (bits, group size or None for one group a row, zero point, with shift): the packings prompts meet
FORMATS = {
    "int8 per channel (--quantize int8)": (8, None, 128, False),
    "int8 g32 (Q8_0)": (8, 32, 128, False),
    "int4 g128 (--quantize int4, GPTQ)": (4, 128, 0, True),
    "int4 g32 (Q4_0)": (4, 32, 8, False),
    "int4 g32 (Q4_1)": (4, 32, 0, True),
}


def packed(bits: int, group: int | None, zero_point: int, shift: bool, n: int, k: int) -> kernels.PackedInt:
    group = group or k
    g = torch.Generator().manual_seed(n + k)
    codes = torch.randint(0, 2**bits, (n, k), generator=g, dtype=torch.uint8)
    scale = torch.rand(k // group, n, generator=g) * 0.02 + 1e-3
    offset = torch.randn(k // group, n, generator=g) * 0.01 if shift else None
    prepare = kernels.prepare_int8 if bits == 8 else kernels.prepare_int4
    return prepare(codes, scale, offset, group, zero_point)


def fastest(fn: Callable[[], object], amx: bool, calls: int) -> float:
    """The fastest of ``calls`` calls of fn with AMX on or off, in ms."""
    kernels.use_amx(amx)
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def measure(fn: Callable[[], object], rounds: int, calls: int) -> tuple[float, float]:
    """(AMX ms, vector tiles ms), alternating the two in rounds, each its fastest call."""
    fn()  # warm: buffers, the first touch of the weights
    amx, vector = float("inf"), float("inf")
    for _ in range(rounds):
        amx = min(amx, fastest(fn, True, calls))
        vector = min(vector, fastest(fn, False, calls))
    kernels.use_amx(True)
    return amx, vector


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["0.5b"], choices=sorted(MODELS))
    parser.add_argument("--rows", nargs="+", type=int, default=[512])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--calls", type=int, default=3, help="calls a round per path")
    args = parser.parse_args()
    if not kernels.available() or not kernels.use_amx(True) or kernels.int_amx_rows(4) is None:
        raise SystemExit("no AMX-INT8 here (or the kernels did not load): nothing to compare")
    int4, int8 = kernels.int_amx_rows(4), kernels.int_amx_rows(8)
    print(f"threads {torch.get_num_threads()}; int4 products of {int4} rows and more on AMX, int8 of {int8}")
    print("(below them both columns are the vector tiles)\n")
    for model in args.models:
        for rows in args.rows:
            print(f"#### {model}, {rows} rows\n")
            print("| weights | N x K | AMX-INT8 ms | GMAC/s | vector tiles ms | GMAC/s | speed-up |")
            print("|---|---|---:|---:|---:|---:|---:|")
            step = {name: [0.0, 0.0] for name in [*FORMATS, "bf16 (AMX)"]}
            for (n, k), count in MODELS[model].items():
                if n > 100_000:  # the head: a prompt computes it for its last row only
                    continue
                x = torch.randn(rows, k).bfloat16()
                gmac = rows * n * k / 1e9
                for name, (bits, group, zp, shift) in FORMATS.items():
                    p = packed(bits, group, zp, shift, n, k)
                    linear = kernels.linear_int8 if bits == 8 else kernels.linear_int4
                    amx, vector = measure(
                        lambda x=x, p=p, linear=linear: linear(x, p), args.rounds, args.calls
                    )
                    step[name][0] += count * amx
                    step[name][1] += count * vector
                    print(
                        f"| {name} | {n} x {k} | {amx:.3f} | {gmac / amx * 1e3:.0f} | {vector:.3f} | "
                        f"{gmac / vector * 1e3:.0f} | {vector / amx:.2f}x |"
                    )
                w = kernels.prepare_bf16(torch.randn(n, k).bfloat16())
                bf16 = min(
                    fastest(lambda x=x, w=w: kernels.linear_bf16(x, w), True, args.calls)
                    for _ in range(args.rounds)
                )
                step["bf16 (AMX)"][0] += count * bf16
                print(f"| bf16 (AMX) | {n} x {k} | {bf16:.3f} | {gmac / bf16 * 1e3:.0f} | | | |")
            print(
                f"\nEvery layer's products for {rows} rows (the head aside), ms; tokens/s if nothing else ran"
            )
            print()
            print("| weights | AMX-INT8 | tok/s | vector tiles | tok/s | speed-up |")
            print("|---|---:|---:|---:|---:|---:|")
            for name, (amx, vector) in step.items():
                if vector:
                    print(
                        f"| {name} | {amx:.1f} | {rows / amx * 1e3:,.0f} | {vector:.1f} | "
                        f"{rows / vector * 1e3:,.0f} | {vector / amx:.2f}x |"
                    )
                else:
                    print(f"| {name} | {amx:.1f} | {rows / amx * 1e3:,.0f} | | | |")
            print()


if __name__ == "__main__":
    main()
