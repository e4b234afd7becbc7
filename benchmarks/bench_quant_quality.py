"""Perplexity of int8/int4 (RTN and GPTQ) against float on held-out real text; prints a markdown table.

Model: the bundled SmolLM2-135M-Instruct (Q4_1 GGUF), its weights upcast to float32: that float model is
the reference every quantized variant is compared with. Text: CPython's pydoc topics (the default GPTQ
calibration text), split by position: GPTQ calibrates only on the first ``--calib-fraction`` of the
characters, and perplexity is measured on windows from the rest (the held-out part), never seen by GPTQ.

    .venv/bin/python benchmarks/bench_quant_quality.py [MODEL] [--calib-samples 32 --seq-len 512]
        [--eval-windows 16 --eval-len 512] [--variants float,rtn8,rtn4,gptq4,...]

Variants (lm_head stays float unless the name says ``+head``; ``+head`` is what ``--quantize`` does):
float, rtn8 (per channel, sym), rtn8+head, rtn4 (g128 sym), rtn4a (g128 asym), rtn4a+head, gptq4
(g128 sym, no act-order, Qwen's published setting), gptq4-static (static act-order, the ``qwenkit
quantize`` default), gptq4-act (dynamic act-order), gptq4a (asym), gptq4a-act, gptq8.

Group 128 is what is asked for; RTN and GPTQ variants use the size ``qwenkit quantize`` writes for the
model (:func:`qwenkit.quant.group_size.choose_group_size`: 64 for SmolLM2, whose 576-wide layers 128
does not tile). ``--partial-groups`` keeps 128 with a short last group, as the figures before
2026-11-29 did. The ``runtime`` variants are ``--quantize``: 128 where it tiles a layer, else 64 or 32
(no file, no other reader).
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.default_model import default_model_path
from qwenkit.generate import tokenizer_for
from qwenkit.quant import GPTQConfig, calibration_token_ids, default_calibration_text, gptq_quantize_model
from qwenkit.quant.checkpoint_io import NOT_QUANTIZED
from qwenkit.quant.group_size import choose_group_size
from qwenkit.quant.rtn import quantize_for_runtime, quantize_model_rtn

# name -> (method, bits, group, sym, act_order, quantize lm_head)
VARIANTS = {
    "float": (None, 0, 0, True, "none", False),
    "rtn8": ("rtn", 8, -1, True, "none", False),
    "rtn8+head": ("rtn", 8, -1, True, "none", True),
    "rtn4": ("rtn", 4, 128, True, "none", False),
    "rtn4a": ("rtn", 4, 128, False, "none", False),
    "rtn4a+head": ("rtn", 4, 128, False, "none", True),
    "gptq4": ("gptq", 4, 128, True, "none", False),
    "gptq4-static": ("gptq", 4, 128, True, "static", False),
    "gptq4-act": ("gptq", 4, 128, True, "dynamic", False),
    "gptq4a": ("gptq", 4, 128, False, "none", False),
    "gptq4a-act": ("gptq", 4, 128, False, "dynamic", False),
    "gptq8": ("gptq", 8, -1, True, "none", False),
    "runtime8": ("runtime", 8, -1, True, "none", True),  # exactly `--quantize int8`
    "runtime4": ("runtime", 4, 128, False, "none", True),  # exactly `--quantize int4` (int8 head)
}


def split_text(fraction: float) -> tuple[str, str]:
    text = default_calibration_text()
    cut = text.index("\n\n", int(len(text) * fraction))  # at a topic boundary
    return text[:cut], text[cut:]


@torch.no_grad()
def perplexity(model, windows: list[list[int]]) -> float:
    nll, count = 0.0, 0
    for w in windows:
        ids = torch.tensor([w])
        logits = model(ids)[0, :-1].float()  # (T-1, V)
        nll += float(torch.nn.functional.cross_entropy(logits, ids[0, 1:], reduction="sum"))
        count += len(w) - 1
    return math.exp(nll / count)


def file_group(model, group: int, partial: bool) -> int:
    """The group size `qwenkit quantize` would write for this model when asked for ``group``."""
    widths = {
        n: m.in_features
        for n, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and n.split(".")[-1] not in NOT_QUANTIZED
    }
    return choose_group_size(widths, group, partial).group_size


def build(path, variant: str, calib: list[list[int]], damp: float, partial: bool):
    method, bits, group, sym, act, head = VARIANTS[variant]
    model, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    if method in ("rtn", "gptq"):
        group = file_group(model, group, partial)
    if method == "runtime":
        quantize_for_runtime(model, f"int{bits}")
    elif method == "rtn":
        quantize_model_rtn(model, bits, group, sym, skip=() if head else ("lm_head",))
    elif method == "gptq":
        config = GPTQConfig(bits=bits, group_size=group, sym=sym, act_order=act, damp_percent=damp)
        gptq_quantize_model(model, calib, config, progress=False)
    return model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument(
        "--variants", default="float,rtn8,rtn8+head,rtn4,gptq4,gptq4-static,gptq4-act,rtn4a,gptq4a,rtn4a+head"
    )
    ap.add_argument("--partial-groups", action="store_true", help="keep group 128 with a short last group")
    ap.add_argument("--calib-samples", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--calib-fraction", type=float, default=0.8)
    ap.add_argument("--eval-windows", type=int, default=16)
    ap.add_argument("--eval-len", type=int, default=512)
    ap.add_argument("--damp", type=float, default=0.01)
    args = ap.parse_args()
    path = args.model or default_model_path()
    tokenizer = tokenizer_for(open_checkpoint(path))
    calib_text, held_out = split_text(args.calib_fraction)
    ids = tokenizer.encode(held_out)
    n = min(args.eval_windows, len(ids) // args.eval_len)
    step = len(ids) // n
    windows = [ids[i * step : i * step + args.eval_len] for i in range(n)]  # spread over the held-out part
    calib = calibration_token_ids(tokenizer.encode, args.calib_samples, args.seq_len, calib_text)
    probe, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    group4 = file_group(probe, 128, args.partial_groups)
    del probe
    print(
        f"model: {path} (weights upcast to float32)\nheld-out text: last {1 - args.calib_fraction:.0%} of "
        f"CPython's pydoc topics, {len(ids)} tokens; perplexity over {n} windows of {args.eval_len} tokens\n"
        f"GPTQ calibration: {len(calib)} x {args.seq_len} tokens from the first {args.calib_fraction:.0%}, "
        f"damp {args.damp}; torch {torch.__version__}, {torch.get_num_threads()} threads\n"
        f"int4 RTN/GPTQ group size: 128 asked, {group4} used (what qwenkit quantize writes)\n",
        flush=True,
    )
    results: dict[str, float] = {}
    times: dict[str, float] = {}
    for variant in args.variants.split(","):
        start = time.perf_counter()
        model = build(path, variant, calib, args.damp, args.partial_groups)
        times[variant] = time.perf_counter() - start
        results[variant] = perplexity(model, windows)
        print(f"  {variant}: {results[variant]:.4f} ({times[variant]:.0f} s to quantize)", flush=True)
        del model
    base = results.get("float")
    print(f"\nload average {' '.join(f'{x:.2f}' for x in os.getloadavg())}\n")
    print("| variant | perplexity | vs float | gap closed vs RTN (same bits/group/sym) | quantize time |")
    print("|---|---|---|---|---|")
    for v, ppl in results.items():
        vs = f"{100 * (ppl / base - 1):+.2f}%" if base else "-"
        closed = "-"
        rtn = {
            "gptq4": "rtn4",
            "gptq4-act": "rtn4",
            "gptq4-static": "rtn4",
            "gptq4a": "rtn4a",
            "gptq4a-act": "rtn4a",
            "gptq8": "rtn8",
        }.get(v)
        if base and rtn in results and results[rtn] > base:
            closed = f"{100 * (results[rtn] - ppl) / (results[rtn] - base):.0f}%"
        print(f"| {v} | {ppl:.3f} | {vs} | {closed} | {times[v]:.0f} s |")


if __name__ == "__main__":
    main()
