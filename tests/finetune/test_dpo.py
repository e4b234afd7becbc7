"""DPO: loss and rewards equal a reference computed here (separate base model as the reference);
training raises the chosen-over-rejected margin on held-out pairs."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
import torch.nn.functional as F
from factories import V1_TINY, interrupt_training_after, randomize_lora, v1_state_dict, write_v1_checkpoint

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as cli_main
from qwenkit.finetune.distributed import World
from qwenkit.finetune.dpo import DPOTrainer
from qwenkit.finetune.encode import IGNORE
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_parameters
from qwenkit.finetune.preference_data import load_pairs
from qwenkit.finetune.run import finetune
from qwenkit.finetune.trainer import TrainArgs
from qwenkit.generate import tokenizer_for


def assert_started_at_the_reference_and_trained(out) -> None:
    """A two-step DPO run with a held-out set (``out``'s log.jsonl): the policy started exactly at its
    reference (losses log 2, margins 0, held-out too), and the run moved it."""
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log[0]["eval_loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[0]["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert log[1]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert log[1]["rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    assert log[2]["eval_rewards/margins"] > 1e-3  # it did train


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


def logp(model, seq) -> float:
    """A completion's summed log-probability, one token at a time (no batching, no padding)."""
    ids = torch.tensor([seq.ids])
    with torch.no_grad():
        lp = F.log_softmax(model(ids)[0, :-1].float(), -1)
    return sum(float(lp[t - 1, seq.ids[t]]) for t in range(1, len(seq.ids)) if seq.labels[t] != IGNORE)


@pytest.fixture
def three_pairs(tiny_chat_model, tmp_path):
    """The chat model's encoding of write_pairs' first three pairs (both of its record formats)."""
    return load_pairs(tokenizer_for(tiny_chat_model), write_pairs(tmp_path / "p.jsonl", 0, 3), max_len=256)[0]


def ready_trainer(model, pairs, args: TrainArgs, params, **loss) -> DPOTrainer:
    """A DPOTrainer on one process (the chat model's pad id), its reference computed as training does."""
    trainer = DPOTrainer(model, pairs, args, World(), 151643, params, **loss)
    trainer.before_training(None)
    return trainer


def reference_batch(model, base, pairs, loss_type: str, beta: float, eps: float) -> tuple[float, float]:
    """trl's loss of a batch of pairs (the mean of ``reference_loss``) and its summed reward margins, from
    each pair's summed log-probabilities under the policy ``model`` and the reference ``base``."""
    losses, margins = [], []
    for p in pairs:
        pc, pr, rc, rr = (logp(m, c) for m in (model, base) for c in (p.chosen, p.rejected))
        losses.append(
            reference_loss(loss_type, beta, eps, pc, pr, rc, rr, p.chosen.targets, p.rejected.targets)
        )
        margins.append(beta * ((pc - rc) - (pr - rr)))
    return sum(losses) / len(pairs), sum(margins)


def run_dpo(model_dir, data, out, args: TrainArgs, eval_path=None, **loss):
    """qwenkit's DPO in this process, as `qwenkit dpo` runs it (loss: DPOTrainer's beta, loss_type...)."""
    return finetune(
        model_dir,
        data,
        out,
        args,
        eval_path=eval_path,
        make_trainer=functools.partial(DPOTrainer, **loss),
        load_data=lambda tok, path: load_pairs(tok, path, args.max_len),
    )


def reference_free_batch_loss(loss_type: str, beta: float, gamma: float, rows) -> float:
    """SimPO's and ORPO's loss of a batch of (pc, pr, n_c, n_r), from trl's CPO (cpo_alpha 0) and ORPO code
    written out: mean token log-probabilities; ORPO adds the chosen tokens' mean cross entropy."""
    t = torch.tensor(rows, dtype=torch.float64)
    avg_c, avg_r = t[:, 0] / t[:, 2], t[:, 1] / t[:, 3]
    if loss_type == "simpo":
        return float((-F.logsigmoid(beta * (avg_c - avg_r) - gamma)).mean())
    odds = (avg_c - avg_r) - (torch.log(1 - torch.exp(avg_c)) - torch.log(1 - torch.exp(avg_r)))
    return float(-t[:, 0].sum() / t[:, 2].sum() - (beta * F.logsigmoid(odds)).mean())


def reference_loss(loss_type: str, beta: float, eps: float, pc, pr, rc, rr, n_c: int, n_r: int) -> float:
    """trl 1.16's per-pair losses, written out here from their formulas."""
    d = torch.tensor((pc - rc) - (pr - rr), dtype=torch.float64)
    if loss_type == "sigmoid":
        return float(-F.logsigmoid(beta * d))
    if loss_type == "hinge":
        return float(torch.relu(1 - beta * d))
    if loss_type == "ipo":
        return float(((pc - rc) / n_c - (pr - rr) / n_r - 1 / (2 * beta)) ** 2)
    clean, flipped = -(1 - eps) * F.logsigmoid(beta * d), -eps * F.logsigmoid(-beta * d)
    return float((clean - flipped) / (1 - 2 * eps))


@pytest.mark.parametrize(
    ("loss_type", "eps"),
    [("sigmoid", 0.0), ("hinge", 0.0), ("ipo", 0.0), ("robust", 0.2), ("simpo", 0.0), ("orpo", 0.0)],
)
def test_dpo_loss_and_rewards_equal_reference(loss_type, eps, tiny_chat_model, three_pairs):
    tok, pairs = tokenizer_for(tiny_chat_model), three_pairs
    # The completion is only the final reply + <|im_end|> + the newline after it (trl's).
    lab = pairs[0].chosen.labels
    assert tok.decode([t for t in lab if t != IGNORE]) == "Gladly: 0 is fine.<|im_end|>\n"
    assert pairs[0].chosen.targets == len(tok.encode("Gladly: 0 is fine.")) + 2

    model, _ = load_model(tiny_chat_model, "float32", progress=False)
    torch.manual_seed(0)  # lora_A's init: the same whichever tests ran before in this process
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    randomize_lora(model, 0, 0.2)
    args = TrainArgs(batch_size=3, progress=False)
    loss_settings = dict(beta=0.3, loss_type=loss_type, label_smoothing=eps)
    trainer = ready_trainer(model, pairs, args, lora_parameters(model), **loss_settings)
    loss, metrics, _ = trainer.batch_loss([0, 1, 2], normalizer=3.0)

    if loss_type in ("simpo", "orpo"):  # no reference: rewards are beta x mean token log-probabilities
        rows = [
            (logp(model, p.chosen), logp(model, p.rejected), p.chosen.targets, p.rejected.targets)
            for p in pairs
        ]
        want = reference_free_batch_loss(loss_type, 0.3, 0.5, rows)
        assert trainer._ref == {}  # and none was computed
        assert loss.item() == pytest.approx(want, abs=1e-5)
        margins = [0.3 * (pc / n_c - pr / n_r) for pc, pr, n_c, n_r in rows]
        assert metrics["rewards/margins"] == pytest.approx(sum(margins), abs=1e-4)
        return
    base, _ = load_model(tiny_chat_model, "float32", progress=False)
    want, margins = reference_batch(model, base, pairs, loss_type, 0.3, eps)
    assert abs(loss.item() - want) < 1e-4
    assert abs(metrics["rewards/margins"] - margins) < 1e-3
    assert abs(loss.item()) > 1e-3 and abs(margins) > 1e-3  # the adapter makes a difference


def test_sft_weight_adds_the_chosen_replies_cross_entropy(tiny_chat_model, three_pairs):
    """RPO: the DPO loss plus w x the chosen replies' mean token cross entropy over the batch (trl's
    loss_type ["sigmoid", "sft"] with loss_weights [1, w])."""
    pairs = three_pairs
    model, _ = load_model(tiny_chat_model, "float32", progress=False)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    args = TrainArgs(batch_size=3, progress=False)
    trainer = ready_trainer(model, pairs, args, lora_parameters(model), beta=0.3, sft_weight=0.7)
    loss, _, _ = trainer.batch_loss([0, 1, 2], normalizer=3.0)
    chosen = [logp(model, p.chosen) for p in pairs]
    nll = -sum(chosen) / sum(p.chosen.targets for p in pairs)
    assert loss.item() == pytest.approx(math.log(2) + 0.7 * nll, abs=1e-5)  # the adapter starts at zero
    assert nll > 1.0


def test_full_dpo_keeps_the_weights_before_training_as_its_reference(tiny_chat_model, three_pairs):
    """--method full: after an optimizer step the reference is still the model as it was before training
    (computed up front), not the weights being trained."""
    pairs = three_pairs
    model, _ = load_model(tiny_chat_model, "float32", progress=False)
    model.requires_grad_(True)
    args = TrainArgs(method="full", batch_size=3, lr=1e-3, progress=False)
    trainer = ready_trainer(model, pairs, args, list(model.parameters()), beta=0.3)
    first = trainer.train_step()
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 0
    loss, metrics, _ = trainer.batch_loss([0, 1, 2], normalizer=3.0)

    base, _ = load_model(tiny_chat_model, "float32", progress=False)
    want, margins = reference_batch(model, base, pairs, "sigmoid", 0.3, 0.0)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert metrics["rewards/margins"] == pytest.approx(margins, abs=1e-4)
    assert margins > 1e-3  # the step moved the policy towards the chosen replies


def test_dpo_command_raises_the_held_out_margin(tiny_chat_model, tmp_path):
    train = write_pairs(tmp_path / "train.jsonl", 0, 16)
    held = write_pairs(tmp_path / "held.jsonl", 100, 4)
    out = tmp_path / "dpo"
    argv = ["dpo", str(tiny_chat_model), str(train), str(out), "--eval-data", str(held), "--max-steps", "8"]
    argv += ["--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--beta", "0.5"]
    assert cli_main([*argv, "--no-progress"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert evals[0]["eval_rewards/margins"] == 0.0  # adapter starts as the identity: policy == reference
    assert evals[-1]["eval_rewards/margins"] > 1.0 and evals[-1]["eval_rewards/accuracies"] == 1.0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    metrics = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "logps/chosen")
    assert all(k in log[1] for k in metrics)
    assert (out / "adapter_model.safetensors").is_file()


KIND_HI = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi?"}]
HELLO = {"role": "assistant", "content": "Hello!"}
GO_AWAY = {"role": "assistant", "content": "Go away."}
SAME_PAIR = [
    {"prompt": KIND_HI, "chosen": [HELLO], "rejected": [GO_AWAY]},  # trl's explicit prompt, as messages
    {"chosen": [*KIND_HI, HELLO], "rejected": [*KIND_HI, GO_AWAY]},  # trl's implicit prompt: two chats
    # LLaMA-Factory, alpaca style
    {"system": "Be kind.", "instruction": "Hi?", "input": "", "chosen": "Hello!", "rejected": "Go away."},
    # LLaMA-Factory, ShareGPT style
    {
        "system": "Be kind.",
        "conversations": [{"from": "human", "value": "Hi?"}],
        "chosen": {"from": "gpt", "value": "Hello!"},
        "rejected": {"from": "gpt", "value": "Go away."},
    },
]


def test_every_preference_format_encodes_the_same_pair(tiny_chat_model):
    from qwenkit.finetune.preference_data import encode_pair

    tok = tokenizer_for(tiny_chat_model)
    encoded = [encode_pair(tok, f"r{i}", obj, 256) for i, obj in enumerate(SAME_PAIR)]
    want = encoded[0]
    chosen = tok.decode(want.chosen.ids)
    assert chosen.startswith("<|im_start|>system\nBe kind.<|im_end|>\n<|im_start|>user\nHi?")
    assert tok.decode([t for t in want.rejected.labels if t != IGNORE]) == "Go away.<|im_end|>\n"
    for got in encoded[1:]:
        assert (got.chosen, got.rejected) == (want.chosen, want.rejected)
    # alpaca: instruction and input joined by a newline, after the history's turns
    alpaca = dict(instruction="Sum", input="2 and 3", history=[["Hi", "Hello"]], chosen="5", rejected="6")
    messages = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Sum\n2 and 3"},
        ],
        "chosen": "5",
        "rejected": "6",
    }
    assert encode_pair(tok, "a", alpaca, 256) == encode_pair(tok, "a", messages, 256)


