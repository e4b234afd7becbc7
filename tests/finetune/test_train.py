"""The training loop: loss normalization independent of how a batch is split, exact resume, atomic output,
clear refusals (bad data, too little memory) with nothing written."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import hf_model, interrupt_training_after, randomize_lora, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.errors import OutOfMemoryError, QwenkitError
from qwenkit.finetune.distributed import World
from qwenkit.finetune.encode import IGNORE, Example
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_parameters
from qwenkit.finetune.run import finetune, work_dir
from qwenkit.finetune.trainer import TrainArgs, Trainer
from qwenkit.model.served_adapters import served_projections


def random_examples(n: int, seed: int = 0) -> list[Example]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(5, 20, (1,), generator=g))
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        cut = int(torch.randint(1, length - 2, (1,), generator=g))
        out.append(Example(ids, [IGNORE] * cut + ids[cut:]))
    return out


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_hf(hf_model("qwen2"), tmp_path_factory.mktemp("tiny") / "m")


def grads_after_one_step(tiny_dir, examples, batch_size, grad_accum):
    model, _ = load_model(tiny_dir, "float32", progress=False)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    args = TrainArgs(batch_size=batch_size, grad_accum=grad_accum, progress=False)
    trainer = Trainer(model, examples, args, World(), pad_id=0, params=lora_parameters(model))
    loss, _, _ = trainer.accumulate(0)
    return loss, {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_gradients_do_not_depend_on_the_micro_batch_split(tiny_dir):
    """Sum of token losses / labelled tokens of the whole global batch: the split cannot change it."""
    examples = random_examples(8)
    loss_a, ga = grads_after_one_step(tiny_dir, examples, batch_size=8, grad_accum=1)
    for b, k in ((1, 8), (2, 4)):
        loss_b, gb = grads_after_one_step(tiny_dir, examples, batch_size=b, grad_accum=k)
        assert abs(loss_a - loss_b) < 1e-5
        for n in ga:
            torch.testing.assert_close(ga[n], gb[n], rtol=1e-4, atol=1e-7)
    # The reference: one forward over the whole batch, mean over labelled tokens.
    model, _ = load_model(tiny_dir, "float32", progress=False)
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logits = model(torch.tensor([e.ids]))[0, :-1]
            tgt = torch.tensor(e.labels[1:])
            total += torch.nn.functional.cross_entropy(
                logits, tgt, ignore_index=IGNORE, reduction="sum"
            ).item()
            count += int((tgt != IGNORE).sum())
    assert abs(loss_a - total / count) < 1e-4


def chat_data(path, n=12, start=0):
    with open(path, "w") as f:
        for i in range(start, start + n):
            msgs = [
                {"role": "user", "content": f"What is {i} plus one?"},
                {"role": "assistant", "content": f"It is {i + 1}."},
            ]
            f.write(json.dumps({"messages": msgs}) + "\n")
    return path


def test_resume_reaches_the_same_adapter_as_an_uninterrupted_run(
    tiny_chat_model, tmp_path, monkeypatch, capsys
):
    data = chat_data(tmp_path / "d.jsonl")
    args = TrainArgs(
        max_steps=6,
        batch_size=2,
        grad_accum=2,
        lr=5e-3,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.1,
        save_every=2,
        warmup_ratio=0.2,
        progress=False,
    )
    full = finetune(tiny_chat_model, data, tmp_path / "full", args)
    assert not work_dir(full).exists()
    with pytest.raises(QwenkitError) as finished:  # once said "already exists; pass --overwrite"
        finetune(tiny_chat_model, data, full, args, resume=True)
    assert str(finished.value) == (
        f"--resume: {full} holds a finished run, with nothing left to resume; pass --overwrite (without "
        "--resume) to train it again, or train into a new OUT"
    )

    real_step = interrupt_training_after(monkeypatch, 4)
    out = tmp_path / "resumed"
    capsys.readouterr()
    with pytest.raises(KeyboardInterrupt):
        finetune(tiny_chat_model, data, out, args)
    assert not out.exists()  # nothing half-written in OUT
    assert sorted(p.name for p in (work_dir(out) / "checkpoints").iterdir()) == ["step-2", "step-4"]
    step4 = work_dir(out) / "checkpoints" / "step-4"
    assert f"interrupted at step 4; --resume continues from {step4}\n" in capsys.readouterr().err
    with pytest.raises(QwenkitError, match="pass --resume"):
        finetune(tiny_chat_model, data, out, args)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    other = chat_data(tmp_path / "other.jsonl", n=4)  # other examples: not the same batches
    with pytest.raises(QwenkitError, match="the training examples differ from those of the run in"):
        finetune(tiny_chat_model, other, out, args, resume=True)
    # Settings that change the steps still to come once resumed silently into another run.
    for changed, message in (
        (dict(batch_size=4), r"global_batch \(--batch-size x --grad-accum x replicas\) was 4 in .*, now 8"),
        (dict(batch_size=1, grad_accum=2), "global_batch .* was 4 in .*, now 2"),
        (dict(use_rslora=True), "use_rslora was False in .*, now True"),
        (dict(lora_dropout=0.0), "lora_dropout was 0.1 in .*, now 0.0"),
        (dict(weight_decay=0.1), "weight_decay was 0.0 in .*, now 0.1"),
        (dict(adam_beta2=0.95), "adam_beta2 was 0.999 in .*, now 0.95"),
        (dict(adam_epsilon=1e-6), "adam_epsilon was 1e-08 in .*, now 1e-06"),
    ):
        with pytest.raises(QwenkitError, match=f"^--resume: {message}$"):
            finetune(tiny_chat_model, data, out, dataclasses.replace(args, **changed), resume=True)
    finetune(tiny_chat_model, data, out, args, resume=True)

    from safetensors.torch import load_file

    a = load_file(full / "adapter_model.safetensors")
    b = load_file(out / "adapter_model.safetensors")
    assert a.keys() == b.keys() and len(a) == 14
    for k in a:
        assert torch.equal(a[k], b[k]), k
    log_a = [json.loads(x) for x in (full / "log.jsonl").read_text().splitlines()]
    log_b = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b] and len(log_a) == 6
    assert (full / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_adam_betas_and_epsilon_reach_the_optimizer_and_the_record(tiny_chat_model, tmp_path):
    """--adam-beta1/--adam-beta2/--adam-epsilon (Qwen's finetune scripts pass adam_beta2 0.95) set AdamW's:
    after a first step from zero state each moment holds (1 - beta) of its gradient term, so
    exp_avg_sq / exp_avg^2 is (1 - beta2) / (1 - beta1)^2 for every element (0.1 with the defaults, once
    fixed at 0.9/0.999/1e-8); training_args.json records them."""
    data = chat_data(tmp_path / "d.jsonl", n=4)
    args = TrainArgs(
        max_steps=1, batch_size=2, adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, progress=False
    )
    made: list[Trainer] = []
    out = finetune(
        tiny_chat_model,
        data,
        tmp_path / "out",
        args,
        make_trainer=lambda *a: made.append(Trainer(*a)) or made[-1],
    )
    group = made[0].optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.95) and group["eps"] == 1e-6
    moments = [
        (made[0].optimizer.state[p]["exp_avg"], made[0].optimizer.state[p]["exp_avg_sq"])
        for p in made[0].params
    ]
    m = torch.cat([a.flatten() for a, _ in moments])
    v = torch.cat([b.flatten() for _, b in moments])
    seen = m.abs() > 1e-6  # LoRA's A factors get no gradient at the first step (B starts at zero)
    assert seen.sum() > 1000
    torch.testing.assert_close(
        v[seen] / m[seen] ** 2, torch.full_like(v[seen], 0.05 / 0.2**2), rtol=1e-4, atol=0
    )
    record = json.loads((out / "training_args.json").read_text())
    assert (record["adam_beta1"], record["adam_beta2"], record["adam_epsilon"]) == (0.8, 0.95, 1e-6)


def test_full_finetune_writes_a_loadable_checkpoint(tiny_chat_model, tmp_path):
    data = chat_data(tmp_path / "d.jsonl", n=4)
    args = TrainArgs(method="full", max_steps=2, batch_size=2, lr=1e-2, progress=False)
    out = finetune(tiny_chat_model, data, tmp_path / "out", args)
    trained, _ = load_model(out, "float32", progress=False)
    base, _ = load_model(tiny_chat_model, "float32", progress=False)
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert (trained(ids) - base(ids)).abs().max() > 1e-3
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()


def test_bad_data_and_memory_refusals_write_nothing(tiny_chat_model, tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant"}]}\n')
    args = TrainArgs(max_steps=1, progress=False)
    with pytest.raises(QwenkitError, match=r"bad\.jsonl:1: field 'messages\[1\]\.content' is missing"):
        finetune(tiny_chat_model, bad, tmp_path / "o1", args)
    data = chat_data(tmp_path / "d.jsonl", n=2)
    import qwenkit.finetune.estimate as estimate

    monkeypatch.setattr(estimate, "free_bytes", lambda device: 1000)
    with pytest.raises(OutOfMemoryError, match=r"training needs about .* GiB .* but only 0\.00 GiB is free"):
        finetune(tiny_chat_model, data, tmp_path / "o2", args)
    assert not any(p.name.startswith("o") for p in tmp_path.iterdir() if p.name not in ("d.jsonl",))


def test_overwrite_never_replaces_the_data_it_trains_on(tiny_chat_model, tmp_path):
    """OUT --overwrite on the directory that holds the training (or held-out) data once trained, then
    deleted the data with the old OUT; it is refused like an OUT holding the model."""
    out = tmp_path / "run"
    data = chat_data((out.mkdir() or out) / "d.jsonl", n=2)
    args = TrainArgs(max_steps=1, progress=False)
    for train, held in ((data, None), (chat_data(tmp_path / "t.jsonl", n=2), data)):
        with pytest.raises(QwenkitError, match=f"^output {out} would replace the source {data}; choose"):
            finetune(tiny_chat_model, train, out, args, eval_path=held, overwrite=True)
    assert [p.name for p in out.iterdir()] == ["d.jsonl"] and not work_dir(out).exists()


def test_overwrite_never_replaces_the_filter_keywords(tiny_chat_model, tmp_path, capsys):
    """--filter-keywords inside OUT with --overwrite: read first, deleted with the old OUT at the end"""
    from qwenkit.cli import main as cli_main

    out = tmp_path / "run"
    keywords = (out.mkdir() or out) / "words.txt"
    keywords.write_text("secret\n")
    data = chat_data(tmp_path / "d.jsonl", n=2)
    argv = [str(tiny_chat_model), str(data), str(out), "--max-steps", "1", "--overwrite", "--no-progress"]
    assert cli_main(["finetune", *argv, "--filter", "--filter-keywords", str(keywords)]) == 2
    assert capsys.readouterr().err == (
        f"error: output {out} would replace the source {keywords}; choose another directory\n"
    )
    assert [p.name for p in out.iterdir()] == ["words.txt"] and not work_dir(out).exists()


def test_qlora_and_filter_through_the_command(tiny_chat_model, tmp_path, capsys):
    """finetune --method qlora --filter: sensitive text is masked before tokenizing, the int4 base trains
    an adapter that then loads onto the float model."""
    from qwenkit.cli import main as cli_main

    rows = [
        {
            "messages": [
                {"role": "user", "content": "mail bob@example.com"},
                {"role": "assistant", "content": "Done."},
            ]
        },
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello."}]},
    ]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "q"
    argv = [
        "finetune",
        str(tiny_chat_model),
        str(data),
        str(out),
        "--method",
        "qlora",
        "--max-steps",
        "2",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--lora-r",
        "4",
        "--filter",
        "--no-progress",
    ]
    assert cli_main(argv) == 0
    err = capsys.readouterr().err
    assert "filter: 2 examples: 1 with sensitive data (email 1); 0 dropped" in err
    assert "warning" not in err  # a step of 2 examples out of 2
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 2 and all(r["loss"] > 0 and r["grad_norm"] > 0 for r in log)
    model, _ = load_model(tiny_chat_model, "float32", progress=False, adapter=out)
    assert len(served_projections(model)) == 7  # one decoder layer, seven projections
    assert any(float(m.pairs()[1].abs().sum()) > 0 for m in served_projections(model).values())


def test_only_the_newest_checkpoints_are_kept(tiny_chat_model, tmp_path, monkeypatch):
    """--save-every 1 over a long run once left one directory a step; the newest --keep-checkpoints stay
    (--resume takes the newest), 0 keeps every one."""
    data = chat_data(tmp_path / "d.jsonl", n=4)
    interrupt_training_after(monkeypatch, 5)
    for keep, expected in ((2, ["step-4", "step-5"]), (0, [f"step-{i}" for i in range(1, 6)])):
        out = tmp_path / f"keep{keep}"
        args = TrainArgs(
            max_steps=8, batch_size=2, lr=1e-3, save_every=1, keep_checkpoints=keep, progress=False
        )
        with pytest.raises(KeyboardInterrupt):
            finetune(tiny_chat_model, data, out, args)
        names = sorted((work_dir(out) / "checkpoints").iterdir(), key=lambda p: int(p.name[5:]))
        assert [p.name for p in names] == expected


def test_a_full_disk_while_saving_a_checkpoint_is_one_line(tiny_chat_model, tmp_path, monkeypatch, capsys):
    """torch.save's writer swallowed the disk's ENOSPC and raised 'unexpected pos 704 vs 598', a traceback
    atomic_output_dir could not name; the state file goes to /dev/full, whose every write is ENOSPC."""
    import qwenkit.finetune.checkpoints as checkpoints
    from qwenkit.cli import main as cli_main

    monkeypatch.setattr(checkpoints, "STATE_FILE", "/dev/full")  # tmp / "/dev/full" is /dev/full
    data = chat_data(tmp_path / "d.jsonl", n=4)
    out = tmp_path / "out"
    argv = [str(tiny_chat_model), str(data), str(out), "--max-steps", "2", "--save-every", "1"]
    assert cli_main(["finetune", *argv, "--no-progress", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    checkpoint = work_dir(out) / "checkpoints" / "step-1"
    assert err.startswith(f"error: disk full while writing {checkpoint} (") and "Traceback" not in err
    assert err.endswith("GB free); the partial output was removed")
    assert list((work_dir(out) / "checkpoints").iterdir()) == [] and not out.exists()


def test_a_diverged_loss_stops_the_run_in_one_line(tiny_chat_model, tmp_path, capsys):
    """A learning rate that blows the weights up once trained on NaN to the last step, then failed with a
    traceback drawing loss.png; now the first non-finite loss stops the run, naming the step and rate."""
    from qwenkit.cli import main as cli_main

    out = tmp_path / "o"
    argv = ["finetune", str(tiny_chat_model), str(chat_data(tmp_path / "d.jsonl", n=4)), str(out)]
    argv += ["--lr", "1e30", "--max-steps", "4", "--batch-size", "1", "--no-progress"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    assert err[-1].startswith("error: the loss is nan at step 2 (lr 8.54e+29): training diverged and ")
    assert err[-1].endswith(f"nothing was written; lower --lr and start again (delete {work_dir(out)} first)")
    assert not out.exists()
    assert [json.loads(x)["step"] for x in (work_dir(out) / "log.jsonl").read_text().splitlines()] == [1]


def run_stopped_at_step_2(model, tmp_path, monkeypatch) -> tuple[Path, TrainArgs, Path]:
    """A 4-step LoRA run into ``tmp_path / "o"`` interrupted after step 2 (its checkpoint saved):
    (data, args, out) to resume it with."""
    data = chat_data(tmp_path / "d.jsonl", n=4)
    args = TrainArgs(max_steps=4, batch_size=2, lr=1e-3, lora_r=2, save_every=1, progress=False)
    out = tmp_path / "o"
    real_step = interrupt_training_after(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        finetune(model, data, out, args)
    monkeypatch.setattr(Trainer, "train_step", real_step)
    return data, args, out


def test_resume_on_another_model_is_refused_in_one_line(tiny_chat_model, tmp_path, monkeypatch):
    """--resume with another MODEL once loaded the checkpoint's adapter into it when the shapes agreed
    (another model's weights under this run's adapter), and raised torch's size-mismatch traceback when
    they did not; now either is one line."""
    import shutil

    from factories import write_tiny_chat_model

    from qwenkit.errors import CheckpointError, ConfigError
    from qwenkit.finetune.checkpoints import STATE_FILE

    data, args, out = run_stopped_at_step_2(tiny_chat_model, tmp_path, monkeypatch)
    ckpt = work_dir(out) / "checkpoints" / "step-2"
    same_shape = shutil.copytree(tiny_chat_model, tmp_path / "same-shape")
    with pytest.raises(ConfigError) as e:
        finetune(same_shape, data, out, args, resume=True)
    assert str(e.value) == (
        f"--resume: the run in {ckpt} trained {tiny_chat_model.resolve()}, not {same_shape.resolve()}; "
        "resume it on that model, or train into a new OUT"
    )
    wider = write_tiny_chat_model(tmp_path / "wider", hidden_size=64)
    state = torch.load(ckpt / STATE_FILE, weights_only=True)
    del state["base_model"], state["base_model_files"]  # as a checkpoint written before they were recorded
    torch.save(state, ckpt / STATE_FILE)
    with pytest.raises(CheckpointError) as e:
        finetune(wider, data, out, args, resume=True)
    assert str(e.value).startswith(f"--resume: {ckpt} does not fit this model: size mismatch for model.")
    assert "\n" not in str(e.value)
    finetune(tiny_chat_model, data, out, args, resume=True)
    assert json.loads((out / "log.jsonl").read_text().splitlines()[-1])["step"] == 4


def test_resume_on_other_files_at_the_same_path_is_refused(tmp_path, monkeypatch):
    """The model's path alone was checked: files replaced there (another download of it) took the
    run's adapter and optimizer state silently."""
    from factories import write_tiny_chat_model

    from qwenkit.errors import ConfigError

    model = write_tiny_chat_model(tmp_path / "m")
    data, args, out = run_stopped_at_step_2(model, tmp_path, monkeypatch)
    from safetensors.torch import load_file, save_file

    weights = load_file(model / "model.safetensors")  # the same shapes, other weights, at the same path
    weights = {name: t + 0.01 for name, t in weights.items()}
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ConfigError) as e:
        finetune(model, data, out, args, resume=True)
    assert str(e.value).startswith(f"--resume: the files of {model.resolve()} changed since the run in ")


