"""``--quantize``'s int8 output head on int8 activations (what it runs) beside 16-bit ones (what a GGUF
file's head runs): greedy answers, logit differences and the head's time per call, in one process.

The model loads once with ``--quantize int4`` (the head rounded per channel to int8); the head's kernel is
then swapped between ``avx512_int8`` (activations rounded to int8 per 32, as the decoder layers and
llama.cpp's heads) and ``avx512_int8_float`` (activations rounded to 16 bits). Prints, for 8 greedy
chat answers, the token where each head's answer leaves the bfloat16 model's, and where the two heads'
answers part, the largest logit difference between the heads on random rows, and ms per head
call at 1 and 16 rows (median of 30, fastest of 3). Not a test: a measurement.

    .venv/bin/python benchmarks/bench_head_activations.py [MODEL] [--tokens 48] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from bench_gguf_head import ms_per_call  # benchmarks/, beside this script

from qwenkit import kernels
from qwenkit.checkpoint import load_model, prepared_cache
from qwenkit.default_model import default_model_path
from qwenkit.engine import Engine, SamplingParams
from qwenkit.generate import tokenizer_for
from qwenkit.quant.affine import from_int_weight
from qwenkit.quant.kernels import build_kernel

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "Explain photosynthesis briefly.",
    "List three prime numbers.",
    "Who wrote Hamlet?",
    "Translate 'good morning' to Spanish.",
    "What is 12 times 7?",
    "Give me a tip for learning Python.",
]


def greedy_answers(model: torch.nn.Module, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    engine = Engine(model, max_batch_size=1)
    answers = []
    for ids in prompts:
        engine.add_request(ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
        out: list[int] = []
        while engine.has_unfinished():
            for step in engine.step():
                out += step.new_token_ids
        answers.append(out)
    return answers


def first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (u, v) in enumerate(zip(a, b, strict=True)) if u != v), None)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model", nargs="?", type=Path, default=None, help="default: the bundled SmolLM2")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("this compares two of qwenkit's AVX-512 kernels; they are not available here")
    torch.set_num_threads(args.threads)
    os.environ[prepared_cache.ENV_SWITCH] = "off"
    path = args.model or default_model_path()
    tokenizer = tokenizer_for(path)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}]) for p in PROMPTS]
    reference, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    float_answers = greedy_answers(reference, prompts, args.tokens)
    del reference
    model, _ = load_model(path, dtype="bfloat16", quantize="int4", progress=False, fast_kernels=True)
    head = model.lm_head
    weight, _ = from_int_weight(head.to_int())
    wide = build_kernel(weight, torch.device("cpu"), "avx512_int8_float")
    kinds = {"int8 activations": head.impl, "16-bit activations": wide}
    answers = {}
    for name, kernel in kinds.items():
        head.impl = kernel
        answers[name] = greedy_answers(model, prompts, args.tokens)
    print(f"{path.name}, --quantize int4, head {head.out_features} x {head.in_features} per-channel int8")
    print(f"greedy {args.tokens}-token chat answers, of {len(PROMPTS)}:")
    for name, got in answers.items():
        leaves = [first_difference(a, b) for a, b in zip(got, float_answers, strict=True)]
        print(f"  head on {name}: each answer leaves the bfloat16 model's at token {leaves} (None: never)")
    parts = [first_difference(a, b) for a, b in zip(*answers.values(), strict=True)]
    others = [p for p in parts if p is not None]
    print(f"  the two heads: {parts.count(None)} the same; the others part at tokens {others}")
    x = torch.randn(16, head.in_features, generator=torch.Generator().manual_seed(0)).bfloat16() * 3
    exact, rounded = wide(x).float(), kinds["int8 activations"](x).float()
    diff, largest = (exact - rounded).abs().max(), exact.abs().max()
    print(f"random rows: max |logit difference| {diff:.3f} (logits up to {largest:.1f})")
    print("\n| rows | int8 activations ms | 16-bit activations ms |\n|---:|---:|---:|")
    for rows in (1, 16):
        xr = x[:rows].contiguous()
        best = {name: min(ms_per_call(k, xr) for _ in range(3)) for name, k in kinds.items()}
        print(f"| {rows} | {best['int8 activations']:.2f} | {best['16-bit activations']:.2f} |")


if __name__ == "__main__":
    main()