AB = {"chosen": "a", "rejected": "b"}  # the replies of a record whose prompt is what is wrong


@pytest.mark.parametrize(
    ("record", "message"),
    [
        ({"prompt": "Hi", "chosen": "a"}, "r: field 'rejected' is missing"),
        (
            {
                "chosen": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "a"}],
                "rejected": [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "b"}],
            },
            "r: without a 'prompt', 'chosen' and 'rejected' must be whole conversations that share every",
        ),
        (AB, "r: expected a 'prompt', 'messages', 'conversations' or 'instruction'"),
        ({"instruction": "", **AB}, "r: fields 'instruction' and 'input' are both empty"),
        (
            {"instruction": "x", "history": [["only one"]], **AB},
            "r: field 'history' must be a list of [query, reply] string pairs",
        ),
        (
            {"conversations": [{"from": "robot", "value": "x"}], **AB},
            "r: field 'conversations[0].from' is 'robot'; expected one of",
        ),
        (
            {"prompt": "x", "chosen": {"from": "gpt"}, "rejected": "b"},
            "r: field 'chosen.value' must be a string",
        ),
        (
            {"prompt": "x", "chosen": "a", "rejected": [{"role": "user", "content": "b"}]},
            "r: field 'rejected' has no assistant turn",
        ),
        (
            {"prompt": "x", "chosen": 5, "rejected": "b"},
            "r: field 'chosen' must be a string, a message or a list of messages (got int)",
        ),
    ],
)
def test_malformed_preference_records_are_refused_by_name(record, message, tiny_chat_model):
    from qwenkit.finetune.data import DataError
    from qwenkit.finetune.preference_data import encode_pair

    with pytest.raises(DataError) as e:
        encode_pair(tokenizer_for(tiny_chat_model), "r", record, 256)
    assert message in str(e.value)


