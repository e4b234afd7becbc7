"""The bundled model's Q8_0 output head on qwenkit's float-activation int8 kernel beside PyTorch's int4
kernel run twice over the split bytes (the kernel it had before), at 1 and 16 rows.

Both loads keep the file's codes; only the head's kernel differs. Prints ms per call, the fastest of
three alternating rounds of 30 calls each. Not a test: a measurement.

    .venv/bin/python benchmarks/bench_gguf_head.py [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch

import qwenkit.quant.on_load as on_load
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.default_model import default_model_path


def ms_per_call(layer: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, calls: int = 30) -> float:
    """Median ms of ``calls`` calls of ``layer(x)`` (a module or a kernel)."""
    layer(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        layer(x)
        times.append(time.perf_counter() - start)
    return sorted(times)[calls // 2] * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    os.environ[prepared_cache.ENV_SWITCH] = "off"  # two loads of one file that differ in one kernel
    path = default_model_path()
    ours, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    on_load.HEAD_KERNELS = tuple(k for k in on_load.HEAD_KERNELS if k != "avx512_int8_float")
    before, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    heads = {before.lm_head.impl.key: before.lm_head, ours.lm_head.impl.key: ours.lm_head}
    print(
        f"{path.name}: output head {ours.lm_head.out_features} x {ours.lm_head.in_features}, "
        f"{args.threads} threads\n"
    )
    print("| rows | " + " | ".join(f"{k} (ms)" for k in heads) + " |")
    print("|---:|" + "---:|" * len(heads))
    for rows in (1, 16):
        x = torch.randn(rows, ours.lm_head.in_features).bfloat16()
        best: dict[str, float] = {}
        for _ in range(3):
            for key, head in heads.items():
                best[key] = min(best.get(key, float("inf")), ms_per_call(head, x))
        print(f"| {rows} | " + " | ".join(f"{best[k]:.2f}" for k in heads) + " |")


if __name__ == "__main__":
    main()
