"""Batch-1 decode with and without the next-tile prefetch of 1-4 row integer products, in one process.

``kernels.decode_prefetch`` is on by default only where it was measured faster (Intel CPUs, AMD Zen 2);
this script measures it on the CPU at hand, so a session on another CPU can decide from figures. Each
model is loaded once, then decode alternates between the two settings for several rounds (the machine's
speed drifts, so both sides of a ratio are taken side by side). The results are the same bit for bit
either way (tests/kernels/test_cpu_kernels.py::test_decode_prefetch_changes_no_bits). Models: the bundled
SmolLM2 GGUF (Q4_1 layers, Q8_0 head) and random-weight checkpoints of the exact Qwen2.5-0.5B and 1.5B
shapes with ``--quantize int8`` / ``int4`` (the ones ``bench_vs_llamacpp.py`` builds, made here when
missing).

    .venv/bin/python benchmarks/bench_decode_prefetch.py [--models bundled,0.5b,1.5b]
        [--precisions int8,int4] [--tokens 32] [--rounds 5]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from bench_batch_scaling import models_and_precisions, runs  # benchmarks/, beside this script
from bench_generate import decode_rate

from qwenkit import kernels
from qwenkit.checkpoint import load_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled,0.5b,1.5b", help="bundled, 0.5b, 1.5b (comma separated)")
    ap.add_argument("--precisions", default="int8,int4", help="--quantize for the Qwen2.5 shapes")
    ap.add_argument("--tokens", type=int, default=32, help="new tokens per measurement")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    args = ap.parse_args()
    models, precisions = models_and_precisions(ap, args, ("int8", "int4"))
    if not kernels.available():
        raise SystemExit("the C++ kernels are not loaded here: nothing to compare")
    default = kernels.decode_prefetch()
    when = time.strftime("%Y-%m-%d %H:%M")
    print(
        f"{torch.get_num_threads()} threads, kernels {kernels.isa_level()}, prefetch by default "
        f"{'on' if default else 'off'} on this CPU; batch 1, {args.tokens} new tokens after a 16-token "
        f"prompt, off and on alternating, median of {args.rounds} rounds ({when})\n"
    )
    print("| model | off tok/s | on tok/s | on / off | per-round on / off |\n|---|---:|---:|---:|---|")
    try:
        for run in runs(models, precisions, args.work):
            model, _ = load_model(
                run.checkpoint, dtype="bfloat16", quantize=run.quantize, progress=False, fast_kernels=True
            )
            decode_rate(model, 1, 4)  # warm-up: kernels, pools, the first allocations
            rates: dict[bool, list[float]] = {False: [], True: []}
            for r in range(args.rounds):
                for on in (r % 2 == 0, r % 2 == 1):  # which goes first alternates too
                    kernels.decode_prefetch(on)
                    rates[on].append(decode_rate(model, 1, args.tokens))
            off, on = statistics.median(rates[False]), statistics.median(rates[True])
            rounds = ", ".join(f"{b / a:.2f}" for a, b in zip(rates[False], rates[True], strict=True))
            print(f"| {run.label} | {off:.1f} | {on:.1f} | **{on / off:.2f}** | {rounds} |", flush=True)
            del model
            gc.collect()
    finally:
        kernels.decode_prefetch(default)


if __name__ == "__main__":
    main()
