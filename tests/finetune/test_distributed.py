"""Distribution: 2 processes (gloo) compute the gradients 1 process computes on the same global batch, and
reach the same weights after several steps (DDP and FSDP2, LoRA and full with tied embeddings); a
checkpoint written by 2 processes resumes in 1 process to the weights of an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_common import build, grads, steps_and_weights, torchrun
from factories import hf_model, save_hf

from qwenkit.finetune.distributed import World
from qwenkit.finetune.run import load_checkpoint

HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path_factory.mktemp("tied") / "m")


@pytest.fixture(scope="module")
def two_procs(tied_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("two")
    torchrun("dist_worker.py", [tied_dir, out], out)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["ddp-lora", "fsdp-lora", "fsdp-full"])
def test_two_processes_equal_one(mode, tied_dir, two_procs):
    two = torch.load(two_procs / f"{mode}.pt", weights_only=True)

    strategy, method = mode.split("-")
    trainer, prep = build(tied_dir, method, World(), strategy, batch_size=4)  # same global batch of 4
    ref_grads = grads(trainer, prep)
    assert two["grads"].keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(two["grads"][n], g, rtol=1e-4, atol=1e-6)  # not scaled by world size
    ref_weights = steps_and_weights(trainer, prep, 3)
    for n, w in ref_weights.items():
        torch.testing.assert_close(two["weights"][n], w, rtol=1e-4, atol=1e-5)
    if method == "full":  # the tied embedding is one tensor, trained once
        assert "model.embed_tokens.weight" in ref_weights and "lm_head.weight" not in ref_weights

    if (
        mode == "fsdp-lora"
    ):  # resume the 2-process checkpoint (step 2) in 1 process: same weights as straight through
        t1, p1 = build(tied_dir, method, World(), "ddp", batch_size=4)
        load_checkpoint(two_procs / "ckpt", t1, p1, t1.args)
        assert t1.step == 2
        resumed = steps_and_weights(t1, p1, 1)
        for n, w in ref_weights.items():
            torch.testing.assert_close(resumed[n], w, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_finetune_command_with_two_processes(tiny_chat_model, tmp_path):
    """`qwenkit finetune --nproc 2 --strategy fsdp`: rank 0 writes the gathered adapter, equal to one
    process's adapter trained on the same global batches."""
    from safetensors.torch import load_file

    from qwenkit.finetune.run import finetune
    from qwenkit.finetune.trainer import TrainArgs

    data = tmp_path / "d.jsonl"
    rows = [
        {"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"It is {i}."}]}
        for i in range(4)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = ["--max-steps", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [
        sys.executable,
        "-m",
        "qwenkit.cli",
        "finetune",
        str(tiny_chat_model),
        str(data),
        str(tmp_path / "two"),
    ]
    cmd += ["--nproc", "2", "--strategy", "fsdp", "--batch-size", "1", *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    args = TrainArgs(max_steps=2, lr=1e-2, lora_r=4, lora_dropout=0.0, batch_size=2, progress=False)
    finetune(tiny_chat_model, data, tmp_path / "one", args)
    a = load_file(tmp_path / "two" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
    assert not (tmp_path / "two.training").exists()
