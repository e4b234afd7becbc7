"""Decode speed and weight memory per precision at the exact Qwen2.5-0.5B shape (random weights).

No checkpoint is needed: the model is built on the meta device and filled with random weights (norms
at one), then quantized the way ``--quantize int8|int4`` does it (RTN, lm_head included, the tied
embedding served from the quantized lm_head). Decoding runs through the real ``Engine`` at batch 1 from
a 1-token prompt, greedy, EOS ignored. Prints a markdown table (not a test).

    .venv/bin/python benchmarks/bench_quant_speed.py [--tokens 128] [--rounds 3]
        [--precisions float32,bfloat16,int8,int4] [--profile int4]

Weight memory is the bytes of the model's unique parameters and buffers (the KV cache is separate).
Each precision is timed ``--rounds`` times, interleaved, and the best round is reported, because the
2-core machine is shared; the load average is printed with the table.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
from shapes import QWEN25_05B  # benchmarks/shapes.py, beside this script

from qwenkit.config import ModelConfig
from qwenkit.engine import Engine, SamplingParams
from qwenkit.model import Transformer
from qwenkit.quant import QuantizedLinear, quantize_for_runtime

# precision -> (model dtype, --quantize)
PRECISIONS = {
    "float32": (torch.float32, None),
    "bfloat16": (torch.bfloat16, None),
    "int8": (torch.bfloat16, "int8"),
    "int4": (torch.bfloat16, "int4"),
    "int8-f32act": (torch.float32, "int8"),
    "int4-f32act": (torch.float32, "int4"),
}


@torch.no_grad()
def random_model(hf_config: dict, dtype: torch.dtype, quantize: str | None, seed: int = 0) -> Transformer:
    """The architecture of ``hf_config`` with random weights, quantized like the loader's ``--quantize``."""
    config = ModelConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if "norm" in name:
            p.fill_(1.0)
        elif name.endswith("bias"):
            p.zero_()
        else:
            for rows in torch.split(p, 8192):  # fill in float32 chunks: no full float32 copy in bf16
                rows.copy_(torch.randn(rows.shape, generator=gen) * 0.02)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    from qwenkit.model.rope import inv_freq

    model.rotary.inv_freq = inv_freq(config)
    model = model.to(dtype).eval().requires_grad_(False)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    if quantize:
        quantize_for_runtime(model, quantize)  # exactly what --quantize does
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of unique parameters and buffers (tied tensors and shared modules counted once)."""
    seen: set[int] = set()
    total = 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() in seen or t.is_meta:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def kernels(model: torch.nn.Module) -> str:
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            counts[m.impl.key] = counts.get(m.impl.key, 0) + 1
    return ", ".join(f"{k} x{n}" for k, n in counts.items()) or "dense (torch.nn.functional.linear)"


def decode_rate(model: Transformer, tokens: int) -> float:
    """Tokens/s generating ``tokens`` tokens at batch 1 from a 1-token prompt (first token excluded)."""
    engine = Engine(model, max_batch_size=1, max_seq_len=tokens + 8)
    engine.add_request([100], SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))
    engine.step()  # the prompt (and first token)
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--precisions", default="float32,bfloat16,int8,int4")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--profile", help="print a torch profiler table of decode steps for this precision")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.precisions.split(",")
    models, mem = {}, {}
    for name in names:
        dtype, quantize = PRECISIONS[name]
        models[name] = random_model(QWEN25_05B, dtype, quantize)
        mem[name] = weight_bytes(models[name])
        decode_rate(models[name], 4)  # warm-up
        gc.collect()
    if args.profile:
        _profile(models[args.profile], args.tokens)
        return
    best = dict.fromkeys(names, 0.0)
    for _ in range(args.rounds):
        for name in names:
            best[name] = max(best[name], decode_rate(models[name], args.tokens))
    load = os.getloadavg()
    print(
        f"Qwen2.5-0.5B shape (494M parameters, tied embeddings), random weights; torch {torch.__version__}, "
        f"{args.threads} threads, CPU capability {torch.backends.cpu.get_cpu_capability()}; "
        f"{args.tokens} tokens from a 1-token prompt, batch 1, best of {args.rounds}; "
        f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}\n"
    )
    base = best.get("bfloat16")
    mbase = mem.get("bfloat16")
    print("| precision | decode tokens/s | x bfloat16 | weight memory | % of bfloat16 | kernels |")
    print("|---|---|---|---|---|---|")
    for name in names:
        speed = f"{best[name] / base:.2f}" if base else "-"
        frac = f"{100 * mem[name] / mbase:.1f}%" if mbase else "-"
        print(
            f"| {name} | {best[name]:.1f} | {speed} | {mem[name] / 2**20:.0f} MiB | {frac} "
            f"| {kernels(models[name])} |"
        )


def _profile(model: Transformer, tokens: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        decode_rate(model, tokens)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))


if __name__ == "__main__":
    main()
