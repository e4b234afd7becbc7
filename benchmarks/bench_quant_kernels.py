"""Time one matmul per kernel at decode shapes and print a markdown table (not a test).

    .venv/bin/python benchmarks/bench_quant_kernels.py              # Qwen2.5-0.5B shapes, 1 row
    .venv/bin/python benchmarks/bench_quant_kernels.py --rows 1 4 32 --threads 2

Each row is a Linear of the decoder layer (in -> out). The "layer" line sums one decoder layer's seven
projections, so "x bf16" there is the decode speed-up of the quantized layers (lm_head not included).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwenkit.quant.linear import QuantizedLinear
from qwenkit.quant.rtn import quantize_weight_rtn

# Qwen2.5-0.5B: hidden 896, 14 heads x 64, 2 KV heads, FFN 4864.
SHAPES = {
    "q_proj": (896, 896),
    "k_proj": (896, 128),
    "v_proj": (896, 128),
    "o_proj": (896, 896),
    "gate_proj": (896, 4864),
    "up_proj": (896, 4864),
    "down_proj": (4864, 896),
}


def bench_all(
    fns: dict[int, Callable[[], object]], rounds: int = 15, budget_s: float = 0.004
) -> dict[int, float]:
    """Min over interleaved rounds of the mean time per call (microseconds).

    Interleaving and taking the minimum keeps the numbers usable on a shared, busy machine: each kernel
    gets many chances to run undisturbed, and all of them see the same background load.
    """
    calls = {}
    for key, fn in fns.items():
        fn()
        t = time.perf_counter()
        fn()
        calls[key] = max(1, int(budget_s / max(time.perf_counter() - t, 1e-6)))
    best = dict.fromkeys(fns, float("inf"))
    for _ in range(rounds):
        for key, fn in fns.items():
            t = time.perf_counter()
            for _ in range(calls[key]):
                fn()
            best[key] = min(best[key], (time.perf_counter() - t) / calls[key] * 1e6)
    return best


def variants() -> list[tuple[str, int, int, torch.dtype, str | None]]:
    """(label, bits, group_size, activation dtype, forced kernel or None)."""
    out = []
    for dt in (torch.bfloat16, torch.float32):
        out += [
            ("int8 per-channel", 8, -1, dt, None),
            ("int8 g128", 8, 128, dt, None),
            ("int4 g128", 4, 128, dt, None),
            ("int4 g32", 4, 32, dt, None),
        ]
    out += [
        ("int4 g128", 4, 128, torch.bfloat16, "dequant"),
        ("int8 per-channel", 8, -1, torch.bfloat16, "dequant"),
    ]
    return out


@torch.no_grad()
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[1], help="tokens per call (1 = decode)")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = {n: torch.randn(o, i) * 0.02 for n, (i, o) in SHAPES.items()}
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, {args.threads} threads, CPU capability {capability}")
    labels = [
        ("dense nn.Linear", None, None, torch.bfloat16, None),
        ("dense nn.Linear", None, None, torch.float32, None),
    ]
    labels += variants()
    for rows in args.rows:
        times: dict[tuple[int, str], float] = {}
        names: dict[int, str] = {}
        for n, w in weights.items():
            fns = {}
            for i, (_label, bits, gs, dt, forced) in enumerate(labels):
                x = torch.randn(rows, w.shape[1]).to(dt)
                if bits is None:
                    wd = w.to(dt)
                    fns[i] = lambda x=x, wd=wd: F.linear(x, wd)
                    names[i] = "torch.nn.functional.linear"
                    continue
                layer = QuantizedLinear.from_int(
                    quantize_weight_rtn(w, bits, gs, sym=bits == 8), kernel=forced
                )
                names[i] = layer.kernel
                fns[i] = lambda x=x, layer=layer: layer(x)
            for i, t in bench_all(fns).items():
                times[i, n] = t
        print(f"\n### {rows} row(s) per call, microseconds per matmul (min of interleaved rounds)\n")
        header = ["weights", "kernel", "act dtype", *SHAPES, "layer", "x bf16"]
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        base = sum(times[0, n] for n in SHAPES)
        for i, (label, _bits, _gs, dt, _forced) in enumerate(labels):
            total = sum(times[i, n] for n in SHAPES)
            cells = " | ".join(f"{times[i, n]:.0f}" for n in SHAPES)
            print(f"| {label} | {names[i]} | {str(dt)[6:]} | {cells} | {total:.0f} | {base / total:.2f} |")


if __name__ == "__main__":
    main()
