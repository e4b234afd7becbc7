"""What a decode layer costs beyond its arithmetic, and what a step costs beyond its layers (not a test).

A random Qwen2-layout model with layers too small for their products to matter (hidden size 128 by
default, int4 through ``--quantize`` as ``chat`` loads it) shows the fixed cost of one
``kernels.decode_layers`` layer: allocations and views, quantizing activations, norms, RoPE, attention's
tasks, SiLU, adds and the parallel regions. Each round makes a new engine, prefills 16-token prompts,
and times every later step and the ``decode_layers`` call inside it (wrapped here), at batch 1 and 16.
``--model bundled`` reports the same split for the bundled SmolLM2 GGUF (30 layers of width 576).

    .venv/bin/python benchmarks/bench_layer_overhead.py [--layers 30] [--hidden 128] [--model bundled]
        [--rounds 5] [--tokens 36]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from bench_vs_llamacpp import write_anchor  # benchmarks/, beside this script

from qwenkit import kernels
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.default_model import default_model_path
from qwenkit.engine import Engine, SamplingParams


class LayerTimer:
    """Wraps ``kernels.decode_layers`` (the model looks it up at every step) and adds up its time."""

    def __init__(self) -> None:
        self.seconds, self._inner = 0.0, kernels.decode_layers

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self._inner(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def tiny_config(layers: int, hidden: int) -> dict:
    return {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "vocab_size": 512,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    }


def step_times(model, batch: int, tokens: int, timer: LayerTimer) -> tuple[float, float]:
    """(ms a step, ms of it in decode_layers) over one decode of ``tokens`` steps after the prefill."""
    engine = Engine(model, max_batch_size=batch)
    params = SamplingParams(temperature=0, max_tokens=tokens + 1, ignore_eos=True)
    for b in range(batch):
        engine.add_request([(7 * b + i) % 500 + 3 for i in range(16)], params)
    engine.step()  # the prefill
    timer.seconds, steps, start = 0.0, 0, time.perf_counter()
    while engine.has_unfinished():
        engine.step()
        steps += 1
    return (time.perf_counter() - start) * 1e3 / steps, timer.seconds * 1e3 / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--quantize", default="int4", choices=["int4", "int8", "none"])
    ap.add_argument("--model", choices=["tiny", "bundled"], default="tiny")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tokens", type=int, default=36, help="decode steps a round")
    args = ap.parse_args()
    os.environ[prepared_cache.ENV_SWITCH] = "off"
    with tempfile.TemporaryDirectory() as tmp:
        if args.model == "bundled":
            path, quantize, label = default_model_path(), None, "bundled SmolLM2-135M Q4_1"
        else:
            path = Path(tmp) / "tiny"
            write_anchor(path, tiny_config(args.layers, args.hidden))
            quantize = None if args.quantize == "none" else args.quantize
            label = f"random Qwen2, {args.layers} layers of width {args.hidden}, {args.quantize}"
        model, config = load_model(
            path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True
        )
    layers = config.num_hidden_layers
    timer = LayerTimer()
    kernels.decode_layers = timer
    threads = torch.get_num_threads()
    print(f"{label}; {threads} thread(s); medians of {args.rounds} rounds of {args.tokens} steps\n")
    print("| batch | ms a step | in decode_layers | us a layer | outside decode_layers |")
    print("|---:|---:|---:|---:|---:|")
    try:
        for batch in (1, 16):
            step_times(model, batch, 4, timer)  # warm-up
            runs = [step_times(model, batch, args.tokens, timer) for _ in range(args.rounds)]
            step = statistics.median(r[0] for r in runs)
            inside = statistics.median(r[1] for r in runs)
            print(
                f"| {batch} | {step:.3f} | {inside:.3f} | {inside / layers * 1e3:.1f} | {step - inside:.3f} |"
            )
    finally:
        kernels.decode_layers = timer._inner


if __name__ == "__main__":
    main()
