"""Full fine-tuning in bfloat16 is mixed precision: float32 master weights and AdamW state, the forward and
backward in bfloat16 (transformers' Trainer --bf16, DeepSpeed bf16). Updating bfloat16 weights in place
rounded most small steps away: this tiny Qwen2 at lr 1e-5 changed 15% of its weights in 3 steps, all
but one in float32. The written model is bfloat16 (what users load); checkpoints keep the masters."""

from __future__ import annotations

import json
import math

import pytest
import torch
from factories import interrupt_training_after, write_tiny_chat_model
from safetensors import safe_open
from test_dpo import assert_started_at_the_reference_and_trained, write_pairs
from test_train import chat_data

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as cli_main
from qwenkit.config import ModelConfig
from qwenkit.errors import QwenkitError
from qwenkit.finetune.checkpoints import STATE_FILE
from qwenkit.finetune.estimate import estimate
from qwenkit.finetune.run import finetune, work_dir
from qwenkit.finetune.trainer import TrainArgs, Trainer
from qwenkit.memory import weight_bytes


@pytest.fixture(scope="module")
def qwen2_chat(tmp_path_factory):
    """A tiny random Qwen2 (tied embeddings, as Qwen2.5's small models) with the real Qwen3 tokenizer."""
    return write_tiny_chat_model(tmp_path_factory.mktemp("q2") / "tiny-qwen2", family="qwen2")


def train(model, data, out, dtype, resume=False, **kw):
    """Train 3 full steps at lr 1e-5; returns (OUT, the trainer)."""
    args = TrainArgs(method="full", dtype=dtype, max_steps=3, batch_size=2, lr=1e-5, progress=False, **kw)
    made: list[Trainer] = []
    result = finetune(
        model, data, out, args, resume=resume, make_trainer=lambda *a: made.append(Trainer(*a)) or made[-1]
    )
    return result, made[0]


