"""MoE decode speed against a dense model with the same active parameters, in the same run (not a test).

The MoE is a random model with Qwen1.5-MoE-A2.7B's exact shape (hidden 2048, 16 heads, 60 experts of
width 1408, top-4, shared expert 5632, vocab 151936) at a reduced layer count (``--layers``, default 4;
the full 24 layers need 27 GiB in bfloat16). The dense peer has the same attention, embeddings and
layer count, and one SwiGLU FFN of width 4 x 1408 + 5632 = 11264: exactly the MoE's active parameters
per token (the MoE adds only its 60 x 2048 router and 2048 shared-expert gate).

Both run through the same engine the CLI uses, greedy, at batch 1 and 8, in bfloat16 and with
``--quantize int4``'s runtime quantization (experts int4, routers float). Runs alternate MoE / dense
``--repeats`` times and the best rate of each is kept, so load from other processes hits both alike.
A second table times one FFN block alone (MoE block vs the dense FFN), which isolates the dispatch.

    .venv/bin/python benchmarks/bench_moe.py [--layers 4] [--tokens 32] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import gc
import time

import torch
from bench_generate import decode_rate  # benchmarks/bench_generate.py, beside this script
from shapes import QWEN15_MOE_A27B  # benchmarks/shapes.py, beside this script

from qwenkit.config import ModelConfig
from qwenkit.model import Transformer
from qwenkit.model.moe import MoEMLP
from qwenkit.model.rope import inv_freq
from qwenkit.quant import quantize_for_runtime


def configs(layers: int) -> tuple[ModelConfig, ModelConfig]:
    moe = {**QWEN15_MOE_A27B, "num_hidden_layers": layers}
    active_ffn = moe["num_experts_per_tok"] * moe["moe_intermediate_size"]
    active_ffn += moe["shared_expert_intermediate_size"]
    dense = {
        k: v
        for k, v in moe.items()
        if k
        not in (
            "moe_intermediate_size",
            "shared_expert_intermediate_size",
            "num_experts",
            "num_experts_per_tok",
            "norm_topk_prob",
            "decoder_sparse_step",
            "mlp_only_layers",
        )
    }
    dense |= {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "intermediate_size": active_ffn}
    return ModelConfig.from_hf(moe), ModelConfig.from_hf(dense)


@torch.no_grad()
def random_model(config: ModelConfig, dtype: torch.dtype) -> Transformer:
    """Random weights straight in ``dtype`` (no float32 copy): normal(0, 0.02), norms at one."""
    with torch.device("meta"):
        model = Transformer(config)
    model = model.to(dtype).to_empty(device="cpu")
    g = torch.Generator().manual_seed(0)
    for name, p in model.named_parameters():
        if name.endswith("norm.weight"):
            p.fill_(1.0)
        else:
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).mul_(0.02))
    model.rotary.inv_freq = inv_freq(config)
    return model.eval().requires_grad_(False)


def block_ms(block: torch.nn.Module, rows: int, hidden: int, dtype: torch.dtype, iters: int = 30) -> float:
    """Milliseconds per forward of one FFN block on ``rows`` decode tokens (best of 3 x ``iters``)."""
    x = torch.randn(rows, 1, hidden, generator=torch.Generator().manual_seed(1)).to(dtype)
    best = float("inf")
    with torch.no_grad():
        block(x)
        for _ in range(3):
            start = time.perf_counter()
            for _ in range(iters):
                block(x)
            best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e3


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="bfloat16,int4")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    moe_cfg, dense_cfg = configs(args.layers)
    print(
        f"Qwen1.5-MoE-A2.7B shape, {args.layers} of 24 layers: MoE {moe_cfg.num_parameters / 1e9:.2f} B "
        f"parameters, {moe_cfg.num_active_parameters / 1e9:.3f} B active; dense peer "
        f"{dense_cfg.num_parameters / 1e9:.3f} B (FFN width {dense_cfg.intermediate_size}); "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}\n"
    )
    model_rows, block_rows = [], []
    for precision in args.precisions.split(","):
        models = {}
        for label, cfg in (("MoE", moe_cfg), ("dense", dense_cfg)):
            models[label] = random_model(cfg, torch.bfloat16)
            if precision == "int4":
                quantize_for_runtime(models[label], "int4")
            gc.collect()
            decode_rate(models[label], 1, 4)  # warm-up
        for batch in (1, 8):
            best = {"MoE": 0.0, "dense": 0.0}
            for _ in range(args.repeats):
                for label, model in models.items():
                    best[label] = max(best[label], decode_rate(model, batch, args.tokens))
            model_rows.append((precision, batch, best["MoE"], best["dense"]))
            moe_block = next(m for m in models["MoE"].modules() if isinstance(m, MoEMLP))
            dense_block = models["dense"].model.layers[0].mlp
            h = moe_cfg.hidden_size
            block_rows.append(
                (
                    precision,
                    batch,
                    block_ms(moe_block, batch, h, torch.bfloat16),
                    block_ms(dense_block, batch, h, torch.bfloat16),
                )
            )
        del models
        gc.collect()

    print("| precision | batch | MoE tokens/s | dense tokens/s | MoE / dense |")
    print("|---|---|---|---|---|")
    for precision, batch, moe, dense in model_rows:
        print(f"| {precision} | {batch} | {moe:.2f} | {dense:.2f} | {moe / dense:.0%} |")
    print("\nOne FFN block per decode step (ms; lower is better):\n")
    print("| precision | batch | MoE block | dense FFN | dense / MoE |")
    print("|---|---|---|---|---|")
    for precision, batch, moe, dense in block_rows:
        print(f"| {precision} | {batch} | {moe:.2f} | {dense:.2f} | {dense / moe:.0%} |")


if __name__ == "__main__":
    main()
