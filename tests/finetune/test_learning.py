"""Learning for real: LoRA on the bundled SmolLM2 learns a behaviour it does not have (every answer opens
with "Ahoy!"): training loss and held-out loss fall, and greedy answers to held-out questions show it."""

from __future__ import annotations

import json

import pytest
from persona_data import HELD_OUT, MARK, TRAIN, write

from qwenkit.chat import chat
from qwenkit.default_model import default_model_path
from qwenkit.engine import SamplingParams
from qwenkit.finetune.run import finetune
from qwenkit.finetune.trainer import TrainArgs
from qwenkit.generate import LLM


@pytest.mark.slow
def test_lora_on_smollm2_learns_the_taught_behaviour(tmp_path):
    model = default_model_path()
    train, held_out = write(tmp_path / "train.jsonl", TRAIN), write(tmp_path / "eval.jsonl", HELD_OUT)
    args = TrainArgs(
        max_steps=10, lr=2e-3, batch_size=4, lora_r=8, lora_alpha=16, lora_dropout=0.0, progress=False
    )

    llm = LLM.load(model, dtype="float32", progress=False)
    greedy = SamplingParams(temperature=0, max_tokens=4)
    before = [chat(llm, [{"role": "user", "content": q}], greedy) for q, _ in HELD_OUT[:4]]
    assert not any(a.startswith(MARK) for a in before)  # the behaviour is new
    llm.close()

    out = finetune(model, train, tmp_path / "adapter", args, eval_path=held_out)
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in log if "loss" in r]
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    assert len(losses) == 10 and sum(losses[-3:]) / 3 < 0.5 * sum(losses[:3]) / 3
    assert evals[-1] < 0.5 * evals[0]

    tuned = LLM.load(model, dtype="float32", progress=False, adapter=out)
    after = [chat(tuned, [{"role": "user", "content": q}], greedy) for q, _ in HELD_OUT[:4]]
    tuned.close()
    assert all(a.startswith(MARK) for a in after), after