def masters(trainer: Trainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def losses(out) -> list[float]:
    return [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines()]


def changed(trained: dict[str, torch.Tensor], base: dict[str, torch.Tensor]) -> float:
    n = sum(int((trained[k] != base[k].to(trained[k].dtype)).sum()) for k in trained)
    return n / sum(t.numel() for t in trained.values())


def test_bfloat16_full_training_keeps_every_update_in_float32_masters(qwen2_chat, tmp_path):
    data = chat_data(tmp_path / "d.jsonl", n=6)
    base = dict(load_model(qwen2_chat, "float32", progress=False)[0].named_parameters())
    out32, t32 = train(qwen2_chat, data, tmp_path / "f32", "float32")
    out16, t16 = train(qwen2_chat, data, tmp_path / "bf16", "bfloat16")

    # The masters and AdamW's moments are float32; the forward ran in bfloat16.
    assert t16.compute_dtype == torch.bfloat16 and t32.compute_dtype is None
    assert {p.dtype for p in t16.params} == {torch.float32}
    assert {s["exp_avg_sq"].dtype for s in t16.optimizer.state.values()} == {torch.float32}
    w32, w16 = masters(t32), masters(t16)
    f32, f16 = changed(w32, base), changed(w16, base)
    assert f32 > 0.99 and abs(f16 - f32) < 0.02, (f16, f32)  # in place in bfloat16 (before): 0.15
    # An early AdamW step is about lr whatever the gradient's rounding: the masters moved as float32's did
    # (3 steps of 1e-5 each at most), apart from weights whose tiny gradients bfloat16 got another sign of.
    moved = torch.cat([(w16[k] - w32[k]).abs().flatten() for k in w16])
    assert float(moved.max()) <= 6.1e-5 and float((moved < 1e-7).float().mean()) > 0.8

    l32, l16 = losses(out32), losses(out16)
    assert len(l16) == 3 and all(abs(a - b) < 0.02 * a for a, b in zip(l16, l32, strict=True)), (l16, l32)
    assert l16 != l32  # computed in bfloat16, not float32

    # What users load: bfloat16 safetensors holding the masters rounded to bfloat16.
    with safe_open(out16 / "model.safetensors", "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is no dict)
    assert len(saved) == len(w16) and {t.dtype for t in saved.values()} == {torch.bfloat16}
    for k, t in saved.items():
        assert torch.equal(t, w16[k].to(torch.bfloat16)), k
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype="auto")
    assert hf.dtype == torch.bfloat16
    hf_weights = dict(hf.named_parameters())
    assert torch.equal(hf.get_output_embeddings().weight, saved["model.embed_tokens.weight"])
    assert torch.equal(
        hf_weights["model.layers.0.mlp.down_proj.weight"], saved["model.layers.0.mlp.down_proj.weight"]
    )


def test_resumed_bfloat16_run_reaches_the_masters_of_an_uninterrupted_one(qwen2_chat, tmp_path, monkeypatch):
    """A checkpoint keeps the float32 masters (rounding them to bfloat16 would lose the updates the run has
    made since the last whole bfloat16 step), so a resumed run ends on the same masters, bit for bit."""
    data = chat_data(tmp_path / "d.jsonl", n=6)
    straight, t1 = train(qwen2_chat, data, tmp_path / "straight", "bfloat16", save_every=2)
    real_step = interrupt_training_after(monkeypatch, 2)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        train(qwen2_chat, data, out, "bfloat16", save_every=1)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    state = torch.load(work_dir(out) / "checkpoints" / "step-2" / STATE_FILE, weights_only=True)
    assert {t.dtype for t in state["model"].values()} == {torch.float32}
    _, t2 = train(qwen2_chat, data, out, "bfloat16", resume=True, save_every=1)
    a, b = masters(t1), masters(t2)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert losses(straight) == losses(out)
    with (
        safe_open(out / "model.safetensors", "pt") as f,
        safe_open(straight / "model.safetensors", "pt") as g,
    ):
        assert all(torch.equal(f.get_tensor(k), g.get_tensor(k)) for k in f.keys())  # noqa: SIM118


def test_the_memory_plan_counts_float32_masters(qwen2_chat):
    """Mixed precision holds float32 weights, float32 grads, two float32 moments and the bfloat16 copy the
        forward computes with: 18 bytes a parameter, against 16 for float32 training (no copy); activations
    are bfloat16's, half of float32's (the float32 logits aside)."""
    config = ModelConfig.from_hf(json.loads((qwen2_chat / "config.json").read_text()))
    n = config.num_parameters
    mixed = estimate(config, torch.bfloat16, "full", n, 2, 64, False, masters=True)
    plain = estimate(config, torch.float32, "full", n, 2, 64, False)
    assert mixed.weights == plain.weights == weight_bytes(config, torch.float32) == 4 * n
    assert (mixed.trainable_state, plain.trainable_state) == (14 * n, 12 * n)
    logits = 2 * 64 * config.vocab_size * 4 * 3  # float32 in both
    assert mixed.activations - logits == (plain.activations - logits) // 2
    row = mixed.table().splitlines()[0].split()
    assert row[:3] == ["weights", "(float32", "masters)"] and row[3] == f"{4 * n / 2**30:.2f}"


def test_float16_full_training_is_refused_in_one_line(qwen2_chat, tmp_path):
    """float16 needs loss scaling (a GradScaler), which is not implemented: refused before any weight
    loads, nothing written."""
    data = chat_data(tmp_path / "d.jsonl", n=2)
    args = TrainArgs(method="full", dtype="float16", max_steps=1, batch_size=2, progress=False)
    with pytest.raises(QwenkitError) as e:
        finetune(qwen2_chat, data, tmp_path / "o", args)
    assert str(e.value) == (
        "--method full in float16 (--dtype float16) needs loss scaling, which qwenkit does not do; use "
        "--dtype bfloat16 (float32 master weights, bfloat16 compute) or float32"
    )
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


def test_lora_on_a_bfloat16_base_is_unchanged(qwen2_chat, tmp_path):
    """LoRA keeps its float32 adapters over the bfloat16 base and no autocast: the base is not upcast."""
    data = chat_data(tmp_path / "d.jsonl", n=2)
    args = TrainArgs(dtype="bfloat16", max_steps=1, batch_size=2, lora_r=4, progress=False)
    made: list[Trainer] = []
    finetune(
        qwen2_chat, data, tmp_path / "o", args, make_trainer=lambda *a: made.append(Trainer(*a)) or made[-1]
    )
    dtypes = {n: p.dtype for n, p in made[0].model.named_parameters()}
    assert made[0].compute_dtype is None
    assert {d for n, d in dtypes.items() if "lora_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lora_" not in n} == {torch.bfloat16}
    assert math.isfinite(losses(tmp_path / "o")[0])


def test_full_dpo_in_bfloat16_scores_its_reference_as_it_trains(tiny_chat_model, tmp_path):
    """--method full --dtype bfloat16 trains float32 masters under bfloat16 autocast; the reference and
    held-out passes run the same way, so at step 0 the policy is its reference: every pair's loss is log 2
    and the margins are zero (a float32 reference against a bfloat16 policy is off by bfloat16's rounding)."""
    out = tmp_path / "f"
    argv = ["dpo", str(tiny_chat_model), str(write_pairs(tmp_path / "t.jsonl", 0, 8)), str(out), "--method"]
    argv += ["full", "--dtype", "bfloat16", "--eval-data", str(write_pairs(tmp_path / "h.jsonl", 100, 4))]
    assert cli_main([*argv, "--max-steps", "2", "--batch-size", "4", "--lr", "1e-4", "--no-progress"]) == 0
    assert_started_at_the_reference_and_trained(out)
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
