"""Aggregate decode at batch 16 against batch 1, per model and bit width, in one run (not a test).

Issue 13 asks that 16 requests decoding together yield at least 6x the tokens/s of one. Each model is
loaded once; batch 1 and batch 16 then alternate for several rounds in the same process (this machine's
speed drifts from minute to minute, so both sides of a ratio are taken side by side), greedy through the
engine the CLI and the server use, 16-token prompts (``--prompt``: longer, to decode at a depth), prefill
excluded. Models: the bundled SmolLM2 GGUF
(Q4_1 layers, Q8_0 head) and random-weight checkpoints of the exact Qwen2.5-0.5B and 1.5B shapes (the
ones ``bench_vs_llamacpp.py`` builds, made here when missing) in bfloat16 and with ``--quantize int8`` /
``int4``, and (``--precisions q4_k_m,iq4_nl,iq4_xs,q5_0,q5_k_m,q6_k``, not by default) llama.cpp's files of
each shape in those types, which qwenkit loads in their own precision (``bench_vs_llamacpp.py --pairs``
with the same names makes them).

The peer: with ``--llama-bin DIR`` (the directory holding llama.cpp's ``llama-batched-bench``, which
``bench_vs_llamacpp.py`` builds beside libllama), each round also runs llama.cpp on the same model at the
same bits (the bundled GGUF itself; the shapes' f16 / q8_0 / q4_0 GGUFs from ``bench_vs_llamacpp.py``),
batch 1 and batch 16 in one process, the same prompt lengths and new tokens, its S_TG (decode only).

    .venv/bin/python benchmarks/bench_batch_scaling.py [--models bundled,0.5b,1.5b]
        [--precisions bf16,int8,int4] [--tokens 64] [--prompt 16] [--rounds 3] [--batch 16] [--llama-bin DIR]
"""

from __future__ import annotations

import argparse
import gc
import statistics
import subprocess
import time
from collections.abc import Iterable
from pathlib import Path
from typing import NamedTuple

import torch
from bench_generate import decode_rate  # benchmarks/, beside this script
from bench_vs_llamacpp import SHAPES, write_anchor

from qwenkit.checkpoint import load_model
from qwenkit.default_model import default_model_path

GGUF_FILES = ("q4_k_m", "iq4_nl", "iq4_xs", "q5_0", "q5_k_m", "q6_k")  # llama.cpp's files qwenkit loads too
QUANTIZE = {"bf16": None, "int8": "int8", "int4": "int4"} | {f: None for f in GGUF_FILES}
# llama.cpp's file at the same bits (for GGUF_FILES the file both tools read)
LLAMA_FTYPE = {"bf16": "f16", "int8": "q8_0", "int4": "q4_0"} | {f: f for f in GGUF_FILES}


class Run(NamedTuple):
    label: str
    checkpoint: Path
    quantize: str | None  # qwenkit's --quantize
    gguf: Path  # llama.cpp's file at the same bits
    gguf_type: str


def runs(models: list[str], precisions: list[str], work: Path) -> list[Run]:
    """Every model and precision asked for, with its llama.cpp counterpart."""
    out = []
    for model in models:
        if model == "bundled":
            bundled = default_model_path()
            out.append(Run("SmolLM2-135M Q4_1 (bundled)", bundled, None, bundled, "the same GGUF"))
            continue
        path = work / f"qwen2.5-{model}-random"
        if not path.exists():
            print(f"building the random Qwen2.5-{model.upper()} checkpoint at {path} ...", flush=True)
            write_anchor(path, SHAPES[model])
        for p in precisions:
            gguf = work / f"{path.name}-{LLAMA_FTYPE[p]}.gguf"
            if p in GGUF_FILES:  # both tools read the same file
                out.append(
                    Run(f"Qwen2.5-{model.upper()} {p.upper()} GGUF", gguf, None, gguf, "the same GGUF")
                )
                continue
            out.append(Run(f"Qwen2.5-{model.upper()} {p}", path, QUANTIZE[p], gguf, LLAMA_FTYPE[p]))
    return out


def models_and_precisions(
    ap: argparse.ArgumentParser, args: argparse.Namespace, allowed: Iterable[str]
) -> tuple[list[str], list[str]]:
    """``--models`` and ``--precisions`` as lists, each name checked (``ap.error`` names a wrong one)."""
    allowed = list(allowed)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    precisions = [p.strip() for p in args.precisions.split(",") if p.strip()]
    for m in models:
        if m != "bundled" and m not in SHAPES:
            ap.error(f"unknown model {m!r}: choose from bundled, {', '.join(SHAPES)}")
    for p in precisions:
        if p not in allowed:
            ap.error(f"unknown precision {p!r}: choose from {', '.join(allowed)}")
    return models, precisions


