"""Run under torchrun (4 processes: 2 replicas x 2 tensor-parallel ranks) by test_fsdp_tensor_parallel.py.

usage: dist_tp_worker.py FULL_MODEL_DIR LORA_MODEL_DIR OUT_DIR; writes OUT_DIR/{full,lora}.pt (one step's
gradients, gathered whole, and the weights after 3 steps) and each run's checkpoint at step 2 in
OUT_DIR/ckpt-{full,lora} (one launch for both: process start-up is the slow part).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from dist_common import build, grads, steps_and_weights

from qwenkit.finetune.distributed import close_world, init_world
from qwenkit.finetune.run import load_checkpoint


def main() -> None:
    model_dirs, out = {"full": sys.argv[1], "lora": sys.argv[2]}, Path(sys.argv[3])
    torch.set_num_threads(1)
    world = init_world("cpu", tp=2)
    for method, model_dir in model_dirs.items():
        trainer, prep = build(model_dir, method, world, "fsdp", batch_size=2)
        result = {"grads": grads(trainer, prep)}
        result["weights"] = steps_and_weights(trainer, prep, 3, ckpt_at=2, ckpt_dir=out / f"ckpt-{method}")
        if method == "full":  # resume the step-2 checkpoint in this layout too
            trainer, prep = build(model_dir, method, world, "fsdp", batch_size=2)
            load_checkpoint(out / "ckpt-full", trainer, prep, trainer.args)
            result["resumed"] = steps_and_weights(trainer, prep, 1)
        if world.is_main:
            torch.save(result, out / f"{method}.pt")
    close_world(world)


if __name__ == "__main__":
    main()
