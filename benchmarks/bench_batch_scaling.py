"""Aggregate decode at batch 16 against batch 1, per model and bit width, in one run (not a test).

Issue 13 asks that 16 requests decoding together yield at least 6x the tokens/s of one. Each model is
loaded once; batch 1 and batch 16 then alternate for several rounds in the same process (this machine's
speed drifts from minute to minute, so both sides of a ratio are taken side by side), greedy through the
engine the CLI and the server use, 16-token prompts, prefill excluded. Models: the bundled SmolLM2 GGUF
(Q4_1 layers, Q8_0 head) and random-weight checkpoints of the exact Qwen2.5-0.5B and 1.5B shapes (the
ones ``bench_vs_llamacpp.py`` builds, made here when missing) in bfloat16 and with ``--quantize int8`` /
``int4``.

    .venv/bin/python benchmarks/bench_batch_scaling.py [--models bundled,0.5b,1.5b]
        [--precisions bf16,int8,int4] [--tokens 64] [--rounds 3] [--batch 16]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch
from bench_generate import decode_rate  # benchmarks/, beside this script
from bench_vs_llamacpp import SHAPES, write_anchor

from qwenkit.checkpoint import load_model
from qwenkit.default_model import default_model_path

QUANTIZE = {"bf16": None, "int8": "int8", "int4": "int4"}


def runs(models: list[str], precisions: list[str], work: Path) -> list[tuple[str, Path, str | None]]:
    """(label, checkpoint, --quantize) for every model and precision asked for."""
    out = []
    for model in models:
        if model == "bundled":
            out.append(("SmolLM2-135M Q4_1 (bundled)", default_model_path(), None))
            continue
        path = work / f"qwen2.5-{model}-random"
        if not path.exists():
            print(f"building the random Qwen2.5-{model.upper()} checkpoint at {path} ...", flush=True)
            write_anchor(path, SHAPES[model])
        out += [(f"Qwen2.5-{model.upper()} {p}", path, QUANTIZE[p]) for p in precisions]
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled,0.5b,1.5b", help="bundled, 0.5b, 1.5b (comma separated)")
    ap.add_argument("--precisions", default="bf16,int8,int4", help="for the Qwen2.5 shapes")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    args = ap.parse_args()
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for m in models:
        if m != "bundled" and m not in SHAPES:
            ap.error(f"unknown model {m!r}: choose from bundled, {', '.join(SHAPES)}")
    for p in precisions:
        if p not in QUANTIZE:
            ap.error(f"unknown precision {p!r}: choose from {', '.join(QUANTIZE)}")

    print(
        f"{torch.get_num_threads()} threads, {args.tokens} new tokens per request after a 16-token prompt, "
        f"batch 1 and batch {args.batch} alternating, median of {args.rounds} rounds "
        f"({time.strftime('%Y-%m-%d %H:%M')})\n"
    )
    print(f"| model | batch 1 tok/s | batch {args.batch} tok/s | ratio | per-round ratios |")
    print("|---|---:|---:|---:|---|")
    for label, path, quantize in runs(models, precisions, args.work):
        model, _ = load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)
        decode_rate(model, args.batch, 4)  # warm-up: kernels, pools, the first allocations
        one, many = [], []
        for _ in range(args.rounds):
            one.append(decode_rate(model, 1, args.tokens))
            many.append(decode_rate(model, args.batch, args.tokens))
        ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(one, many, strict=True))
        a, b = statistics.median(one), statistics.median(many)
        print(f"| {label} | {a:.1f} | {b:.1f} | **{b / a:.2f}** | {ratios} |", flush=True)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
