"""Training step time of a mixture-of-experts model: one process against 2 tensor-parallel ranks (gloo).

A random Qwen3-MoE (hidden 64, 4 layers, 32 experts of width 32, 4 a token, vocabulary 512: small, so
what the split itself costs shows), full fine-tuning and LoRA r=4 on every projection, a global batch of 4
random examples of 6-16 tokens, AdamW. Each configuration runs in fresh processes; the median of the
timed steps after one warm-up step is printed. On 2 cores, 2 ranks of 1 thread each cannot beat one
process on a model this small; the figure to watch is how much the split costs.

    .venv/bin/python benchmarks/bench_tp_training.py [--steps 4] [--experts 32]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def write_moe(path: Path, experts: int) -> Path:
    from bench_finetune import write_moe as write_shape  # the same random Qwen3-MoE, smaller

    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=160, moe_intermediate_size=32)
    shape |= dict(num_experts=experts, num_hidden_layers=4, num_attention_heads=4, head_dim=16)
    shape |= dict(norm_topk_prob=False)
    return write_shape(path, **shape)


def worker(model_dir: str, method: str, steps: int) -> None:
    import torch

    from qwenkit.finetune.distributed import World, close_world, init_world
    from qwenkit.finetune.encode import IGNORE, Example
    from qwenkit.finetune.run import prepare_model
    from qwenkit.finetune.trainer import TrainArgs, Trainer

    torch.set_num_threads(1)
    tp = int(os.environ.get("WORLD_SIZE", "1"))
    world = init_world("cpu", tp=tp) if tp > 1 else World()
    g = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(16):
        ids = torch.randint(0, 512, (int(torch.randint(6, 16, (1,), generator=g)),), generator=g).tolist()
        examples.append(Example(ids, [IGNORE, *ids[1:]]))
    args = TrainArgs(
        method=method,
        strategy="fsdp" if tp > 1 else "ddp",
        tensor_parallel=tp,
        batch_size=4,
        lora_r=4,
        lora_dropout=0.0,
        max_steps=steps + 1,
        progress=False,
    )
    prep = prepare_model(model_dir, args, world, 16)
    trainer = Trainer(prep.model, examples, args, world, 0, prep.params)
    times = []
    for _ in range(steps + 1):
        t0 = time.perf_counter()
        trainer.train_step()
        times.append(time.perf_counter() - t0)
    if world.is_main:
        print(f"RESULT {statistics.median(times[1:]) * 1000:.1f}")
    close_world(world)


def run(model_dir: Path, method: str, ranks: int, steps: int) -> float:
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1"}
    me = [str(Path(__file__).resolve()), "--worker", str(model_dir), method, "--steps", str(steps)]
    if ranks == 1:
        cmd = [sys.executable, *me]
    else:
        launch = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
        cmd = [sys.executable, *launch, *me]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return float(next(line for line in out.splitlines() if line.startswith("RESULT")).split()[1])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--experts", type=int, default=32)
    p.add_argument("--worker", nargs=2, metavar=("MODEL_DIR", "METHOD"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a.worker[0], a.worker[1], a.steps)
        return
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_moe(Path(tmp) / "moe", a.experts)
        print(f"random Qwen3-MoE, {a.experts} experts (4 a token), 4 layers; median ms per training step")
        print("| method | 1 process | 2 tensor-parallel ranks | ratio |")
        print("|---|---:|---:|---:|")
        for method in ("full", "lora"):
            one, two = run(model_dir, method, 1, a.steps), run(model_dir, method, 2, a.steps)
            print(f"| {method} | {one:.1f} | {two:.1f} | {two / one:.2f} |")


if __name__ == "__main__":
    main()
