"""Run under torchrun (2 processes: 1 replica x 2 tensor-parallel ranks) by test_fsdp_tensor_parallel.py.

usage: dist_tp_moe_worker.py MODEL_DIR OUT_DIR; writes OUT_DIR/moe-{full,lora}.pt (one step's gradients,
gathered whole, and the weights after 3 steps) for a mixture-of-experts model.
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
    world = init_world("cpu", tp=2)
    for method in ("full", "lora"):
        trainer, prep = build(model_dir, method, world, "fsdp", batch_size=4)
        result = {"grads": grads(trainer, prep)}
        result["weights"] = steps_and_weights(trainer, prep, 3)
        if world.is_main:
            torch.save(result, out / f"moe-{method}.pt")
    close_world(world)


if __name__ == "__main__":
    main()
