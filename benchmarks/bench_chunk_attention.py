"""A prompt chunk's attention where AMX is not in use: each query as a decoding row (the kernels'
``decode_attention``, what the engine runs) against torch's SDPA (what it ran before 2026-12-06), on the
bundled model or MODEL, through ``LLM.generate`` with the default 512-token steps (not a test).

The two arms alternate in fresh processes (this machine's speed drifts); each prints the best of
``--repeats`` prefill rates per prompt length, prefix caching off.

    .venv/bin/python benchmarks/bench_chunk_attention.py [MODEL] [--lengths 512,2048] [--rounds 3]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

ARMS = ("decode-rows", "sdpa")


def measure(arm: str, model: str | None, lengths: list[int], repeats: int) -> list[float]:
    """Prefill tokens/s per length in this process, with ``arm``'s chunk attention."""
    from qwenkit.default_model import default_model_path
    from qwenkit.engine import SamplingParams, kv_cache
    from qwenkit.generate import LLM

    if arm == "sdpa":  # the chunks' former path: fast_decode off for steps with prompt chunks
        build = kv_cache.StepAttention.__init__

        def with_sdpa(self, *args, **kwargs) -> None:
            build(self, *args, **kwargs)
            self.fast_decode = self.fast_decode and not self.chunks

        kv_cache.StepAttention.__init__ = with_sdpa
    rates = []
    greedy = SamplingParams(max_tokens=1, temperature=0)
    for n in lengths:
        llm = LLM.load(model or default_model_path(), progress=False, prefix_caching=False)
        prompt = [(i * 13) % 1000 + 10 for i in range(n)]
        llm.generate([prompt[:64]], greedy)  # warm-up
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            llm.generate([prompt], greedy)
            best = min(best, time.perf_counter() - start)
        rates.append(n / best)
        llm.close()
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--lengths", default="512,2048")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)  # one process's measurement
    args = ap.parse_args()
    lengths = [int(x) for x in args.lengths.split(",")]
    if args.arm:
        print(",".join(f"{r:.0f}" for r in measure(args.arm, args.model, lengths, args.repeats)))
        return
    print(time.strftime("%Y-%m-%d %H:%M"), "prefill tok/s, best of", args.repeats, "per process\n")
    print("| round | arm | " + " | ".join(f"{n} tokens" for n in lengths) + " |")
    print("|---:|---|" + "---:|" * len(lengths))
    for r in range(args.rounds):
        for arm in ARMS:
            cmd = [sys.executable, __file__, *([args.model] if args.model else []), "--arm", arm]
            cmd += ["--lengths", args.lengths, "--repeats", str(args.repeats)]
            rates = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.split()[-1]
            print(f"| {r + 1} | {arm} | " + " | ".join(rates.split(",")) + " |", flush=True)


if __name__ == "__main__":
    main()