def llama_rates(
    bench: Path, gguf: Path, batch: int, prompt: int, tokens: int, threads: int
) -> tuple[float, float]:
    """llama.cpp's aggregate decode tokens/s (S_TG of llama-batched-bench) at batch 1 and ``batch``."""
    cmd = [str(bench), "-m", str(gguf), "-c", str(batch * (prompt + tokens) + 64), "-b", "512", "-ub", "512"]
    cmd += ["-npp", str(prompt), "-ntg", str(tokens), "-npl", f"1,{batch}", "-t", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    rates = {}
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 8 and cells[2].isdigit():  # PP, TG, B, N_KV, T_PP, S_PP, T_TG, S_TG, ...
            rates[int(cells[2])] = float(cells[7])
    if done.returncode != 0 or set(rates) != {1, batch}:
        tail = done.stderr[-2000:]
        raise SystemExit(f"llama-batched-bench failed on {gguf} (exit {done.returncode}):\n{tail}")
    return rates[1], rates[batch]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="bundled,0.5b,1.5b", help="bundled, 0.5b, 1.5b (comma separated)")
    ap.add_argument("--precisions", default="bf16,int8,int4", help="for the Qwen2.5 shapes")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--prompt", type=int, default=16, help="prompt tokens per request (the decode depth)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    ap.add_argument("--llama-bin", type=Path, help="directory with llama.cpp's llama-batched-bench")
    args = ap.parse_args()
    models, precisions = models_and_precisions(ap, args, QUANTIZE)

    bench = None
    if args.llama_bin is not None:
        bench = args.llama_bin / "llama-batched-bench"
        if not bench.exists():
            ap.error(f"no llama-batched-bench in {args.llama_bin} (bench_vs_llamacpp.py builds it)")
    plan = runs(models, precisions, args.work)
    missing = [
        str(run.gguf)
        for run in plan
        if (bench is not None or run.checkpoint == run.gguf) and not run.gguf.exists()
    ]
    if missing:
        ap.error("llama.cpp's GGUFs are missing (bench_vs_llamacpp.py converts them): " + ", ".join(missing))
    threads = torch.get_num_threads()
    print(
        f"{threads} threads, {args.tokens} new tokens per request after a {args.prompt}-token prompt, "
        f"batch 1 and batch {args.batch} alternating, median of {args.rounds} rounds "
        f"({time.strftime('%Y-%m-%d %H:%M')})\n"
    )
    head = f"| model | batch 1 tok/s | batch {args.batch} tok/s | ratio | per-round ratios |"
    rule = "|---|---:|---:|---:|---|"
    if bench is not None:
        head += f" llama.cpp | batch 1 | batch {args.batch} | ratio | qwenkit / llama.cpp at {args.batch} |"
        rule += "---|---:|---:|---:|---:|"
    print(head + "\n" + rule)
    for run in plan:
        model, _ = load_model(
            run.checkpoint, dtype="bfloat16", quantize=run.quantize, progress=False, fast_kernels=True
        )
        decode_rate(model, args.batch, 4, args.prompt)  # warm-up: kernels, pools, the first allocations
        one, many, peer_one, peer_many = [], [], [], []
        for _ in range(args.rounds):
            if bench is not None:
                a, b = llama_rates(bench, run.gguf, args.batch, args.prompt, args.tokens, threads)
                peer_one.append(a)
                peer_many.append(b)
                decode_rate(model, 1, 4, args.prompt)  # after the other process: our pages and caches again
            one.append(decode_rate(model, 1, args.tokens, args.prompt))
            many.append(decode_rate(model, args.batch, args.tokens, args.prompt))
        ratios = ", ".join(f"{b / a:.2f}" for a, b in zip(one, many, strict=True))
        a, b = statistics.median(one), statistics.median(many)
        row = f"| {run.label} | {a:.1f} | {b:.1f} | **{b / a:.2f}** | {ratios} |"
        if bench is not None:
            pa, pb = statistics.median(peer_one), statistics.median(peer_many)
            row += f" {run.gguf_type} | {pa:.1f} | {pb:.1f} | {pb / pa:.2f} | {b / pb:.2f} |"
        print(row, flush=True)
        del model
        gc.collect()


if __name__ == "__main__":
    main()
