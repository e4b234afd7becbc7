"""Decode speed with LoRA adapters, in one run: served beside the fast base (``--adapter``, and several
chosen per request as ``serve --lora-modules`` does), finetune's LoRALinear layers over an unpacked base
(how ``--adapter`` ran before 2026-12-05), the base model alone, and transformers + peft (the usual way
to run an unmerged adapter in Python; Hugging Face checkpoints only).

Every adapter is rank ``--rank`` on all seven projections (the trainer's default targets; on a MoE model
every routed expert's three too) with random B.
Tokens/s are decode steps only (the prompt's forward excluded), greedy, aggregate over the batch; the
median of ``--rounds`` rounds, the configurations alternating within each round.

    .venv/bin/python benchmarks/bench_adapters.py [--models bundled,0.5b] [--rank 16] [--tokens 64]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
from bench_vs_llamacpp import write_anchor  # benchmarks/, beside this script
from shapes import QWEN3_30B_A3B, QWEN25_05B

from qwenkit.checkpoint import load_model
from qwenkit.default_model import default_model_path
from qwenkit.engine import Engine, SamplingParams
from qwenkit.finetune.adapter_io import load_adapter, save_adapter
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_modules

PROMPT_LEN = 16
BATCHES = (1, 8)


def make_adapter(model_path: Path, out: Path, rank: int, seed: int) -> Path:
    if (out / "adapter_model.safetensors").is_file():
        return out
    model, _ = load_model(model_path, "float32", progress=False, dequantize=True)
    config = LoRAConfig(r=rank, alpha=2 * rank, dropout=0.0)
    apply_lora(model, config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.01)
    out.mkdir(parents=True, exist_ok=True)
    save_adapter(model, out, config, str(model_path))
    return out


def prompts(batch: int) -> list[list[int]]:
    return [[(7 * b + i) % 1000 + 10 for i in range(PROMPT_LEN)] for b in range(batch)]


def engine_rate(model, batch: int, tokens: int, adapters: list[str | None]) -> float:
    """Decode tokens/s of ``batch`` requests together, request i through ``adapters[i % len]``."""
    engine = Engine(model, max_batch_size=batch)
    for i, ids in enumerate(prompts(batch)):
        adapter = adapters[i % len(adapters)]
        engine.add_request(
            ids, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True, adapter=adapter)
        )
    engine.step()  # every prompt, and the first token of each
    start, produced = time.perf_counter(), 0
    while engine.has_unfinished():
        produced += sum(len(o.new_token_ids) for o in engine.step())
    return produced / (time.perf_counter() - start)


def peft_rate(model, batch: int, tokens: int) -> float:
    """transformers' generate through a peft model: decode tokens/s (a 1-token generate subtracted)."""
    ids = torch.tensor(prompts(batch))
    mask = torch.ones_like(ids)

    def run(n: int) -> float:
        start = time.perf_counter()
        with torch.no_grad():
            model.generate(
                input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False
            )
        return time.perf_counter() - start

    return batch * (tokens - 1) / (run(tokens) - run(1))


def configurations(path: Path, adapters: list[Path], hf: bool) -> dict[str, tuple[object, list[str | None]]]:
    """Name -> (model or peft model, the adapter of each request)."""
    load = dict(dtype="auto", progress=False, fast_kernels=True)
    base, _ = load_model(path, **load)
    served, _ = load_model(path, adapter=adapters[0], **load)
    named = {f"a{i}": str(a) for i, a in enumerate(adapters)}
    many, _ = load_model(path, adapters=named, **load)
    wrapped, _ = load_model(path, dtype="auto", progress=False)  # what --adapter loaded before
    load_adapter(wrapped, adapters[0])
    wrapped.requires_grad_(False)
    out: dict[str, tuple[object, list[str | None]]] = {
        "base model, no adapter": (base, [None]),
        "served adapter (--adapter)": (served, [None]),
        f"{len(adapters)} served adapters, one per request": (many, list(named)),
        "LoRALinear layers (--adapter before)": (wrapped, [None]),
    }
    if hf:
        import peft
        import transformers

        model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16)
        out["transformers + peft"] = (peft.PeftModel.from_pretrained(model, adapters[0]).eval(), [None])
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument(
        "--models",
        default="bundled,0.5b",
        help="bundled (SmolLM2-135M Q4_1 GGUF), 0.5b (Qwen2.5-0.5B shape, bf16), moe (Qwen3-30B-A3B "
        "shape at --moe-layers layers, bf16; the adapter's seven projections include every routed "
        "expert's three; no peft row: transformers 5 stacks the experts, which peft adapts otherwise)",
    )
    ap.add_argument("--moe-layers", type=int, default=2)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--adapters", type=int, default=4, help="adapters served together")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--work", type=Path, default=Path.home() / ".cache/qwenkit/bench_vs_llamacpp")
    args = ap.parse_args()
    print(
        f"LoRA rank {args.rank} on all 7 projections; decode tokens/s, greedy, {args.tokens} tokens a "
        f"request; median of {args.rounds} rounds; {torch.get_num_threads()} threads"
    )
    print("| model | configuration | batch 1 | batch 8 | batch 1 vs base | batch 8 vs base |")
    print("|---|---|---:|---:|---:|---:|")
    for name in args.models.split(","):
        if name == "bundled":
            path, hf = default_model_path(), False
        elif name == "moe":
            path, hf = args.work / f"qwen3-30b-a3b-{args.moe_layers}layers-random", False
            if not (path / "config.json").exists():
                write_anchor(path, {**QWEN3_30B_A3B, "num_hidden_layers": args.moe_layers})
        else:
            path, hf = args.work / "qwen2.5-0.5b-random", True
            if not (path / "config.json").exists():
                write_anchor(path, QWEN25_05B)
        root = args.work / f"adapters-{name}-r{args.rank}"
        adapters = [make_adapter(path, root / f"a{i}", args.rank, seed=i) for i in range(args.adapters)]
        configs = configurations(path, adapters, hf)
        rates: dict[str, dict[int, list[float]]] = {c: {b: [] for b in BATCHES} for c in configs}
        for round_ in range(args.rounds):
            order = list(configs) if round_ % 2 == 0 else list(configs)[::-1]
            for config in order:
                model, rows = configs[config]
                for batch in BATCHES:
                    if config == "transformers + peft":
                        rate = peft_rate(model, batch, args.tokens)
                    else:
                        rate = engine_rate(model, batch, args.tokens, rows)
                    rates[config][batch].append(rate)
        base = {b: statistics.median(rates["base model, no adapter"][b]) for b in BATCHES}
        for config, by_batch in rates.items():
            med = {b: statistics.median(v) for b, v in by_batch.items()}
            print(
                f"| {name} | {config} | {med[1]:.1f} | {med[8]:.1f} | {med[1] / base[1]:.2f}x "
                f"| {med[8] / base[8]:.2f}x |",
                flush=True,
            )


if __name__ == "__main__":
    main()
