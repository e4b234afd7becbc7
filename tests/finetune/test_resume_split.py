"""--resume with the same global batch split another way (--batch-size x --grad-accum x processes): the
same batches, but LoRA dropout draws its masks per micro-batch, so with dropout the weights then leave an
uninterrupted run's and a note says so; without dropout they stay on it (to float rounding)."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from factories import interrupt_training_after
from safetensors.torch import load_file
from test_train import chat_data

from qwenkit.finetune.run import finetune
from qwenkit.finetune.trainer import TrainArgs, Trainer

ARGS = TrainArgs(
    max_steps=4, batch_size=2, grad_accum=2, lr=5e-3, lora_r=4, lora_alpha=8, save_every=2, progress=False
)


def resumed_in_another_split(model, data, out, args, monkeypatch, capsys) -> str:
    """Train ``args`` to step 2 (interrupted), resume with the batch split as 1 x 4; returns stderr."""
    real_step = interrupt_training_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, data, out, args)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    finetune(model, data, out, dataclasses.replace(args, batch_size=1, grad_accum=4), resume=True)
    return capsys.readouterr().err


def max_diff(a, b) -> float:
    x, y = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    return max(float((x[k] - y[k]).abs().max()) for k in x)


@pytest.mark.parametrize("dropout", [0.1, 0.0])
def test_resume_in_another_split_notes_that_dropout_draws_other_masks(
    dropout, tiny_chat_model, tmp_path, monkeypatch, capsys
):
    data = chat_data(tmp_path / "d.jsonl")
    args = dataclasses.replace(ARGS, lora_dropout=dropout)
    whole = finetune(tiny_chat_model, data, tmp_path / "whole", args)
    err = resumed_in_another_split(tiny_chat_model, data, tmp_path / "resumed", args, monkeypatch, capsys)
    diff = max_diff(whole, tmp_path / "resumed")
    note = (
        "note: --resume splits the global batch of 4 as --batch-size 1 x --grad-accum 4 x 1 replica(s), the "
        "checkpoint's run as 2 x 2 x 1: the same batches, but LoRA dropout (0.1) draws its masks per "
        "micro-batch, so from here on the weights differ from an uninterrupted run's (resume in the same "
        "split to continue it exactly)\n"
    )
    if dropout:
        assert note in err and diff > 1e-5
    else:
        assert "note: --resume" not in err and diff < 1e-6
    assert torch.tensor(diff).isfinite()


def test_the_running_log_restarts_at_the_checkpoint_on_resume(tiny_chat_model, tmp_path, monkeypatch):
    """OUT.training/log.jsonl, the log to watch while training, holds each step once after a resume: the
    steps past the checkpoint that the interrupted run logged are run again, and were logged twice."""
    from qwenkit.finetune.run import work_dir

    data, out = chat_data(tmp_path / "d.jsonl"), tmp_path / "out"
    args = dataclasses.replace(ARGS, max_steps=6, eval_every=0)
    real_step = interrupt_training_after(monkeypatch, 3)  # the checkpoint is step 2's; step 3 is lost
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_chat_model, data, out, args, eval_path=data)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    interrupt_training_after(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_chat_model, data, out, args, eval_path=data, resume=True)
    log = [json.loads(line) for line in (work_dir(out) / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 4, 5]  # once [0, 1, 2, 3, 3, 4, 5]
    assert "eval_loss" in log[0] and all("loss" in r for r in log[1:])


def test_resume_past_the_steps_asked_for_is_refused(tiny_chat_model, tmp_path, monkeypatch):
    """A checkpoint past --max-steps once finished at once: OUT held its 4 steps, its training_args.json
    said max_steps 3."""
    from qwenkit.errors import QwenkitError
    from qwenkit.finetune.run import work_dir

    data, out = chat_data(tmp_path / "d.jsonl"), tmp_path / "out"
    args = dataclasses.replace(ARGS, max_steps=6)
    real_step = interrupt_training_after(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_chat_model, data, out, args)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    step4 = work_dir(out) / "checkpoints" / "step-4"
    with pytest.raises(QwenkitError) as e:
        finetune(tiny_chat_model, data, out, dataclasses.replace(args, max_steps=3), resume=True)
    assert str(e.value) == (
        f"--resume: {step4} is at step 4, past the 3 steps of this run (--max-steps, --epochs); ask for 4 "
        f"or more, or use the adapter the checkpoint holds ({step4})"
    )
    assert not out.exists() and step4.is_dir()
    finetune(tiny_chat_model, data, out, dataclasses.replace(args, max_steps=4), resume=True)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]


def test_resume_with_no_checkpoint_is_refused_before_the_model_loads(tiny_chat_model, tmp_path, monkeypatch):
    """--resume into an OUT with no checkpoint (a mistyped OUT, a run stopped before its first save) once
    loaded the model and, for dpo, scored every pair's reference before saying so."""
    import qwenkit.finetune.run as run
    from qwenkit.errors import QwenkitError

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(run, "prepare_model", no_loading)
    data, out = chat_data(tmp_path / "d.jsonl"), tmp_path / "typo"
    with pytest.raises(QwenkitError) as e:
        finetune(tiny_chat_model, data, out, ARGS, resume=True)
    assert str(e.value) == f"--resume: no checkpoint in {out}.training/checkpoints"
    assert not out.exists() and not run.work_dir(out).exists()
