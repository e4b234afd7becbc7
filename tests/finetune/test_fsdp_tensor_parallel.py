"""FSDP x tensor parallelism on a 2-D ("dp", "tp") device mesh, on gloo.

4 processes as 2 replicas x 2 tensor-parallel ranks compute the gradients 1 process computes on the same
global batch (gathered whole: full fine-tuning of a Qwen3 model with tied embeddings and q/k norms, and
LoRA on a Qwen2 model with qkv biases; both GQA), and reach the same weights after 3 AdamW steps; their
step-2 checkpoint resumes in 1 process and in 2x2 (full) and holds the whole adapter, which loads in
qwenkit (LoRA). `qwenkit finetune --tensor-parallel 2` (1 replica x 2 ranks) writes, from rank 0, a
consolidated checkpoint that loads in qwenkit and equals the 1-process result. Bad splits are refused in
one line before any process starts.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_common import build, grads, steps_and_weights, torchrun
from factories import hf_model, save_hf, write_tiny_chat_model
from moe.moe_models import hf_moe_model
from safetensors.torch import load_file

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as cli_main
from qwenkit.finetune.adapter_io import adapter_state_dict
from qwenkit.finetune.checkpoints import load_checkpoint
from qwenkit.finetune.distributed import World
from qwenkit.finetune.run import finetune, work_dir
from qwenkit.finetune.trainer import TrainArgs

SRC = Path(__file__).parents[2] / "src"


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """4 heads over 2 key/value heads (GQA): each tensor-parallel rank holds 2 query heads over 1."""
    root = tmp_path_factory.mktemp("models")
    return {
        "full": save_hf(hf_model("qwen3", tie_word_embeddings=True), root / "qwen3-tied"),
        "lora": save_hf(hf_model("qwen2"), root / "qwen2"),
    }


@pytest.fixture(scope="module")
def two_by_two(model_dirs, tmp_path_factory):
    out = tmp_path_factory.mktemp("tp")
    runs = [f"full={model_dirs['full']}", f"lora={model_dirs['lora']}"]
    torchrun("dist_tp_worker.py", [out, "", *runs, "--checkpoints"], out, nproc=4)
    return out


@pytest.fixture(scope="module")
def chat_model_kv2(tmp_path_factory):
    """The tiny Qwen3 chat model (q/k norm) with 2 key/value heads, so it splits over 2 ranks."""
    return write_tiny_chat_model(tmp_path_factory.mktemp("kv2") / "m", num_key_value_heads=2)


def assert_same_weights(got: dict, want: dict) -> None:
    """Equal after a few AdamW steps at lr 1e-2. Adam divides by sqrt(v): a gradient at round-off level
    (|g| ~ 1e-8 against 1e-2 elsewhere, summed in another order) still moves its weight by up to lr, so a
    handful of such elements may differ by up to a few 1e-4; all but 0.1% of the elements agree to 1e-5."""
    loose = total = 0
    for n, w in want.items():
        torch.testing.assert_close(got[n], w, rtol=0, atol=1e-2, msg=n)  # at most lr apart
        loose += int(((got[n] - w).abs() > 1e-5).sum())
        total += w.numel()
    assert loose <= total // 1000, f"{loose} of {total} weights differ by more than 1e-5"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_replicas_by_two_tensor_ranks_equal_one_process(method, model_dirs, two_by_two):
    tp = torch.load(two_by_two / f"{method}.pt", weights_only=True)
    # the same global batch of 4 in one process
    trainer, prep = build(model_dirs[method], method, World(), "ddp", batch_size=4)
    ref_grads = grads(trainer, prep)
    assert tp["grads"].keys() == ref_grads.keys()
    for n, g in ref_grads.items():
        assert g.abs().sum() > 0, n
        torch.testing.assert_close(tp["grads"][n], g, rtol=1e-4, atol=1e-7)  # whole, not scaled
    ref_weights = steps_and_weights(trainer, prep, 3)
    assert_same_weights(tp["weights"], ref_weights)
    if method == "full":
        # the tied embedding is one tensor split by vocabulary rows, trained once
        assert "model.embed_tokens.weight" in ref_weights and "lm_head.weight" not in ref_weights
        assert "model.layers.0.self_attn.q_norm.weight" in ref_grads
        # the 2x2 run's step-2 checkpoint (gathered whole) resumes in 1 process to the same weights
        t1, p1 = build(model_dirs[method], method, World(), "ddp", batch_size=4)
        load_checkpoint(two_by_two / "ckpt-full", t1, p1, t1.args)
        assert t1.step == 2
        assert_same_weights(steps_and_weights(t1, p1, 1), ref_weights)
        assert_same_weights(tp["resumed"], ref_weights)  # and in the 2x2 layout it was written from
    else:
        # rank 0 wrote the whole adapter (peft format) at step 2: it equals 1 process's and loads in qwenkit
        t1, p1 = build(model_dirs[method], method, World(), "ddp", batch_size=4)
        steps_and_weights(t1, p1, 2)
        want = adapter_state_dict(p1.base)
        got = load_file(two_by_two / "ckpt-lora" / "adapter_model.safetensors")
        assert got.keys() == want.keys() and len(got) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
        assert_same_weights(got, want)
        model, _ = load_model(model_dirs[method], "float32", progress=False, adapter=two_by_two / "ckpt-lora")
        ids = torch.tensor([[1, 2, 3, 4, 5]])
        with torch.no_grad():
            torch.testing.assert_close(model(ids), t1.model(ids), rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_mixture_of_experts_over_two_tensor_ranks_equals_one_process(variant, tmp_path):
    """Qwen2-MoE (8 experts, 2 a token, a shared expert) and Qwen3-MoE (4 a token, q/k norms) over 2
    tensor-parallel ranks: every expert's gate/up split by outputs and down by inputs, the router whole on
    both ranks. Full and LoRA training: the same trainable parameters (LoRA leaves the replicated q/k norms
    frozen), one step's gradients (router included) and the weights after 3 steps equal one process's.
    The ranks route every token alike at every step; if they did not, their collectives would not line up."""
    model_dir = save_hf(hf_moe_model(variant), tmp_path / "moe")
    torchrun(
        "dist_tp_worker.py", [tmp_path, "moe-", f"full={model_dir}", f"lora={model_dir}"], tmp_path, nproc=2
    )
    for method in ("full", "lora"):
        tp = torch.load(tmp_path / f"moe-{method}.pt", weights_only=True)
        trainer, prep = build(model_dir, method, World(), "ddp", batch_size=4)
        ref_grads = grads(trainer, prep)
        assert tp["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(tp["grads"][n], g, rtol=1e-4, atol=1e-7, msg=n)
        if method == "full":
            assert ref_grads["model.layers.0.mlp.gate.weight"].abs().sum() > 0
        else:
            assert ref_grads["model.layers.0.mlp.experts.0.down_proj.lora_A.weight"].abs().sum() > 0
        # AdamW divides each gradient by its own running size, so an element whose gradient is 1e-4 and
        # differs by 1e-7 (the ranks sum in another order) moves about lr * 1e-3 = 1e-5 differently a step.
        # A MoE has many such small gradients (experts that few tokens pick). 3 full steps, Qwen3-MoE:
        # 0.19% of elements beyond 1e-5 on a Zen 2 EPYC, 1.2% on a Zen 5 (max 1.15e-3, in lm_head, whose
        # one step's gradients there agree to 1.7e-7): at most 2%, none beyond lr / 5
        want = steps_and_weights(trainer, prep, 3)
        loose = sum(int(((tp["weights"][n] - w).abs() > 1e-5).sum()) for n, w in want.items())
        assert loose <= sum(w.numel() for w in want.values()) // 50
        for n, w in want.items():
            torch.testing.assert_close(tp["weights"][n], w, rtol=0, atol=2e-3, msg=n)


def chat_data(path: Path) -> Path:
    rows = [
        {"messages": [{"role": "user", "content": f"{i}?"}, {"role": "assistant", "content": f"It is {i}."}]}
        for i in range(4)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.slow
def test_finetune_command_with_tensor_parallel_writes_the_one_process_checkpoint(chat_model_kv2, tmp_path):
    """`qwenkit finetune --method full --tensor-parallel 2` (--nproc defaults to 2): rank 0 writes the whole
    model, which loads in qwenkit and equals the model one process trains on the same batches (there in
    one micro-batch of 2 without gradient checkpointing)."""
    data = chat_data(tmp_path / "d.jsonl")
    common = ["--method", "full", "--max-steps", "2", "--lr", "1e-2", "--no-progress"]
    # the same global batch of 2 as 1 x 2 micro-batches, with each layer recomputed in the backward
    common += ["--batch-size", "1", "--grad-accum", "2", "--gradient-checkpointing"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "qwenkit.cli", "finetune", str(chat_model_kv2), str(data)]
    cmd += [str(tmp_path / "tp"), "--tensor-parallel", "2", *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # FSDP2's view warning came from every rank
    assert not work_dir(tmp_path / "tp").exists()
    args = TrainArgs(method="full", max_steps=2, lr=1e-2, batch_size=2, progress=False)
    finetune(chat_model_kv2, data, tmp_path / "one", args)

    tp, _ = load_model(tmp_path / "tp", "float32", progress=False)
    one, _ = load_model(tmp_path / "one", "float32", progress=False)
    base, _ = load_model(chat_model_kv2, "float32", progress=False)
    assert tp.state_dict().keys() == one.state_dict().keys()
    assert_same_weights(tp.state_dict(), one.state_dict())
    ids = torch.tensor([[9707, 11, 1879, 0, 3555]])
    with torch.no_grad():
        got, want, before = tp(ids), one(ids), base(ids)
    assert (want - before).abs().max() > 1e-2  # it trained
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)
    logs = [json.loads(x) for x in (tmp_path / "tp" / "log.jsonl").read_text().splitlines()]
    ones = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [round(x["loss"], 4) for x in logs] == [round(x["loss"], 4) for x in ones]


@pytest.mark.slow
def test_dpo_command_with_tensor_parallel_equals_one_process(chat_model_kv2, tmp_path):
    """`qwenkit dpo --tensor-parallel 2` (Qwen3, q/k norms): the same losses and DPO metrics at every step as
    one process on the same pairs, and an adapter of the same tensors that gives its logits; the reference
    (adapters off) is computed on the split model too."""
    from finetune.test_dpo import run_dpo, write_pairs

    pairs = write_pairs(tmp_path / "p.jsonl", 0, 4)
    common = ["--max-steps", "3", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--batch-size", "2"]
    common += ["--beta", "0.5", "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    cmd = [sys.executable, "-m", "qwenkit.cli", "dpo", str(chat_model_kv2), str(pairs), str(tmp_path / "tp")]
    r = subprocess.run(
        [*cmd, "--tensor-parallel", "2", *common], env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    args = TrainArgs(max_steps=3, lr=1e-2, lora_r=4, lora_dropout=0.0, batch_size=2, progress=False)
    run_dpo(chat_model_kv2, pairs, tmp_path / "one", args, beta=0.5)
    logs = [json.loads(x) for x in (tmp_path / "tp" / "log.jsonl").read_text().splitlines()]
    ones = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert len(logs) == len(ones) == 3
    for got, want in zip(logs, ones, strict=True):
        for key in ("loss", "rewards/margins", "logps/chosen", "logps/rejected"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-5), key
    assert abs(ones[-1]["rewards/margins"]) > 1e-3  # the adapter moved away from the reference
    got = load_file(tmp_path / "tp" / "adapter_model.safetensors")
    want = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert got.keys() == want.keys()
    assert_same_weights(got, want)
    ids = torch.tensor([[9707, 11, 1879, 0, 3555]])
    tp, _ = load_model(chat_model_kv2, "float32", progress=False, adapter=tmp_path / "tp")
    one, _ = load_model(chat_model_kv2, "float32", progress=False, adapter=tmp_path / "one")
    with torch.no_grad():
        torch.testing.assert_close(tp(ids), one(ids), rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--tensor-parallel", "2"], "--tensor-parallel 2 does not divide the model's 1 key/value heads"),
        (["--tensor-parallel", "4"], "--tensor-parallel 4 is more ranks than the model's 2 attention heads"),
        (["--tensor-parallel", "0"], "--tensor-parallel must be at least 1, got 0"),
        (["--nproc", "3", "--tensor-parallel", "3"], "--tensor-parallel 3 is more ranks"),
    ],
)
def test_bad_split_of_the_model_is_refused_in_one_line(extra, message, tiny_chat_model, tmp_path, capsys):
    assert_refused(tiny_chat_model, extra, message, tmp_path, capsys)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--nproc", "3", "--tensor-parallel", "2"], "--tensor-parallel 2 does not divide the 3 process(es)"),
        (["--tensor-parallel", "2", "--strategy", "ddp"], "combines with --strategy fsdp"),
        (["--tensor-parallel", "2", "--method", "qlora"], "does not split QLoRA's quantized base"),
    ],
)
def test_bad_layout_is_refused_in_one_line(extra, message, chat_model_kv2, tmp_path, capsys):
    assert_refused(chat_model_kv2, extra, message, tmp_path, capsys)


def test_dpo_refuses_a_bad_split_in_one_line(tiny_chat_model, tmp_path, capsys):
    from finetune.test_dpo import write_pairs

    pairs = write_pairs(tmp_path / "p.jsonl", 0, 4)
    message = "--tensor-parallel 2 does not divide the model's 1 key/value heads"
    assert_refused(tiny_chat_model, ["--tensor-parallel", "2"], message, tmp_path, capsys, ["dpo", pairs])


def assert_refused(model, extra, message, tmp_path, capsys, command=None) -> None:
    """`qwenkit finetune MODEL DATA OUT *extra` (or ``command`` = [name, data]) exits 2 with one line holding
    ``message``, writing nothing."""
    name, data = command or ("finetune", chat_data(tmp_path / "d.jsonl"))
    argv = [name, str(model), str(data), str(tmp_path / "o")]
    assert cli_main([*argv, *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists() and not work_dir(tmp_path / "o").exists()


def test_experts_that_do_not_divide_are_refused():
    """An expert width the ranks cannot share equally is refused before anything loads, naming the splits
    that work (inference's plan: the shared expert's 42 columns split over 1 and 2 ranks, not 4)."""
    import transformers
    from factories import TINY

    from qwenkit.config import ModelConfig
    from qwenkit.errors import ConfigError
    from qwenkit.finetune.tensor_parallel import check_model

    moe = transformers.Qwen2MoeConfig(
        **{**TINY, "num_key_value_heads": 4},
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=42,
    )
    config = ModelConfig.from_hf(moe.to_dict())
    assert config.num_experts == 8
    check_model(config, 2, "full")
    with pytest.raises(
        ConfigError,
        match=r"does not divide the model's 42 shared expert's FFN width .* splits over 1, 2 ranks",
    ):
        check_model(config, 4, "full")
