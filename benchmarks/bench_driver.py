"""Decode speed where `chat`, `serve` and the Python API run the engine, beside where the other benchmarks do.

`chat`, `serve`, `generate` and `LLM` step the engine in its driver thread (``EngineDriver``); the other
benchmarks step an ``Engine`` in the calling thread. Until 2026-11-30 the kernels split their work with
OpenMP, whose workers sleep between regions once a second thread has started regions of its own, so
the driver thread decoded far slower than the numbers the benchmarks printed. This prints both, in one
process, alternating rounds: batch 1 and 16, greedy, 16-token prompts, prefill excluded (the engine's
rate after its first step; through ``LLM.generate`` the tokens after each request's first over its
``decode_seconds``, the longest of the batch).

    .venv/bin/python benchmarks/bench_driver.py [MODEL] [--quantize int8|int4] [--tokens 128] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from bench_generate import decode_rate  # benchmarks/, beside this script

from qwenkit.default_model import default_model_path
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

BATCHES = (1, 16)


def driver_rate(llm: LLM, batch: int, new_tokens: int, prompt_len: int = 16) -> float:
    """Aggregate decode tokens/s of ``batch`` requests through ``LLM.generate`` (the driver thread)."""
    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    prompts = [[(7 * b + i) % 1000 + 10 for i in range(prompt_len)] for b in range(batch)]
    done = llm.generate(prompts, params)
    return sum(len(c.token_ids) - 1 for c in done) / max(c.decode_seconds for c in done)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", default=None, help="checkpoint or .gguf (default: the bundled model)")
    ap.add_argument("--quantize", choices=["int8", "int4"])
    ap.add_argument("--tokens", type=int, default=128, help="new tokens per request")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    llm = LLM.load(args.model or default_model_path(), quantize=args.quantize, max_batch_size=max(BATCHES))
    for batch in BATCHES:  # warm-up: kernels, pools, the driver thread
        decode_rate(llm.model, batch, 4)
        driver_rate(llm, batch, 4)
    rates: dict[tuple[str, int], list[float]] = {}
    for r in range(args.rounds):
        for batch in BATCHES:
            runs = [("engine", decode_rate), ("driver", driver_rate)]
            for where, measure in runs if r % 2 == 0 else runs[::-1]:
                target = llm.model if where == "engine" else llm
                rates.setdefault((where, batch), []).append(measure(target, batch, args.tokens))
    print(
        f"{torch.get_num_threads()} threads, {args.tokens} greedy tokens a request after a 16-token "
        f"prompt, median of {args.rounds} rounds ({time.strftime('%Y-%m-%d %H:%M')})\n"
    )
    print(
        "| batch | engine in the calling thread, tok/s | through LLM (its driver thread: chat, serve), "
        "tok/s | ratio |"
    )
    print("|---:|---:|---:|---:|")
    for batch in BATCHES:
        engine = statistics.median(rates[("engine", batch)])
        driver = statistics.median(rates[("driver", batch)])
        print(f"| {batch} | {engine:.1f} | {driver:.1f} | {driver / engine:.2f} |")


if __name__ == "__main__":
    main()
