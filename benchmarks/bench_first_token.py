"""First token of a short prompt and decode rate through the driver thread, per OpenMP spin setting.

`chat` and `serve` step the engine in a driver thread that runs torch's small ops on OpenMP beside the
kernels' own worker threads; how long OpenMP's workers spin after each op decides whether they hold the
core the kernels need. Each configuration is a fresh process (libgomp reads its settings once, when torch
loads it), configurations alternating over ``--rounds``: the bundled model through ``LLM.stream``, the
median first-token time over ``--prompts`` short prompts, then the best of 3 decodes of 128 pieces, on
the kernels and on the plain PyTorch path (``QWENKIT_KERNELS=torch``). "CLI default" is what ``qwenkit``
sets (``quiet_library_threads``); "libgomp default" is a Python program that imports torch itself.

    .venv/bin/python benchmarks/bench_first_token.py [--rounds 2] [--prompts 200] [--spin-counts 10000,30000]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

from qwenkit.library_threads import OPENMP_SPIN_COUNT

CHILD = r"""
import json, statistics, sys, time
from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.default_model import default_model_path
from qwenkit.generate import LLM, tokenizer_for
source = open_checkpoint(default_model_path())
model, _ = load_model(source, progress=False, fast_kernels=True)
llm = LLM(model, tokenizer_for(source), max_batch_size=1)
first = llm.default_params(max_tokens=1, temperature=0.0, ignore_eos=True)
waits = []
for i in range(int(sys.argv[1])):
    t = time.perf_counter()
    for _ in llm.stream(f"Hi {i}", first):
        break
    waits.append(time.perf_counter() - t)
decode, best = llm.default_params(max_tokens=128, temperature=0.0, ignore_eos=True), 0.0
for _ in range(3):
    t, n = time.perf_counter(), 0
    for _ in llm.stream("Tell me a story about a cat.", decode):
        n += 1
    best = max(best, n / (time.perf_counter() - t))
print(json.dumps({"first_ms": statistics.median(waits) * 1e3, "decode": best}))
"""


def settings(spin_counts: list[str]) -> dict[str, dict[str, str]]:
    """The configurations to compare: libgomp's default, each spin count (the CLI's marked), PASSIVE."""
    out: dict[str, dict[str, str]] = {"libgomp default": {}}
    for count in spin_counts:
        mark = " (CLI default)" if count == OPENMP_SPIN_COUNT else ""
        out[f"GOMP_SPINCOUNT={count}{mark}"] = {"GOMP_SPINCOUNT": count}
    out["OMP_WAIT_POLICY=PASSIVE"] = {"OMP_WAIT_POLICY": "PASSIVE"}
    return out


def run(env: dict[str, str], prompts: int) -> dict:
    base = {k: v for k, v in os.environ.items() if k not in ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")}
    cmd = [sys.executable, "-c", CHILD, str(prompts)]
    out = subprocess.run(cmd, env=base | env, capture_output=True, text=True, timeout=900)
    if out.returncode != 0:
        raise SystemExit(f"child failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--spin-counts", default=OPENMP_SPIN_COUNT, help="comma-separated GOMP_SPINCOUNT values")
    args = ap.parse_args()
    counts = [c.strip() for c in args.spin_counts.split(",") if c.strip()]
    if not all(c.isdigit() for c in counts):
        raise SystemExit(f"--spin-counts: expected comma-separated whole numbers, got {args.spin_counts!r}")
    configs = settings(counts)
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for name, env in configs.items():
            for path, extra in (("kernels", {}), ("torch", {"QWENKIT_KERNELS": "torch"})):
                results.setdefault((name, path), []).append(run(env | extra, args.prompts))
    print(f"bundled model, {args.rounds} rounds, ranges over rounds\n")
    print("| OpenMP setting | first token, kernels (ms) | decode, kernels (pieces/s) | decode, plain torch |")
    print("|---|---:|---:|---:|")
    for name in configs:
        k, t = results[name, "kernels"], results[name, "torch"]

        def span(rows: list[dict], key: str, fmt: str) -> str:
            values = [r[key] for r in rows]
            return f"{min(values):{fmt}}-{max(values):{fmt}} (median {statistics.median(values):{fmt}})"

        cells = [span(k, "first_ms", ".1f"), span(k, "decode", ".1f"), span(t, "decode", ".1f")]
        print(f"| {name} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
