"""Shared by the distributed worker and its single-process reference: same data, model and steps."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from qwenkit.finetune.checkpoints import save_checkpoint
from qwenkit.finetune.encode import IGNORE, Example
from qwenkit.finetune.run import prepare_model
from qwenkit.finetune.trainer import TrainArgs, Trainer

HERE = Path(__file__).parent


def torchrun(worker: str, args, cwd, nproc: int = 2) -> None:
    """Run ``worker`` (a script in this folder) in ``nproc`` processes under torchrun; fail on any error."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(HERE.parents[1] / "src"), str(HERE), str(HERE.parent)]),
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [str(HERE / worker), *map(str, args)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]


def examples(n: int = 8) -> list[Example]:
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        length = int(torch.randint(6, 16, (1,), generator=g))
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 3, (1,), generator=g))
        out.append(Example(ids, [IGNORE] * cut + ids[cut:]))
    return out


def args(method: str, strategy: str, batch_size: int, tp: int = 1, dtype: str = "float32") -> TrainArgs:
    return TrainArgs(
        method=method,
        dtype=dtype,
        strategy=strategy,
        tensor_parallel=tp,
        batch_size=batch_size,
        grad_accum=1,
        lr=1e-2,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        max_steps=4,
        progress=False,
        weight_decay=0.01,
    )


def build(model_dir, method, world, strategy, batch_size, dtype="float32"):
    a = args(method, strategy, batch_size, world.tp, dtype)
    prep = prepare_model(model_dir, a, world, 16)
    if method == "lora":  # non-zero B so every LoRA gradient is non-trivial
        g = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for n, p in prep.base.named_parameters():
                if "lora_B" in n:
                    full = torch.randn(tuple(p.shape), generator=g) * 0.05
                    p.copy_(_like(p, full))
    trainer = Trainer(prep.model, examples(), a, world, 0, prep.params)
    return trainer, prep


def _like(p, full):
    if hasattr(p, "device_mesh"):  # an FSDP (x TP) shard: lay the same full tensor out the same way
        from torch.distributed.tensor import Replicate, distribute_tensor

        whole = distribute_tensor(full, p.device_mesh, [Replicate()] * p.device_mesh.ndim)
        return whole.redistribute(p.device_mesh, p.placements)
    return full


def _full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def grads(trainer, prep) -> dict[str, torch.Tensor]:
    trainer.accumulate(0)
    out = {n: _full(p.grad).detach().clone() for n, p in prep.base.named_parameters() if p.requires_grad}
    trainer.optimizer.zero_grad(set_to_none=True)
    return out


def steps_and_weights(trainer, prep, n, ckpt_at=None, ckpt_dir=None) -> dict[str, torch.Tensor]:
    for _ in range(n):
        trainer.train_step()
        if ckpt_at is not None and trainer.step == ckpt_at:
            save_checkpoint(ckpt_dir, trainer, prep, [], trainer.args, trainer.world)
    return {n: _full(p).detach().clone() for n, p in prep.base.named_parameters() if p.requires_grad}
