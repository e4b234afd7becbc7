"""LoRA training speed and peak memory: qwenkit vs transformers + peft, same model, data and settings.

Models (``--model``):
- ``smollm2``: the bundled SmolLM2-135M-Instruct (its GGUF dequantized to float32; transformers reads the
  same weights from a Hugging Face directory written by ``qwenkit convert --to hf``);
- ``qwen3-moe``: a random Qwen3-MoE in Qwen3-30B-A3B's proportions at a CPU-sized scale (hidden 512,
  8 layers, 32 experts of width 256, 4 a token, vocabulary 32,000). LoRA then reaches every expert:
  qwenkit adapts each expert's gate/up/down (its per-expert layout); peft on transformers 5 adapts the
  stacked ``gate_up_proj`` and ``down_proj`` parameters (``target_parameters``; rank r per expert, gate
  and up sharing one A), so the trainable counts differ a little and are printed.

LoRA r=16, alpha=32, no dropout, on q,k,v,o,gate,up,down of every layer; AdamW; the same fixed token
batch; loss = mean token cross entropy over all tokens. Each side runs in its own fresh process (peak RSS
is per process), the two alternate, and each reports training tokens/s over the timed steps (after
warm-up steps) and its peak RSS above the process's RSS before the model was loaded.

    .venv/bin/python benchmarks/bench_finetune.py [--model smollm2|qwen3-moe] [--batch 4] [--seq-len 256]
        [--steps 4] [--rounds 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def rss_mib() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


MOE_SHAPE = dict(
    vocab_size=32000,
    hidden_size=512,
    intermediate_size=1536,
    moe_intermediate_size=256,
    num_experts=32,
    num_experts_per_tok=4,
    norm_topk_prob=True,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=4096,
)


def write_moe(path: Path, **shape: int) -> Path:
    """A random Qwen3-MoE checkpoint of ``MOE_SHAPE``, or of it with ``shape``'s sizes instead."""
    import torch
    import transformers

    torch.manual_seed(0)
    model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**{**MOE_SHAPE, **shape}))
    model.save_pretrained(path)
    return path


def worker(side: str, hf_dir: str, batch: int, seq_len: int, steps: int, warmup: int) -> dict:
    import json as json_

    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)
    torch.manual_seed(0)
    vocab = json_.loads((Path(hf_dir) / "config.json").read_text())["vocab_size"]
    moe = json_.loads((Path(hf_dir) / "config.json").read_text())["model_type"] == "qwen3_moe"
    ids = torch.randint(0, vocab, (batch, seq_len))
    base_rss = rss_mib()
    if side == "qwenkit":
        from qwenkit.checkpoint import load_model
        from qwenkit.default_model import default_model_path
        from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_parameters

        source = hf_dir if moe else default_model_path()
        model, _ = load_model(source, "float32", progress=False, dequantize=True)
        apply_lora(model, LoRAConfig(r=16, alpha=32, dropout=0.0, target_modules=tuple(TARGETS)))
        params = lora_parameters(model)

        def logits_of(x):
            return model(x)
    else:
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(
            hf_dir, dtype=torch.float32, attn_implementation="sdpa"
        )
        # MoE: the attention projections as modules, the stacked experts as parameters (naming the
        # experts' projections as modules too would make peft add its own converted pairs beside them)
        stacked = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"] if moe else None
        modules = TARGETS[:4] if moe else TARGETS
        config = peft.LoraConfig(
            r=16, lora_alpha=32, lora_dropout=0.0, target_modules=modules, target_parameters=stacked
        )
        model = peft.get_peft_model(model, config)
        params = [p for p in model.parameters() if p.requires_grad]

        def logits_of(x):
            return model(input_ids=x).logits

    model.train()
    opt = torch.optim.AdamW(params, lr=1e-4)
    times = []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        logits = logits_of(ids)
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step >= warmup:
            times.append(time.perf_counter() - t0)
    return {
        "side": side,
        "tokens_per_s": batch * seq_len * steps / sum(times),
        "peak_over_base_mib": peak_mib() - base_rss,
        "peak_rss_mib": peak_mib(),
        "trainable": sum(p.numel() for p in params),
        "final_loss": float(loss),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", choices=["smollm2", "qwen3-moe"], default="smollm2")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--hf-dir", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        print(json.dumps(worker(a.worker, a.hf_dir, a.batch, a.seq_len, a.steps, a.warmup)))
        return

    from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
    from qwenkit.default_model import default_model_path

    with tempfile.TemporaryDirectory() as tmp:
        if a.model == "qwen3-moe":
            hf_dir = write_moe(Path(tmp) / "qwen3-moe")
        else:
            hf_dir = convert_gguf_to_hf(default_model_path(), Path(tmp) / "smollm2-hf", dtype="float32")
        results: dict[str, list[dict]] = {"qwenkit": [], "transformers+peft": []}
        for _ in range(a.rounds):
            for side in ("qwenkit", "peft"):
                cmd = [sys.executable, __file__, "--worker", side, "--hf-dir", str(hf_dir)]
                cmd += ["--batch", str(a.batch), "--seq-len", str(a.seq_len), "--steps", str(a.steps)]
                cmd += ["--warmup", str(a.warmup)]
                out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
                r = json.loads(out.strip().splitlines()[-1])
                results["qwenkit" if side == "qwenkit" else "transformers+peft"].append(r)
    name = "a random Qwen3-MoE (32 experts, 4 a token)" if a.model == "qwen3-moe" else "SmolLM2-135M"
    print(f"LoRA r=16 on {name} float32, batch {a.batch} x {a.seq_len} tokens, {a.steps} timed steps")
    print("| | training tokens/s (best of rounds) | peak RSS over pre-load (MiB) | trainable params |")
    print("|---|---|---|---|")
    for name, rs in results.items():
        best = max(r["tokens_per_s"] for r in rs)
        mem = min(r["peak_over_base_mib"] for r in rs)
        print(f"| {name} | {best:,.2f} | {mem:,.0f} | {rs[0]['trainable']:,} |")


if __name__ == "__main__":
    main()