def test_a_step_larger_than_the_data_is_warned(tiny_chat_model, tmp_path, capsys):
    data = chat_data(tmp_path / "d.jsonl", n=3)
    args = TrainArgs(max_steps=1, batch_size=2, grad_accum=2, lr=1e-3, lora_r=2, progress=False)
    finetune(tiny_chat_model, data, tmp_path / "o", args)
    assert (
        "warning: a step takes 4 examples (--batch-size x --grad-accum x replicas) and there are 3: "
        "each step sees some of them more than once\n"
    ) in capsys.readouterr().err


def test_loss_png_leaves_out_non_finite_losses(tmp_path):
    """A NaN held-out loss once raised ValueError in loss.png's drawing, after training, losing the run's
    output; the finite points are drawn, and the same as without it."""
    from qwenkit.finetune.plot import plot_losses

    train = [(1, 2.0), (2, 1.5), (3, 1.0)]
    plot_losses(tmp_path / "nan.png", train, [(0, 2.2), (3, float("nan"))])
    plot_losses(tmp_path / "inf.png", [*train, (4, float("inf"))], [(0, 2.2)])
    plot_losses(tmp_path / "ref.png", train, [(0, 2.2)])
    ref = (tmp_path / "ref.png").read_bytes()
    assert ref[:8] == b"\x89PNG\r\n\x1a\n"
    assert (tmp_path / "nan.png").read_bytes() == ref == (tmp_path / "inf.png").read_bytes()


