"""Training that starts from an existing adapter (``--adapter DIR``, SFT then DPO without a merge): the policy
starts as base + that adapter (DPO's reference too, so the first loss is log 2), OUT is an adapter of the
base of the same shape, resuming equals an uninterrupted run, and flags that disagree are refused."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from factories import interrupt_training_after, write_lora_adapter, write_tiny_chat_model
from test_dpo import logp, write_pairs

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as cli_main
from qwenkit.finetune.adapter_io import load_adapter
from qwenkit.finetune.dpo import DPOTrainer
from qwenkit.finetune.encode import IGNORE
from qwenkit.finetune.preference_data import load_pairs
from qwenkit.finetune.run import finetune, load_examples
from qwenkit.finetune.trainer import TrainArgs, Trainer, pad_batch
from qwenkit.generate import tokenizer_for

LOG_2 = float(torch.tensor(math.log(2)))  # -logsigmoid(0) in float32, where the loss is computed
IDS = torch.tensor([[9707, 11, 1879, 0, 3555, 151644, 77091]])


@pytest.fixture
def sft_adapter(tiny_chat_model, tmp_path):
    """An adapter of the chat model (rank 4, alpha 8, every projection), random and non-zero."""
    return write_lora_adapter(tiny_chat_model, tmp_path / "sft", seed=7, r=4, alpha=8.0, std=0.3)


def with_adapter(model_dir, adapter):
    """base + ``adapter`` as ``merge`` builds it (finetune's LoRALinear layers)."""
    model, _ = load_model(model_dir, "float32", progress=False)
    load_adapter(model, adapter)
    return model.eval()


def read_log(out) -> list[dict]:
    return [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_dpo_from_an_adapter_starts_at_base_plus_adapter(method, tiny_chat_model, sft_adapter, tmp_path):
    """The reference is base + the starting adapter (trl's ref_adapter_name), so step 1's loss is exactly
    log 2 with zero rewards; the trained OUT applied to the base (as generate and serving load it) computes
    the trained policy, and keeps the starting adapter's shape."""
    train, held = write_pairs(tmp_path / "t.jsonl", 0, 8), write_pairs(tmp_path / "h.jsonl", 100, 4)
    args = TrainArgs(
        method=method, max_steps=2, batch_size=4, lr=1e-2, lora_dropout=0.0, adapter=str(sft_adapter)
    )
    args.progress = False
    made: list[DPOTrainer] = []

    def make(*a, **kw):
        made.append(DPOTrainer(*a, **kw))
        return made[-1]

    out = tmp_path / "dpo"
    loader = functools.partial(load_pairs, max_len=args.max_len)
    finetune(tiny_chat_model, train, out, args, eval_path=held, make_trainer=make, load_data=loader)
    log = read_log(out)
    assert log[1]["loss"] == LOG_2  # exactly: the policy is its reference
    assert log[1]["rewards/chosen"] == 0.0 and log[1]["rewards/margins"] == 0.0
    assert log[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert log[2]["eval_rewards/margins"] > 1e-3  # it trained

    trainer = made[0]
    if method == "lora":  # the reference's log-probabilities are base + adapter's, pair by pair
        ref = with_adapter(tiny_chat_model, sft_adapter)
        base, _ = load_model(tiny_chat_model, "float32", progress=False)
        for p in trainer.examples:
            want = (logp(ref, p.chosen), logp(ref, p.rejected))
            assert trainer._ref[id(p)] == pytest.approx(want, abs=1e-4)
            assert abs(trainer._ref[id(p)][0] - logp(base, p.chosen)) > 1e-3  # not the base's
    policy = trainer.model.eval()
    with torch.no_grad():
        want = policy(IDS)
        served, _ = load_model(tiny_chat_model, "float32", progress=False, adapter=str(out))
        got = served(IDS)
    started = json.loads((sft_adapter / "adapter_config.json").read_text())
    written = json.loads((out / "adapter_config.json").read_text())
    for key in ("r", "lora_alpha", "use_rslora", "target_modules", "layers_to_transform"):
        assert written[key] == started[key], key
    if method == "lora":
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
        import peft
        import transformers

        hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
        with torch.no_grad():
            theirs = peft.PeftModel.from_pretrained(hf, out).eval()(IDS).logits
        torch.testing.assert_close(theirs, want, rtol=1e-4, atol=1e-4)
    recorded = json.loads((out / "training_args.json").read_text())
    assert recorded["adapter"] == str(sft_adapter.resolve()) and recorded["lora_r"] == 4


def sft_loss(model, examples) -> float:
    """Token cross entropy of ``model`` over every labelled token of ``examples``, as one batch."""
    ids, labels = pad_batch(examples, 0, "cpu")
    with torch.no_grad():
        logits = model(ids)[:, :-1].float()
    return float(F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE))


def write_chats(path, n: int):
    with open(path, "w") as f:
        for i in range(n):
            messages = [
                {"role": "user", "content": f"Count to {i}."},
                {"role": "assistant", "content": "1 2 3"},
            ]
            f.write(json.dumps({"messages": messages}) + "\n")
    return path


def test_finetune_from_an_adapter_continues_from_it(tiny_chat_model, sft_adapter, tmp_path):
    """SFT's first loss is base + adapter's loss on that batch (one batch of all examples), not the base's;
    LoRA options that agree with the adapter are accepted."""
    data = write_chats(tmp_path / "d.jsonl", 6)
    out = tmp_path / "o"
    argv = ["finetune", str(tiny_chat_model), str(data), str(out), "--adapter", str(sft_adapter)]
    argv += [
        "--max-steps",
        "1",
        "--batch-size",
        "6",
        "--lora-dropout",
        "0",
        "--lora-r",
        "4",
        "--lora-alpha",
        "8",
    ]
    assert cli_main([*argv, "--no-progress"]) == 0
    examples = load_examples(tokenizer_for(tiny_chat_model), data, TrainArgs(), None)[0]
    want = sft_loss(with_adapter(tiny_chat_model, sft_adapter), examples)
    base, _ = load_model(tiny_chat_model, "float32", progress=False)
    assert abs(want - sft_loss(base, examples)) > 1e-3  # the adapter matters to this loss
    assert read_log(out)[0]["loss"] == pytest.approx(want, rel=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4


def test_dpo_from_an_adapter_resumes_as_an_uninterrupted_run(
    tiny_chat_model, sft_adapter, tmp_path, monkeypatch, capsys
):
    """Resumed from a checkpoint, the reference is again base + the starting adapter (computed before the
    checkpoint's weights load): losses and the written adapter equal an uninterrupted run's. Resuming
    without the adapter is refused."""
    train = write_pairs(tmp_path / "t.jsonl", 0, 8)
    argv = [str(tiny_chat_model), str(train)]
    opts = ["--adapter", str(sft_adapter), "--max-steps", "4", "--batch-size", "4", "--lr", "1e-2"]
    opts += ["--save-every", "2", "--no-progress"]
    assert cli_main(["dpo", *argv, str(tmp_path / "whole"), *opts]) == 0
    real_step = interrupt_training_after(monkeypatch, 2)
    assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *opts]) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    without = [o for o in opts if o not in ("--adapter", str(sft_adapter))]
    assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *without, "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: --resume: adapter was {str(sft_adapter.resolve())!r} in "), err
    # other weights at the same path: DPO's reference would be another model (only the path was compared)
    weights = sft_adapter / "adapter_model.safetensors"
    original = weights.read_bytes()
    other = write_lora_adapter(tiny_chat_model, tmp_path / "other", seed=8, r=4, alpha=8.0, std=0.3)
    weights.write_bytes((other / "adapter_model.safetensors").read_bytes())
    assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *opts, "--resume"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith(f"error: --resume: the adapter {sft_adapter.resolve()} changed since the run in ")
    weights.write_bytes(original)
    assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *opts, "--resume"]) == 0
    whole, resumed = read_log(tmp_path / "whole"), read_log(tmp_path / "resumed")
    assert whole[0]["loss"] == LOG_2
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], rel=1e-6)
    a = with_adapter(tiny_chat_model, tmp_path / "whole")
    b = with_adapter(tiny_chat_model, tmp_path / "resumed")
    with torch.no_grad():
        torch.testing.assert_close(b(IDS), a(IDS), rtol=1e-5, atol=1e-5)
        assert (a(IDS) - with_adapter(tiny_chat_model, sft_adapter)(IDS)).abs().max() > 1e-3


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--lora-r", "8"], "--lora-r 8 disagrees with the adapter's r 4 ("),
        (["--lora-alpha", "16"], "--lora-alpha 16 disagrees with the adapter's lora_alpha 8 ("),
        (["--rslora"], "--rslora disagrees with the adapter's use_rslora false ("),
        (
            ["--target-modules", "q_proj"],
            "--target-modules q_proj disagrees with the adapter's target_modules ",
        ),
        (["--lora-layers", "2"], "--lora-layers 2 disagrees with the adapter's layers_to_transform all ("),
        (["--method", "full"], "--method full the whole model: merge the adapter first (qwenkit merge"),
    ],
)
def test_options_that_disagree_with_the_adapter_are_refused(
    extra, message, tiny_chat_model, sft_adapter, tmp_path, capsys
):
    out = tmp_path / "o"
    argv = ["dpo", str(tiny_chat_model), str(write_pairs(tmp_path / "p.jsonl", 0, 2)), str(out)]
    assert cli_main([*argv, "--adapter", str(sft_adapter), *extra, "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert "drop " in err[0] or "merge" in err[0]
    assert not out.exists()


def test_a_directory_that_is_no_adapter_of_this_model_is_refused(tiny_chat_model, tmp_path, capsys):
    data = write_chats(tmp_path / "d.jsonl", 2)
    out = tmp_path / "o"
    argv = ["finetune", str(tiny_chat_model), str(data), str(out), "--no-progress", "--adapter"]
    assert cli_main([*argv, str(tiny_chat_model)]) == 2
    assert capsys.readouterr().err == (
        f"error: {tiny_chat_model} is not an adapter directory: adapter_config.json not found\n"
    )
    assert cli_main([*argv[:-1], "--nproc", "2", "--adapter", str(tmp_path)]) == 2  # before any rank starts
    assert capsys.readouterr().err == (
        f"error: {tmp_path} is not an adapter directory: adapter_config.json not found\n"
    )
    wide = write_tiny_chat_model(tmp_path / "wide", hidden_size=64)
    other = write_lora_adapter(wide, tmp_path / "other", seed=1)
    capsys.readouterr()
    assert cli_main([*argv, str(other)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {other}: adapter for another model shape: "), err
    assert not out.exists()


def test_the_starting_adapter_is_never_replaced_by_out(tiny_chat_model, sft_adapter, tmp_path, capsys):
    """OUT in the starting adapter's place would lose it (as merge refuses its adapter's directory)."""
    before = (sft_adapter / "adapter_model.safetensors").read_bytes()
    data = write_chats(tmp_path / "d.jsonl", 2)
    argv = ["finetune", str(tiny_chat_model), str(data), str(sft_adapter), "--adapter", str(sft_adapter)]
    assert cli_main([*argv, "--overwrite", "--no-progress"]) == 2
    assert capsys.readouterr().err == (
        f"error: output {sft_adapter} would replace the source {sft_adapter}; choose another directory\n"
    )
    assert (sft_adapter / "adapter_model.safetensors").read_bytes() == before
