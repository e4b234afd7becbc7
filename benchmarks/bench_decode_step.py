"""Where a batch-1 decode step's time goes, with the inference fusions (``quant.fused``) on and off.

Loads the Qwen2.5-0.5B-shape random checkpoint that ``bench_vs_llamacpp.py`` builds (built here if
missing), once as ``generate``/``chat`` load it (q/k/v and gate/up fused, a decode step's decoder layers
one ``kernels.decode_layers`` call) and once with the separate layers and torch's small ops of
before, then decodes through the engine (the two alternating) and prints ms per token split into the
matrix-vector kernels called as ops (``qwenkit::linear_*``: every product of the separate layout, only
the output head of the fused one), the whole-layer calls (the layers' products run inside them), every
other op, and the rest (Python, the engine and the sampler), from a torch profile, beside the
unprofiled wall time.
The prepared-model cache (``checkpoint.prepared_cache``) is off for this script's loads: the unfused
load would otherwise store its model under the same key as the fused one, and the next fused int8/int4
load would read the unfused model back. Not a test: a measurement.

Under ``QWENKIT_KERNELS=torch`` (the plain PyTorch path) the fused layout is plain ``nn.Linear`` layers with
the parts' weights stacked, as on CUDA; ``fp32`` loads float32 weights there.

    .venv/bin/python benchmarks/bench_decode_step.py [--precisions bf16,int8,int4,fp32] [--threads 1]
        [--tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
from bench_vs_llamacpp import write_anchor  # benchmarks/, beside this script
from shapes import QWEN25_05B
from torch.profiler import ProfilerActivity, profile

import qwenkit.quant.fused as fused
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.engine import Engine, SamplingParams

PROMPT = [(i * 13) % 1000 + 10 for i in range(32)]
LAYOUTS = ("separate", "fused")
DTYPES = {"bf16": "bfloat16", "fp32": "float32"}  # precisions that are a float dtype; others: --quantize


def decode(engine: Engine, tokens: int) -> tuple[float, int]:
    engine.add_request(PROMPT, SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True))
    engine.step()  # the prompt and the first token
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return time.perf_counter() - start, produced


def build(path: Path, dtype: str, quantize: str | None, fuse: bool, tokens: int) -> Engine:
    """An engine on the model as ``generate``/``chat`` load it, or (fuse=False) with the separate layers
    and torch's small ops of before the fusions (then no layer runs in a ``decode_layers`` call)."""
    original = fused.fuse_for_inference
    if not fuse:
        fused.fuse_for_inference = lambda model, **_: 0
    try:
        model, _ = load_model(path, dtype=dtype, quantize=quantize, progress=False, fast_kernels=True)
    finally:
        fused.fuse_for_inference = original
    engine = Engine(model, max_batch_size=1, max_seq_len=len(PROMPT) + tokens + 16, prefix_caching=False)
    decode(engine, 8)  # warm-up
    return engine


def split(engine: Engine, tokens: int) -> dict[str, float]:
    """ms per token from one profiled decode: the matrix-vector kernels called as ops of their own, the
    whole-layer calls (which run those kernels inside), every other op, and the rest (Python, engine)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        seconds, n = decode(engine, tokens)
    events = prof.key_averages()

    def ms(prefix: str) -> float:
        return sum(e.self_cpu_time_total for e in events if e.key.startswith(prefix)) / 1e3 / n

    kernels, layers = ms("qwenkit::linear"), ms("qwenkit::decode_layer")
    ops = sum(e.self_cpu_time_total for e in events) / 1e3 / n - kernels - layers
    profiled = seconds * 1e3 / n
    return {
        "kernels": kernels,
        "layers": layers,
        "ops": ops,
        "rest": max(0.0, profiled - kernels - layers - ops),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--threads", type=int, default=1, help="1 keeps other jobs' load out of the split")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3, help="timed decodes per layout, alternating")
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    args = ap.parse_args()
    # Every load prepares its own model: the cache keys on the checkpoint and options, not on the
    # patched-out fusion, so a cached entry would hand one layout's model to the other's load.
    os.environ[prepared_cache.ENV_SWITCH] = "off"
    torch.set_num_threads(args.threads)
    path = args.work / "qwen2.5-0.5b-random"
    if not (path / "config.json").exists():
        write_anchor(path, QWEN25_05B)
    print(f"Qwen2.5-0.5B shape, batch 1, {args.tokens} tokens, {args.threads} thread(s); ms per token")
    print(
        f"(wall: median and fastest of {args.rounds} rounds, the two layouts alternating, both orders; "
        "the split: one profiled decode each)"
    )
    print(
        "| precision | layers | wall, median | wall, fastest | linear kernels | whole-layer calls "
        "| other ops | Python, engine, sampler |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for precision in args.precisions.split(","):
        dtype, quantize = DTYPES.get(precision, "bfloat16"), None if precision in DTYPES else precision
        engines = {layout: build(path, dtype, quantize, layout == "fused", args.tokens) for layout in LAYOUTS}
        wall: dict[str, list[float]] = {layout: [] for layout in LAYOUTS}
        for round_ in range(args.rounds):
            for layout in LAYOUTS if round_ % 2 == 0 else LAYOUTS[::-1]:
                seconds, n = decode(engines[layout], args.tokens)
                wall[layout].append(seconds * 1e3 / n)
        for layout, engine in engines.items():
            r = split(engine, args.tokens)
            print(
                f"| {precision} | {layout} | {statistics.median(wall[layout]):.1f} | {min(wall[layout]):.1f} "
                f"| {r['kernels']:.1f} | {r['layers']:.1f} | {r['ops']:.1f} | {r['rest']:.1f} |",
                flush=True,
            )
        del engines


if __name__ == "__main__":
    main()