@pytest.mark.parametrize("ratio,steps", [(0.05, 10), (0.3, 6), (0.25, 10), (0.0, 5), (0.5, 7)])
def test_learning_rates_per_step_equal_transformers_schedule(ratio, steps):
    """Warmup steps ceil(ratio x steps) and the rate of every step as transformers' cosine schedule with
    warmup gives them (before, round() dropped a warmup under half a step: 0.05 of 10 steps had none, and
    each warmup step ran one step ahead of transformers')."""
    from transformers import TrainingArguments
    from transformers.optimization import get_cosine_schedule_with_warmup

    layer = torch.nn.Linear(4, 4)
    args = TrainArgs(lr=1e-3, warmup_ratio=ratio, max_steps=steps, progress=False)
    trainer = Trainer(layer, random_examples(4), args, World(), pad_id=0, params=list(layer.parameters()))
    # transformers 5 reads a warmup_steps under 1 as the ratio
    warmup = TrainingArguments(output_dir="unused", warmup_steps=ratio).get_warmup_steps(steps)
    opt = torch.optim.AdamW(torch.nn.Linear(4, 4).parameters(), lr=1e-3)
    reference = get_cosine_schedule_with_warmup(opt, warmup, steps)
    got, want = [], []
    for _ in range(steps):
        got.append(trainer.scheduler.get_last_lr()[0])
        want.append(reference.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.scheduler.step()
        opt.step()
        reference.step()
    assert got == pytest.approx(want, rel=1e-12, abs=0)
    assert (got[0] == 0.0) == (warmup > 0)


def test_lora_steps_equal_transformers_and_peft(tmp_path):
    """Padded micro-batches with gradient accumulation, rsLoRA, weight decay, clipping and warmup + cosine:
    each step's loss, gradient norm and adapter weights equal transformers + peft's on the same adapter
    and batches, with the loss over the accumulation window as transformers computes it (its
    ``num_items_in_batch``: the labelled tokens of all micro-batches)."""
    import peft
    import transformers
    from transformers.optimization import get_cosine_schedule_with_warmup

    from qwenkit.finetune.adapter_io import save_adapter
    from qwenkit.finetune.lora import lora_modules

    model_dir = save_hf(hf_model("qwen2", tie_word_embeddings=False), tmp_path / "m")
    examples = random_examples(8)
    model, _ = load_model(model_dir, "float32", progress=False)
    torch.manual_seed(0)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0, use_rslora=True)
    apply_lora(model, config)
    randomize_lora(model, seed=1, std=0.05)
    args = TrainArgs(
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        warmup_ratio=0.3,
        weight_decay=0.1,
        max_grad_norm=0.9,
        max_steps=6,
        progress=False,
    )
    trainer = Trainer(model, examples, args, World(), pad_id=0, params=lora_parameters(model))
    (tmp_path / "a").mkdir()
    save_adapter(model, tmp_path / "a", config, str(model_dir))

    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir)
    ref = peft.PeftModel.from_pretrained(base, tmp_path / "a", is_trainable=True).train()
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    mine = {  # peft's parameter name -> qwenkit's parameter
        f"base_model.model.{name}.{side}.default.weight": getattr(m, side).weight
        for name, m in lora_modules(model).items()
        for side in ("lora_A", "lora_B")
    }
    assert mine.keys() == ref_params.keys()
    opt = torch.optim.AdamW(ref_params.values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(opt, 2, 6)  # ceil(0.3 x 6) warmup steps
    clipped = 0
    for step in range(6):
        micro, idx = trainer.micro_batches(step)
        n_items = torch.tensor(sum(sum(x != IGNORE for x in examples[i].labels[1:]) for i in idx))
        loss = 0.0
        for batch in micro:
            rows = [examples[i] for i in batch]
            width = max(len(e.ids) for e in rows)
            ids = torch.zeros(len(rows), width, dtype=torch.long)
            labels = torch.full((len(rows), width), IGNORE)
            mask = torch.zeros(len(rows), width, dtype=torch.long)
            for i, e in enumerate(rows):
                ids[i, : len(e.ids)], labels[i, : len(e.ids)] = torch.tensor(e.ids), torch.tensor(e.labels)
                mask[i, : len(e.ids)] = 1
            out = ref(input_ids=ids, attention_mask=mask, labels=labels, num_items_in_batch=n_items)
            out.loss.backward()
            loss += out.loss.item()
        norm = float(torch.nn.utils.clip_grad_norm_(list(ref_params.values()), 0.9))
        clipped += norm > 0.9
        opt.step()
        schedule.step()
        opt.zero_grad()
        got = trainer.train_step()
        assert got.loss == pytest.approx(loss, rel=1e-6), step
        assert got.grad_norm == pytest.approx(norm, rel=1e-5), step
        for name, p in ref_params.items():
            torch.testing.assert_close(mine[name], p, rtol=1e-5, atol=1e-7, msg=f"{name} at step {step}")
    assert clipped  # clipping was exercised


def test_qwen_v1_training_forward_has_no_logn_attention_as_modeling_qwen(tmp_path):
    """modeling_qwen.py scales queries past seq_length by LogN only when not training (and keeps the NTK
    alpha at 1 there): a v1 model in training mode (what a training step runs) gives the v1 reference's
    training-mode logits on a sequence past seq_length, where LogN changes them; in eval mode, the
    reference's inference logits, LogN included. Before 2026-12-06 training applied LogN too."""
    from factories import V1_TINY, v1_state_dict, write_v1_checkpoint
    from qwen_v1_reference import v1_logits

    from qwenkit.finetune.trainer import token_losses

    model, _ = load_model(write_v1_checkpoint(tmp_path / "v1"), "float32", progress=False)
    sd = v1_state_dict(V1_TINY)
    T = 2 * V1_TINY["seq_length"] + 8
    ids = torch.randint(0, V1_TINY["vocab_size"], (T,), generator=torch.Generator().manual_seed(3))
    want_train = v1_logits(sd, V1_TINY, ids, training=True)
    want_eval = v1_logits(sd, V1_TINY, ids)
    past = slice(V1_TINY["seq_length"], T)
    assert (want_train[past] - want_eval[past]).abs().max() > 1e-2  # LogN (and NTK) matter here
    with torch.no_grad():
        model.train()
        torch.testing.assert_close(model(ids[None])[0], want_train, rtol=0, atol=1e-4)
        labels = ids[None].clone()
        want_ce = F.cross_entropy(want_train[:-1], ids[1:], reduction="none")
        torch.testing.assert_close(token_losses(model, ids[None], labels)[0], want_ce, rtol=0, atol=1e-4)
        model.eval()
        got_eval = model(ids[None], ntk_alphas=[model.ntk_alpha(T)])[0]
        torch.testing.assert_close(got_eval, want_eval, rtol=0, atol=1e-4)


def test_qwen_v1_held_out_loss_is_the_inference_forwards(tmp_path):
    """Held-out examples are scored as modeling_qwen.py scores them outside training: LogN past seq_length
    and each example's dynamic-NTK alpha from its own unpadded length (per row of a padded batch, as it
    reads them off the attention mask). Before 2026-12-06 they were scored with LogN but alpha 1."""
    from factories import V1_TINY, v1_state_dict, write_v1_checkpoint
    from qwen_v1_reference import v1_logits

    model, _ = load_model(write_v1_checkpoint(tmp_path / "v1"), "float32", progress=False)
    sd = v1_state_dict(V1_TINY)
    g = torch.Generator().manual_seed(4)
    examples = []
    for length in (70, 40, 20):  # alphas 7, 3 and 1 at seq_length 32
        ids = torch.randint(0, V1_TINY["vocab_size"], (length,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * 5 + ids[5:]))
    trainer = Trainer(model, examples, TrainArgs(batch_size=3, progress=False), World(), 0, [])
    total = count = 0.0
    for e in examples:
        logits = v1_logits(sd, V1_TINY, torch.tensor(e.ids))
        total += float(F.cross_entropy(logits[4:-1], torch.tensor(e.ids[5:]), reduction="sum"))
        count += len(e.ids) - 5
    assert trainer.evaluate(examples) == pytest.approx(total / count, rel=1e-5)


def test_a_copy_beside_the_checkpoints_is_neither_resumed_nor_pruned(tmp_path):
    """``cp -r step-4 step-4.bak`` beside the run's checkpoints made --resume a ValueError traceback."""
    from qwenkit.finetune.checkpoints import STATE_FILE, latest_checkpoint, prune_checkpoints

    for name in ("step-2", "step-10", "step-4", "step-4.bak", "step-²"):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / STATE_FILE).write_bytes(b"")
    assert latest_checkpoint(tmp_path).name == "step-10"
    prune_checkpoints(tmp_path, keep=1)
    left = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert left == ["step-10", "step-4.bak", "step-²"]
