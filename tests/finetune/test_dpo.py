"""DPO: loss and rewards equal a reference computed here (separate base model as the reference);
training raises the chosen-over-rejected margin on held-out pairs."""

from __future__ import annotations

import json

import torch
import torch.nn.functional as F

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as cli_main
from qwenkit.finetune.distributed import World
from qwenkit.finetune.dpo import DPOTrainer, load_pairs
from qwenkit.finetune.encode import IGNORE
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_modules, lora_parameters
from qwenkit.finetune.trainer import TrainArgs
from qwenkit.generate import tokenizer_for


def write_pairs(path, start, n):
    with open(path, "w") as f:
        for i in range(start, start + n):
            if i % 2:
                row = {
                    "prompt": f"Say something about {i}.",
                    "chosen": f"Gladly: {i} is fine.",
                    "rejected": "No.",
                }
            else:
                row = {
                    "messages": [{"role": "user", "content": f"Number {i}?"}],
                    "chosen": [{"role": "assistant", "content": f"Gladly: {i} is fine."}],
                    "rejected": [{"role": "assistant", "content": "No."}],
                }
            f.write(json.dumps(row) + "\n")
    return path


def test_dpo_loss_and_rewards_equal_reference(tiny_chat_model, tmp_path):
    tok = tokenizer_for(tiny_chat_model)
    pairs, _ = load_pairs(tok, write_pairs(tmp_path / "p.jsonl", 0, 3), max_len=256)
    # The completion is only the final reply + <|im_end|>.
    lab = pairs[0].chosen.labels
    assert tok.decode([t for t in lab if t != IGNORE]) == "Gladly: 0 is fine.<|im_end|>"

    model, _ = load_model(tiny_chat_model, "float32", progress=False)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * 0.2)
    trainer = DPOTrainer(
        model,
        pairs,
        TrainArgs(batch_size=3, progress=False),
        World(),
        151643,
        lora_parameters(model),
        beta=0.3,
    )
    loss, metrics, _ = trainer.batch_loss([0, 1, 2], normalizer=3.0)

    base, _ = load_model(tiny_chat_model, "float32", progress=False)

    def logp(m, seq):
        ids = torch.tensor([seq.ids])
        with torch.no_grad():
            lp = F.log_softmax(m(ids)[0, :-1].float(), -1)
        return sum(float(lp[t - 1, seq.ids[t]]) for t in range(1, len(seq.ids)) if seq.labels[t] != IGNORE)

    ref_losses, margins = [], []
    for p in pairs:
        rc = 0.3 * (logp(model, p.chosen) - logp(base, p.chosen))
        rr = 0.3 * (logp(model, p.rejected) - logp(base, p.rejected))
        ref_losses.append(-F.logsigmoid(torch.tensor(rc - rr)).item())
        margins.append(rc - rr)
    assert abs(loss.item() - sum(ref_losses) / 3) < 1e-4
    assert abs(metrics["rewards/margins"] - sum(margins)) < 1e-3
    assert abs(loss.item()) > 1e-3 and abs(sum(margins)) > 1e-3  # the adapter makes a difference


def test_dpo_command_raises_the_held_out_margin(tiny_chat_model, tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", 0, 16)
    held = write_pairs(tmp_path / "held.jsonl", 100, 4)
    out = tmp_path / "dpo"
    rc = cli_main(
        [
            "dpo",
            str(tiny_chat_model),
            str(train),
            str(out),
            "--eval-data",
            str(held),
            "--max-steps",
            "8",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--lora-r",
            "4",
            "--lora-dropout",
            "0",
            "--beta",
            "0.5",
            "--no-progress",
        ]
    )
    assert rc == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert evals[0]["eval_rewards/margins"] == 0.0  # adapter starts as the identity: policy == reference
    assert evals[-1]["eval_rewards/margins"] > 1.0 and evals[-1]["eval_rewards/accuracies"] == 1.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    assert all(
        k in log[1] for k in ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen")
    )
    assert (out / "adapter_model.safetensors").is_file()
