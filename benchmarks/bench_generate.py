"""Load time and generation speed of a model (default: the bundled SmolLM2-135M-Instruct GGUF).

Prints a markdown table: load seconds, prefill tokens/s for a long prompt, and decode tokens/s at
batch 1, 4, 8 and 16 (aggregate over the batch), all greedy through the engine the CLI and server use.

    .venv/bin/python benchmarks/bench_generate.py [MODEL] [--dtype auto|float32|bfloat16] [--tokens 128]
"""

from __future__ import annotations

import argparse
import time

import torch

from qwenkit.checkpoint import load_model
from qwenkit.default_model import default_model_path
from qwenkit.engine import Engine, SamplingParams


def decode_rate(model, batch: int, new_tokens: int, prompt_len: int = 16) -> float:
    """Aggregate decode tokens/s for ``batch`` requests generating together (prefill excluded: every
    prompt is computed in one step, however long, so all rows then decode side by side)."""
    engine = Engine(model, max_batch_size=batch, prefill_chunk=max(512, batch * prompt_len))
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    for b in range(batch):
        engine.add_request([(7 * b + i) % 1000 + 10 for i in range(prompt_len)], params)
    engine.step()  # prefill every row (one token each comes out of it)
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def prefill_rate(model, length: int) -> float:
    engine = Engine(model, max_batch_size=1, prefill_chunk=length)
    engine.add_request(
        [(i * 13) % 1000 + 10 for i in range(length)], SamplingParams(temperature=0, max_tokens=1)
    )
    start = time.perf_counter()
    engine.step()
    return length / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--dtype", default="auto", help="auto: bf16 on CUDA, native-bf16 CPUs, the kernels")
    parser.add_argument("--quantize", choices=["int8", "int4"])
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    parser.add_argument("--plain", action="store_true", help="PyTorch kernels only (no AVX-512 repacking)")
    parser.add_argument("--dequantize", action="store_true", help="a GGUF's weights as floats (the old load)")
    args = parser.parse_args()
    path = args.model or default_model_path()
    start = time.perf_counter()
    model, config = load_model(
        path,
        dtype=args.dtype,
        quantize=args.quantize,
        progress=False,
        fast_kernels=not args.plain,
        dequantize=args.dequantize,
    )
    load_s = time.perf_counter() - start
    decode_rate(model, 1, 8)  # warm-up
    dtype = str(model.model.norm.weight.dtype).removeprefix("torch.")
    print(
        f"model: {path}\n{config.family}, {config.num_parameters / 1e6:.0f} M parameters, {dtype}"
        f"{', ' + args.quantize if args.quantize else ''}, {torch.get_num_threads()} threads\n"
    )
    print("| measure | value |\n|---|---|")
    print(f"| load time | {load_s:.2f} s |")
    print(f"| prefill, 512-token prompt | {prefill_rate(model, 512):.0f} tokens/s |")
    for batch in (1, 4, 8, 16):
        print(
            f"| decode, batch {batch} ({args.tokens} new tokens each) "
            f"| {decode_rate(model, batch, args.tokens):.1f} tokens/s |"
        )


if __name__ == "__main__":
    main()
