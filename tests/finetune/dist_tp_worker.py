"""Run under torchrun by test_fsdp_tensor_parallel.py: as many processes as given, laid out as replicas x 2
tensor-parallel ranks.

usage: dist_tp_worker.py OUT_DIR PREFIX METHOD=MODEL_DIR [METHOD=MODEL_DIR ...] [--checkpoints]; writes
OUT_DIR/PREFIX{method}.pt (one step's gradients, gathered whole, and the weights after 3 steps) for each
method (full, lora); with --checkpoints also each run's checkpoint at step 2 in OUT_DIR/ckpt-{method}, and
for full the weights after resuming it. One launch for all: process start-up is the slow part.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import build, grads, steps_and_weights

from qwenkit.finetune.checkpoints import load_checkpoint
from qwenkit.finetune.distributed import close_world, init_world


def main() -> None:
    out, prefix = Path(sys.argv[1]), sys.argv[2]
    checkpoints = "--checkpoints" in sys.argv
    runs = dict(a.split("=", 1) for a in sys.argv[3:] if a != "--checkpoints")
    torch.set_num_threads(1)
    world = init_world("cpu", tp=2)
    batch_size = 4 // world.dp_size  # a global batch of 4, however many replicas
    for method, model_dir in runs.items():
        ckpt = out / f"ckpt-{method}" if checkpoints else None
        trainer, prep = build(model_dir, method, world, "fsdp", batch_size=batch_size)
        result = {"grads": grads(trainer, prep)}
        result["weights"] = steps_and_weights(trainer, prep, 3, ckpt_at=2 if ckpt else None, ckpt_dir=ckpt)
        if ckpt and method == "full":  # resume the step-2 checkpoint in this layout too
            trainer, prep = build(model_dir, method, world, "fsdp", batch_size=batch_size)
            load_checkpoint(ckpt, trainer, prep, trainer.args)
            result["resumed"] = steps_and_weights(trainer, prep, 1)
        if world.is_main:
            torch.save(result, out / f"{prefix}{method}.pt")
    close_world(world)


if __name__ == "__main__":
    main()
