"""A prompt chunk's attention over the paged KV pool: qwenkit's AMX kernel vs the SDPA path (not a test).

    PYTHONPATH=src .venv/bin/python benchmarks/bench_prefill_attention.py
    PYTHONPATH=src .venv/bin/python benchmarks/bench_prefill_attention.py --starts 0 3584 --rounds 5

One layer's attention for one prompt chunk of ``--chunk`` tokens after ``start`` cached ones, its keys in
a pool laid out as the engine lays it out (blocks of 16 slots, in shuffled order). The peer is what the
engine runs where the kernel does not (``StepAttention.attend``'s SDPA path): gather the keys and values
into a copy, build the additive causal mask once, then torch's scaled_dot_product_attention with grouped
heads (plain causal SDPA when the chunk starts the sequence). The figure is the fastest call of each over
interleaved rounds; T MAC/s counts the multiply-adds of Q . K^T and P . V a causal chunk needs. The
kernel runs only where AMX is in use (Sapphire Rapids and later); elsewhere the script says so and stops.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from qwenkit import kernels

BLOCK = 16  # slots per KV block, the engine's default
SHAPES = {  # query heads, KV heads, head dim
    "SmolLM2-135M": (9, 3, 64),
    "Qwen2.5-0.5B": (14, 2, 64),
    "Qwen2.5-1.5B": (12, 2, 128),
    "Qwen2.5-7B": (28, 4, 128),
}


def fastest(fn: Callable[[], object], calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument(
        "--chunk", type=int, default=512, help="prompt tokens in the chunk (the engine's default)"
    )
    ap.add_argument(
        "--starts", type=int, nargs="+", default=[0, 1536, 3584, 7680], help="cached tokens before it"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--calls", type=int, default=5, help="calls per round")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if not kernels.available() or not kernels.prefill_attention_runs(64):
        raise SystemExit("kernels.prefill_attention needs AMX in use (a Sapphire Rapids-class CPU); not here")
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads; fastest of {args.rounds} x {args.calls} calls")
    print()
    print("| shape (H / Hkv / D) | chunk after | SDPA path ms | T MAC/s | qwenkit ms | T MAC/s | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    g = torch.Generator().manual_seed(0)
    n = args.chunk
    for name in args.shapes:
        H, Hkv, D = SHAPES[name]
        for start in args.starts:
            S = start + n
            blocks = -(-S // BLOCK) + 8
            k_pool = torch.randn(blocks * BLOCK, Hkv, D, generator=g).bfloat16()
            v_pool = torch.randn(blocks * BLOCK, Hkv, D, generator=g).bfloat16()
            table = torch.randperm(blocks, generator=g)
            slots = (table[:, None] * BLOCK + torch.arange(BLOCK)).flatten()[:S]
            qkv = torch.randn(n, H + 2 * Hkv, D, generator=g).bfloat16()
            q = qkv[:, :H]  # as the model hands it over: a view into the q/k/v rows
            scale = D**-0.5
            keys = torch.arange(S)
            mask = torch.zeros(n, S, dtype=torch.bfloat16)
            mask.masked_fill_(keys[None, :] > keys[start:, None], float("-inf"))

            def sdpa(q=q, k_pool=k_pool, v_pool=v_pool, slots=slots, start=start, mask=mask):
                qr = q.transpose(0, 1)[None]
                kr = k_pool[slots].transpose(0, 1)[None]
                vr = v_pool[slots].transpose(0, 1)[None]
                if start == 0:
                    return F.scaled_dot_product_attention(qr, kr, vr, is_causal=True, enable_gqa=True)
                return F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask[None, None], enable_gqa=True)

            def ours(q=q, k_pool=k_pool, v_pool=v_pool, slots=slots, start=start, scale=scale):
                return kernels.prefill_attention(q, k_pool, v_pool, slots, start, scale)

            got, want = ours().float(), sdpa()[0].transpose(0, 1).float()
            assert (got - want).abs().max() < 0.05, f"{name}: the kernel and SDPA disagree"
            peer = mine = float("inf")
            for _ in range(args.rounds):
                peer = min(peer, fastest(sdpa, args.calls))
                mine = min(mine, fastest(ours, args.calls))
            macs = 2 * H * D * (n * start + n * (n + 1) / 2)
            cells = [f"{name} ({H} / {Hkv} / {D})", f"{n} after {start}", f"{peer * 1e3:.2f}"]
            cells += [f"{macs / peer / 1e12:.2f}", f"{mine * 1e3:.2f}", f"{macs / mine / 1e12:.2f}"]
            print("| " + " | ".join(cells) + f" | {peer / mine:.2f}x |")


if __name__ == "__main__":
    main()
