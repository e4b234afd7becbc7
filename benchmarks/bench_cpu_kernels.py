"""qwenkit's C++ CPU kernels vs torch's, per decode matmul shape, as weight bytes per second (not a test).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_cpu_kernels.py                 # M = 1 and 16
    PYTHONPATH=src .venv/bin/python benchmarks/bench_cpu_kernels.py --models 0.5b --rows 1

Batch-1 decode streams every weight once per token, so a kernel's worth is its weight bytes per second
against the machine's memory bandwidth (measured in the same run by an AVX-512 read of a large buffer,
and by torch's sum). Each op is timed over a pool of distinct copies of the weights, called round-robin,
larger than the last-level cache (as in a real decode step), and the figure is the fastest call over
interleaved rounds, with the bandwidth read in the same rounds, so all see the same background load.
Peers: torch.nn.functional.linear (bf16), torch._weight_int8pack_mm (int8 per channel),
aten._weight_int4pack_mm_for_cpu (int4 per group).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F

from qwenkit import kernels

# (N, K) of every matmul of a decode step; the count is how often it runs per token.
MODELS = {
    "0.5b": {  # Qwen2.5-0.5B: hidden 896, 14 q heads and 2 kv heads of 64, FFN 4864, 24 layers
        (896, 896): 2 * 24,  # q_proj, o_proj
        (128, 896): 2 * 24,  # k_proj, v_proj
        (4864, 896): 2 * 24,  # gate_proj, up_proj
        (896, 4864): 24,  # down_proj
        (151936, 896): 1,  # lm_head
    },
    "1.5b": {  # Qwen2.5-1.5B: hidden 1536, 12 q heads and 2 kv heads of 128, FFN 8960, 28 layers
        (1536, 1536): 2 * 28,
        (256, 1536): 2 * 28,
        (8960, 1536): 2 * 28,
        (1536, 8960): 28,
        (151936, 1536): 1,
    },
}


@dataclass
class Case:
    """One kernel on one weight format: a call on copy i, and the bytes of one copy."""

    label: str
    fn: Callable[[int], object]
    nbytes: int
    copies: int


def time_cases(cases: list[Case], rounds: int) -> list[float]:
    """Fastest single call over interleaved rounds, each round one pass over every pool.

    Single calls, not the mean of a pass: on a shared machine a call that loses its core to another
    process (a 4 ms time slice) says nothing about the kernel. The bandwidth read is timed the same way.
    """
    samples: list[list[float]] = [[] for _ in cases]
    for c in cases:
        c.fn(0)
    for _ in range(rounds):
        for i, c in enumerate(cases):
            for j in list(range(c.copies)) * max(1, 8 // c.copies):  # at least 8 calls per round
                t = time.perf_counter()
                c.fn(j)
                samples[i].append(time.perf_counter() - t)
    return [min(s) for s in samples]


def bandwidth_case(mb: int = 512, chunk_mb: int = 64) -> Case:
    """An AVX-512 read of distinct 64 MB buffers (never cached): the machine's memory bandwidth."""
    bufs = [torch.ones(chunk_mb * 2**20 // 4) for _ in range(mb // chunk_mb)]
    return Case("read", lambda i: torch.ops.qwenkit.stream_read(bufs[i]), bufs[0].nbytes, len(bufs))


def sum_bandwidth(rounds: int, mb: int = 256) -> float:
    """torch's fp32 sum over a large buffer, for comparison with the AVX-512 read (GB/s)."""
    buf = torch.ones(mb * 2**20 // 4)
    return buf.nbytes / time_cases([Case("sum", lambda i: buf.sum(), buf.nbytes, 1)], rounds)[0] / 1e9


def copies_for(nbytes: int, pool_bytes: int) -> int:
    return max(1, -(-pool_bytes // nbytes))


def cases_for(
    n: int, k: int, xref: list[torch.Tensor], pool: int, ops: list[str]
) -> list[tuple[str, Case, Case | None]]:
    """(format, ours, torch's) per weight format for one shape; the calls read x from xref[0]."""
    out = []
    if "bf16" in ops:
        base = (torch.randn(n, k) * 0.02).to(torch.bfloat16)
        ws = [base] + [base.clone() for _ in range(copies_for(base.nbytes, pool) - 1)]
        p0 = kernels.prepare_bf16(base)
        ps = [p0] + [replace(p0, weight=p0.weight.clone()) for _ in ws[1:]]
        out.append(
            (
                "bf16",
                Case(
                    "qwenkit linear_bf16",
                    lambda i, ps=ps: kernels.linear_bf16(xref[0], ps[i]),
                    ps[0].nbytes,
                    len(ps),
                ),
                Case("F.linear", lambda i, ws=ws: F.linear(xref[0], ws[i]), base.nbytes, len(ws)),
            )
        )
        del base
    codes8 = torch.randint(0, 256, (n, k), dtype=torch.uint8)
    if "int8" in ops:
        # per channel (torch's int8pack layout) and Q8_0-like blocks of 32 (no torch peer)
        scale = torch.rand(1, n) * 0.01 + 0.001
        p = kernels.prepare_int8(codes8, scale, None, k, zero_point=128)
        ps = [p] + [replace(p, codes=p.codes.clone()) for _ in range(copies_for(p.nbytes, pool) - 1)]
        w8 = (codes8.to(torch.int16) - 128).to(torch.int8)
        s8 = scale[0].to(torch.bfloat16)
        t8 = [w8] + [w8.clone() for _ in range(copies_for(w8.nbytes, pool) - 1)]
        out.append(
            (
                "int8 per-channel",
                Case(
                    "qwenkit linear_int8",
                    lambda i, ps=ps: kernels.linear_int8(xref[0], ps[i]),
                    p.nbytes,
                    len(ps),
                ),
                Case(
                    "torch._weight_int8pack_mm",
                    lambda i, t8=t8: torch._weight_int8pack_mm(xref[0], t8[i], s8),
                    w8.nbytes + s8.nbytes,
                    len(t8),
                ),
            )
        )
        scale32 = (torch.rand(k // 32, n) * 0.01 + 0.001).to(torch.float16).float()
        q = kernels.prepare_int8(codes8, scale32, None, 32, zero_point=128)
        qs = [q] + [replace(q, codes=q.codes.clone()) for _ in range(copies_for(q.nbytes, pool) - 1)]
        out.append(
            (
                "int8 g32 (Q8_0)",
                Case(
                    "qwenkit linear_int8",
                    lambda i, qs=qs: kernels.linear_int8(xref[0], qs[i]),
                    q.nbytes,
                    len(qs),
                ),
                None,
            )
        )
    if "int4" in ops:
        codes4 = codes8 & 0x0F
        for gs in (32, 128):
            scale = (torch.rand(k // gs, n) * 0.01 + 0.001).to(torch.float16).float()
            shift = (-8 * scale).to(torch.float16).float()
            p = kernels.prepare_int4(codes4, scale, shift, gs)
            ps = [p] + [replace(p, codes=p.codes.clone()) for _ in range(copies_for(p.nbytes, pool) - 1)]
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes4.to(torch.int32), 2)
            # torch's int4pack: w = (q - 8) * scale + zero, with (K/gs, N, 2) bf16 scale and zero
            sz = torch.stack((scale, shift + 8 * scale), dim=-1).to(torch.bfloat16)
            tp = [packed] + [packed.clone() for _ in range(copies_for(packed.nbytes, pool) - 1)]
            label = f"int4 g{gs} (scale+min{', Q4_1' if gs == 32 else ''})"
            out.append(
                (
                    label,
                    Case(
                        "qwenkit linear_int4",
                        lambda i, ps=ps: kernels.linear_int4(xref[0], ps[i]),
                        p.nbytes,
                        len(ps),
                    ),
                    Case(
                        "aten._weight_int4pack_mm_for_cpu",
                        lambda i, tp=tp, gs=gs, sz=sz: torch.ops.aten._weight_int4pack_mm_for_cpu(
                            xref[0], tp[i], gs, sz
                        ),
                        packed.nbytes + sz.nbytes,
                        len(tp),
                    ),
                )
            )
        scale = (torch.rand(k // 32, n) * 0.01 + 0.001).to(torch.float16).float()
        p = kernels.prepare_int4(codes4, scale, None, 32, zero_point=8)
        ps = [p] + [replace(p, codes=p.codes.clone()) for _ in range(copies_for(p.nbytes, pool) - 1)]
        out.append(
            (
                "int4 g32 (Q4_0)",
                Case(
                    "qwenkit linear_int4",
                    lambda i, ps=ps: kernels.linear_int4(xref[0], ps[i]),
                    p.nbytes,
                    len(ps),
                ),
                None,
            )
        )
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rows", type=int, nargs="+", default=[1, 16], help="activation rows per call")
    ap.add_argument("--ops", nargs="+", default=["bf16", "int8", "int4"], choices=["bf16", "int8", "int4"])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--pool-mb", type=int, default=288, help="distinct weight bytes cycled per op (> L3)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the qwenkit CPU kernels are not available here (see the line above)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pool = args.pool_mb * 2**20
    print(
        f"torch {torch.__version__}, {args.threads} threads, load average {os.getloadavg()[0]:.2f} at start"
    )
    read = bandwidth_case()
    read_bw = read.nbytes / time_cases([read], args.rounds)[0] / 1e9
    print(f"memory bandwidth: {read_bw:.1f} GB/s (AVX-512 read of 64 MB buffers), ", end="")
    print(f"{sum_bandwidth(args.rounds):.1f} GB/s (torch fp32 sum)")
    print("% bw below: of the read timed in the same rounds (last column)\n")
    step: dict[tuple[str, str, int, str], float] = {}  # (model, format, rows, who) -> seconds per token
    with torch.no_grad():
        for model in args.models:
            for (n, k), count in MODELS[model].items():
                xref = [torch.empty(0)]
                formats = cases_for(n, k, xref, pool, args.ops)
                for rows in args.rows:
                    xref[0] = torch.randn(rows, k).to(torch.bfloat16)
                    print(f"#### {model} N={n} K={k}, M={rows}\n")
                    print(
                        "| weights | kernel | ms | GB/s | % bw | torch kernel | ms | GB/s | % bw | speed-up",
                        end="",
                    )
                    print(" | read GB/s |")
                    print("|---|---|---|---|---|---|---|---|---|---|---|")
                    for fmt, ours, theirs in formats:
                        cases = [ours] + ([theirs] if theirs else [])
                        *times, t_read = time_cases([*cases, read], args.rounds)
                        bw = read.nbytes / t_read / 1e9
                        cells = []
                        for c, t in zip(cases, times, strict=True):
                            gbs = c.nbytes / t / 1e9
                            cells.append(f"{c.label} | {t * 1e3:.3f} | {gbs:.1f} | {100 * gbs / bw:.0f}%")
                            who = "ours" if c is ours else "torch"
                            key = (model, fmt, rows, who)
                            step[key] = step.get(key, 0.0) + count * t
                        if theirs is None:
                            cells.append("— | | | ")
                        ratio = f"{times[1] / times[0]:.2f}x" if theirs else ""
                        print(f"| {fmt} | {' | '.join(cells)} | {ratio} | {bw:.1f} |", flush=True)
                    print()
    print("#### matmul time of one decode step (all layers + lm_head), tokens/s if nothing else ran\n")
    print("| model | weights | M | qwenkit ms | qwenkit tok/s (x M) | torch ms | torch tok/s (x M) |")
    print("|---|---|---|---|---|---|---|")
    for (model, fmt, rows, who), t in step.items():
        if who != "ours":
            continue
        tt = step.get((model, fmt, rows, "torch"))
        theirs = f"{tt * 1e3:.1f} | {rows / tt:.1f}" if tt else "— | —"
        print(f"| {model} | {fmt} | {rows} | {t * 1e3:.1f} | {rows / t:.1f} | {theirs} |")
    print(f"\nload average {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
