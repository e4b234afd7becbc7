"""A GGUF file's Q5, Q6_K and IQ4 weights at their own width against int8 codes (not a test).

qwenkit holds Q5_0/Q5_1/Q5_K codes at 5 bits (``avx512_int5``), Q6_K as the file does (``avx512_q6_k``)
and IQ4_NL/IQ4_XS indices at 4 bits (``avx512_iq4``) on every build of its kernels (AVX2 and AVX-VNNI
since 2026-12-03); switched off, they run as 8-bit codes (the same results; Q6_K rounded again to int8
codes per group of 32, a weight moving by at most half an int8 step), as before. This loads
the file both ways in one process (the narrow kernels switched off for the second load, and the
prepared-model cache off for both, so each is packed here) and alternates batch-1 and batch-16 decode
between them for several rounds (this machine's speed drifts from minute to minute), then times a
512-token prefill on each. Prints the weights' bytes, the kernels used and the medians.

    .venv/bin/python benchmarks/bench_narrow_codes.py FILE.gguf [--rounds 4] [--tokens 64] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import os
import statistics
from collections import Counter
from unittest import mock

from bench_generate import decode_rate, prefill_rate  # benchmarks/, beside this script

from qwenkit import kernels
from qwenkit.checkpoint import load_model


def load(path: str, narrow: bool):
    """The model with the narrow kernels (as qwenkit chooses by default) or with int8 codes only."""
    if narrow:
        model, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
        return model
    with (
        mock.patch.object(kernels, "runs_int5", lambda: False),
        mock.patch.object(kernels, "runs_iq4_table", lambda: False),
        mock.patch.object(kernels, "runs_q6_k", lambda: False),
    ):
        model, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    return model


def describe(model) -> str:
    weights = sum(t.nbytes for t in (*model.buffers(), *model.parameters()))
    used = Counter(m.impl.key for m in model.modules() if getattr(m, "impl", None) is not None)
    return f"weights {weights / 2**20:,.0f} MiB; kernels {dict(used)}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("file")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--batches", default="1,16")
    args = ap.parse_args()
    os.environ["QWENKIT_PREPARED_CACHE"] = "off"  # each load packs its own weights
    if not kernels.available():
        raise SystemExit("qwenkit's C++ kernels are not available here (see above): nothing to compare")
    models = {"own width": load(args.file, True), "int8 codes": load(args.file, False)}
    for name, model in models.items():
        print(f"{name}: {describe(model)}", flush=True)
    batches = [int(b) for b in args.batches.split(",")]
    rates: dict[tuple[str, int], list[float]] = {(n, b): [] for n in models for b in batches}
    for r in range(args.rounds):
        order = list(models.items()) if r % 2 == 0 else list(models.items())[::-1]
        for batch in batches:
            for name, model in order:
                rates[name, batch].append(decode_rate(model, batch, args.tokens))
    prefill = {name: statistics.median(prefill_rate(m, 512) for _ in range(2)) for name, m in models.items()}
    print(f"\n{args.file}: median of {args.rounds} rounds, {args.tokens} new tokens, 16-token prompts\n")
    print("| | " + " | ".join(f"batch {b} tok/s" for b in batches) + " | 512-token prefill tok/s |")
    print("|---|" + "---:|" * (len(batches) + 1))
    for name in models:
        cells = [f"{statistics.median(rates[name, b]):.1f}" for b in batches]
        print(f"| {name} | " + " | ".join(cells) + f" | {prefill[name]:.1f} |")
    ratios = [
        statistics.median(rates["own width", b]) / statistics.median(rates["int8 codes", b]) for b in batches
    ]
    print(
        "| ratio | "
        + " | ".join(f"{x:.3f}" for x in ratios)
        + f" | {prefill['own width'] / prefill['int8 codes']:.3f} |"
    )


if __name__ == "__main__":
    main()