def test_full_dpo_command_trains_resumes_and_writes_a_whole_model(
    tiny_chat_model, tmp_path, monkeypatch, capsys
):
    """`qwenkit dpo --method full` (IPO loss here) raises the held-out margin and writes a model that loads;
    interrupted and resumed from its checkpoint (the reference recomputed on the base, before the
    checkpoint's weights are loaded) it reaches the uninterrupted run's weights and losses."""
    from qwenkit.finetune.run import work_dir
    from qwenkit.finetune.trainer import Trainer

    train = write_pairs(tmp_path / "train.jsonl", 0, 8)
    held = write_pairs(tmp_path / "held.jsonl", 100, 4)
    argv = [str(tiny_chat_model), str(train)]
    opts = ["--method", "full", "--eval-data", str(held), "--max-steps", "4", "--batch-size", "4"]
    opts += ["--lr", "1e-3", "--loss-type", "ipo", "--beta", "0.5", "--save-every", "2", "--no-progress"]
    assert cli_main(["dpo", *argv, str(tmp_path / "whole"), *opts]) == 0

    real_step = interrupt_training_after(monkeypatch, 2)
    assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *opts]) == 130  # as Ctrl-C ends it
    assert not (tmp_path / "resumed").exists()
    assert (work_dir(tmp_path / "resumed") / "checkpoints" / "step-2").is_dir()
    monkeypatch.setattr(Trainer, "train_step", real_step)
    capsys.readouterr()
    # Another loss once resumed without a word, the rest of the run on another objective.
    for other, said in (
        (["--beta", "0.7"], "beta was 0.5"),
        (["--loss-type", "hinge"], "loss_type was 'ipo'"),
    ):
        assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *opts, *other, "--resume"]) == 2
        err = capsys.readouterr().err.splitlines()[-1]
        assert err.startswith(f"error: --resume: {said} in {work_dir(tmp_path / 'resumed')}"), err
    assert cli_main(["dpo", *argv, str(tmp_path / "resumed"), *opts, "--resume"]) == 0
    assert json.loads((tmp_path / "resumed" / "training_args.json").read_text())["beta"] == 0.5

    whole = [json.loads(x) for x in (tmp_path / "whole" / "log.jsonl").read_text().splitlines()]
    resumed = [json.loads(x) for x in (tmp_path / "resumed" / "log.jsonl").read_text().splitlines()]
    evals = [r for r in whole if "eval_loss" in r]
    assert evals[0]["eval_rewards/margins"] == 0.0
    assert evals[0]["eval_loss"] == pytest.approx(1.0)  # (0 - 1/2b)^2
    assert evals[-1]["eval_rewards/margins"] > 0.1 and evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    losses = [r["loss"] for r in whole if "loss" in r]
    assert len(losses) == 4 and [r["loss"] for r in resumed if "loss" in r] == pytest.approx(losses, rel=1e-6)
    a, _ = load_model(tmp_path / "whole", "float32", progress=False)
    b, _ = load_model(tmp_path / "resumed", "float32", progress=False)
    base, _ = load_model(tiny_chat_model, "float32", progress=False)
    ids = torch.tensor([[9707, 11, 1879, 0, 3555]])
    with torch.no_grad():
        got, want, before = b(ids), a(ids), base(ids)
    assert (want - before).abs().max() > 1e-3  # it trained the whole model
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--label-smoothing", "0.1"], "--label-smoothing applies to --loss-type robust"),
        (
            ["--loss-type", "robust", "--label-smoothing", "0.5"],
            "--label-smoothing must be in [0, 0.5), got 0.5",
        ),
        (["--beta", "0"], "--beta must be positive, got 0.0"),
        (["--packing"], "--packing applies to finetune"),
        (["--simpo-gamma", "1"], "--simpo-gamma applies to --loss-type simpo"),
        (["--sft-weight", "-1"], "--sft-weight must not be negative, got -1.0"),
        (["--loss-type", "orpo", "--sft-weight", "1"], "ORPO's loss already holds the chosen replies' cross"),
        (["--beta", "inf"], "--beta must be a finite number, got inf"),
        (["--sft-weight", "nan"], "--sft-weight must be a finite number, got nan"),
        (["--loss-type", "simpo", "--simpo-gamma", "nan"], "--simpo-gamma must be a finite number, got nan"),
        (["--router-aux-loss-coef", "nan"], "--router-aux-loss-coef must be 0 or more, got nan"),
    ],
)
def test_bad_loss_settings_are_refused_in_one_line(extra, message, tiny_chat_model, tmp_path, capsys):
    out, pairs = tmp_path / "o", write_pairs(tmp_path / "p.jsonl", 0, 2)
    assert cli_main(["dpo", str(tiny_chat_model), str(pairs), str(out), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not out.exists()


@pytest.mark.parametrize("loss_type", ["simpo", "orpo"])
def test_reference_free_losses_through_the_command(loss_type, tiny_chat_model, tmp_path, capsys):
    """`qwenkit dpo --loss-type simpo|orpo`: no reference pass, and training widens the held-out margin of
    the chosen replies' mean token log-probability over the rejected ones'."""
    out = tmp_path / "o"
    argv = ["dpo", str(tiny_chat_model), str(write_pairs(tmp_path / "t.jsonl", 0, 16)), str(out)]
    argv += ["--eval-data", str(write_pairs(tmp_path / "h.jsonl", 100, 4)), "--loss-type", loss_type]
    argv += ["--max-steps", "8", "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0"]
    assert cli_main([*argv, "--beta", "1.0"]) == 0  # with progress bars: the reference pass would show one
    err = capsys.readouterr().err
    assert "training" in err and "reference log-probabilities" not in err
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    evals = [r for r in log if "eval_loss" in r]
    assert evals[-1]["eval_rewards/margins"] > evals[0]["eval_rewards/margins"] + 0.5
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"] and evals[-1]["eval_rewards/accuracies"] == 1.0


def test_qlora_dpo_scores_reference_and_policy_through_one_base_computation(tiny_chat_model, tmp_path):
    """QLoRA: the adapters start at zero, so at the first step and at the step-0 evaluation the policy is
    the reference and every pair's loss is exactly log 2 with zero margins. The training forward runs the
    int4 base as its dequantized weight in a float matmul; the reference and held-out passes (no
    gradients) must compute the base the same way, not through the inference kernel."""
    out = tmp_path / "q"
    argv = ["dpo", str(tiny_chat_model), str(write_pairs(tmp_path / "t.jsonl", 0, 8)), str(out), "--method"]
    argv += ["qlora", "--eval-data", str(write_pairs(tmp_path / "h.jsonl", 100, 4)), "--max-steps", "2"]
    assert cli_main([*argv, "--batch-size", "4", "--lr", "1e-2", "--lora-r", "4", "--no-progress"]) == 0
    assert_started_at_the_reference_and_trained(out)


def test_an_empty_preference_file_is_refused_as_empty(tiny_chat_model, tmp_path, capsys):
    """An empty (or blank-line) file once blamed --max-len ("no preference pair has a completion within
    --max-len 1024"), sending the user after the wrong setting; now it says the file holds no records,
    as finetune does. Pairs all cut by --max-len still say so."""
    empty, out = tmp_path / "p.jsonl", tmp_path / "o"
    empty.write_text("\n\n")
    assert cli_main(["dpo", str(tiny_chat_model), str(empty), str(out)]) == 2
    assert capsys.readouterr().err == f"error: {empty}: no records\n"
    pairs = write_pairs(tmp_path / "t.jsonl", 0, 2)
    assert cli_main(["dpo", str(tiny_chat_model), str(pairs), str(out), "--max-len", "4"]) == 2
    assert capsys.readouterr().err.endswith(
        f"error: {pairs}: no preference pair has a completion within --max-len 4\n"
    )
    assert not out.exists() and not (tmp_path / "o.training").exists()


def test_dpo_trains_without_dropout_by_default_as_trl(tiny_chat_model, tmp_path):
    """trl's DPO turns dropout off (``disable_dropout=True``), so the policy's log-probabilities in a training
    step are the model's own, as in evaluation. With one batch of every pair, held out too, step 2's training
    loss is then exactly the held-out loss after step 1 (before, --lora-dropout defaulted to 0.05 in dpo:
    the training forward was a noisy sample and the two differed)."""
    out = tmp_path / "o"
    pairs = write_pairs(tmp_path / "t.jsonl", 0, 8)
    argv = ["dpo", str(tiny_chat_model), str(pairs), str(out), "--eval-data", str(pairs), "--eval-every", "1"]
    assert cli_main([*argv, "--max-steps", "2", "--batch-size", "8", "--lr", "1e-2", "--no-progress"]) == 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert log[1]["eval_loss"] < math.log(2) - 1e-3  # step 1 moved the policy
    assert log[2]["loss"] == pytest.approx(log[1]["eval_loss"], rel=1e-6)
    assert log[2]["rewards/margins"] == pytest.approx(log[1]["eval_rewards/margins"], rel=1e-5)
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.0


def test_qwen_v1_dpo_starts_at_its_reference_past_seq_length(tmp_path):
    """A v1 model trains without LogN (modeling_qwen.py applies it only when not training) and evaluates
    with it: each pair's reference is scored in the mode its policy is, so on completions past seq_length
    the first step's loss and the held-out loss before any step are exactly log 2 (both modes' references
    from one scoring would leave one side off by LogN's effect)."""
    from qwenkit.finetune.preference_data import Completion, PreferencePair

    model, _ = load_model(write_v1_checkpoint(tmp_path / "v1"), "float32", progress=False)
    model.requires_grad_(True)
    g = torch.Generator().manual_seed(5)
    T, prompt = 2 * V1_TINY["seq_length"] + 6, V1_TINY["seq_length"] + 4

    def completion() -> Completion:
        ids = torch.randint(0, V1_TINY["vocab_size"], (T,), generator=g).tolist()
        return Completion(ids, [IGNORE] * prompt + ids[prompt:])

    pairs = [PreferencePair(completion(), completion()) for _ in range(2)]
    held = [PreferencePair(completion(), completion()) for _ in range(2)]
    args = TrainArgs(method="full", batch_size=2, lr=1e-3, progress=False)
    trainer = DPOTrainer(model, pairs, args, World(), 0, list(model.parameters()), beta=0.5)
    trainer.before_training(held)
    model.train()
    with torch.no_grad():
        train_mode = trainer.logps(pairs)
        model.eval()
        eval_mode = trainer.logps(pairs)
    assert (train_mode - eval_mode).abs().max() > 1e-2  # LogN moves these completions' log-probabilities
    # held-out pairs as modeling_qwen.py scores them outside training: LogN, each one's own NTK alpha
    from qwen_v1_reference import v1_logits

    sd = v1_state_dict(V1_TINY)
    with torch.no_grad():
        got_held = trainer.logps(held[:1])
    for seq, got in zip([held[0].chosen, held[0].rejected], got_held, strict=True):
        lp = F.log_softmax(v1_logits(sd, V1_TINY, torch.tensor(seq.ids))[:-1], -1)
        want = sum(float(lp[t - 1, seq.ids[t]]) for t in range(prompt, T))
        assert float(got) == pytest.approx(want, abs=1e-4)
    assert trainer.evaluate(held) == pytest.approx(math.log(2), abs=1e-6)
    assert trainer.eval_metrics["eval_rewards/margins"] == pytest.approx(0.0, abs=1e-6)
    first = trainer.train_step()
    assert first.loss == pytest.approx(math.log(2), abs=1e-6)
    assert first.extra["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


# Qwen2-Instruct's chat template (ChatML with a default system prompt; no <think> block)
QWEN2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def hf_ids(hf_tokenizer, messages, **kwargs) -> list[int]:
    """transformers' token ids of ``messages`` through the tokenizer's chat template."""
    return hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, **kwargs)["input_ids"]


def test_completion_is_trls_with_the_newline_after_im_end(tiny_chat_model, tmp_path):
    """trl's DPO takes a completion to be the template's prompt + reply past the prompt with its generation
    prompt: the reply, <|im_end|> and the newline after it (once left out here: the log-probabilities, the
    lengths IPO/SimPO/ORPO divide by and the logps metrics all missed a token a completion). Qwen3's template
    also opens the reply with an empty <think> block, which both completions share and which stays
    unlabelled here, as in finetune."""
    import shutil

    import transformers

    from qwenkit.finetune.preference_data import encode_pair
    from qwenkit.tokenizer import load_tokenizer

    qwen2 = tmp_path / "qwen2-template"
    qwen2.mkdir()
    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(tiny_chat_model / name, qwen2 / name)
    config = json.loads((tiny_chat_model / "tokenizer_config.json").read_text())
    (qwen2 / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": QWEN2_TEMPLATE}))
    rows = [
        {
            "prompt": [{"role": "user", "content": "Number 3?"}],
            "chosen": [{"role": "assistant", "content": "Gladly: 3 is fine."}],
            "rejected": [{"role": "assistant", "content": "No."}],
        },
        {
            "prompt": [
                {"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": "Sum 2 and 3"},
            ],
            "chosen": [{"role": "assistant", "content": "5"}],
            "rejected": [{"role": "assistant", "content": "6, I think"}],
        },
    ]
    for folder, empty_think in ((qwen2, []), (tiny_chat_model, [151667, 271, 151668, 271])):
        tok, hf = load_tokenizer(folder), transformers.AutoTokenizer.from_pretrained(folder)
        for i, row in enumerate(rows):
            pair = encode_pair(tok, f"r{i}", row, 256)
            prompt = hf_ids(hf, row["prompt"], add_generation_prompt=True)
            for side, got in (("chosen", pair.chosen), ("rejected", pair.rejected)):
                full = hf_ids(hf, row["prompt"] + row[side])
                assert full[: len(prompt)] == prompt
                completion = full[len(prompt) :]  # trl's chosen_ids / rejected_ids
                assert completion[: len(empty_think)] == empty_think, folder
                assert got.ids == full, (folder, i, side)
                assert [t for t in got.labels if t != IGNORE] == completion[len(empty_think) :]
                assert got.labels[-2:] == [151645, 198]  # <|im_end|> \n
                assert got.targets == len(completion) - len(empty_think)


def test_pairs_cut_at_max_len_are_counted(tiny_chat_model, tmp_path):
    """A reply cut by --max-len loses its end and <|im_end|>; finetune counts its cuts, dpo said nothing."""
    rows = [
        {"prompt": "q", "chosen": "yes " * 40, "rejected": "no"},  # the chosen reply is cut
        {"prompt": "q", "chosen": "yes", "rejected": "no"},  # whole
        {"prompt": "word " * 40, "chosen": "yes", "rejected": "no"},  # no completion within: dropped
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs, stats = load_pairs(tokenizer_for(tiny_chat_model), tmp_path / "p.jsonl", max_len=24)
    assert stats == {"pairs": 2, "truncated": 1, "dropped": 1}
    assert [p.truncated for p in pairs] == [True, False] and len(pairs[0].chosen.ids) == 24
