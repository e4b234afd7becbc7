"""Run under torchrun by test_distributed.py: one step's gradients and the weights after a few steps.

usage: dist_worker.py MODEL_DIR OUT_DIR; writes OUT_DIR/{ddp-lora,fsdp-lora,fsdp-full,fsdp-full-bfloat16}.pt
(the last: mixed precision, float32 masters gathered in bfloat16) and a checkpoint
at step 2 of the fsdp-lora run in OUT_DIR/ckpt (one launch for all modes: process start-up is the slow part).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import build, grads, steps_and_weights

from qwenkit.finetune.distributed import close_world, init_world


def main() -> None:
    model_dir, out = sys.argv[1], Path(sys.argv[2])
    torch.set_num_threads(1)
    world = init_world("cpu")
    for mode in ("ddp-lora", "fsdp-lora", "fsdp-full", "fsdp-full-bfloat16"):
        strategy, method, dtype = (*mode.split("-"), "float32")[:3]
        ckpt = out / "ckpt" if mode == "fsdp-lora" else None
        trainer, prep = build(model_dir, method, world, strategy, batch_size=2, dtype=dtype)
        result = {"grads": grads(trainer, prep)}
        result["weights"] = steps_and_weights(trainer, prep, 3, ckpt_at=2 if ckpt else None, ckpt_dir=ckpt)
        if world.is_main:
            torch.save(result, out / f"{mode}.pt")
    close_world(world)


if __name__ == "__main__":
    main()
