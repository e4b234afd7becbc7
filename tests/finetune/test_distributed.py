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
from dist_common import build, examples, grads, steps_and_weights, torchrun
from factories import hf_model, save_hf
from moe.moe_models import hf_moe_model

from qwenkit.finetune.checkpoints import load_checkpoint
from qwenkit.finetune.distributed import World
from qwenkit.finetune.trainer import pad_batch
from qwenkit.model.moe import count_routed_tokens

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
def test_two_processes_in_bfloat16_equal_one_within_its_rounding(tied_dir, two_procs):
    """FSDP2 full training with --dtype bfloat16 keeps float32 masters: it gathers the shards in bfloat16
    (the residual stream is bfloat16 there; in one process autocast keeps it float32) and reduces the
    gradients in float32, averaged over the ranks. The gradients agree to bfloat16's rounding (0.5-1.7% of
    their norm here; summed over 2 ranks instead of averaged: 100%), masters and gradients stay float32,
    and 3 AdamW steps (about lr each, whatever a gradient's size) move nearly every weight alike: only
    weights whose tiny gradients the rounding turns around move the other way."""
    two = torch.load(two_procs / "fsdp-full-bfloat16.pt", weights_only=True)
    trainer, prep = build(tied_dir, "full", World(), "fsdp", batch_size=4, dtype="bfloat16")
    ref_grads = grads(trainer, prep)
    assert two["grads"].keys() == ref_grads.keys() and len(ref_grads) == 26
    for n, g in ref_grads.items():
        assert two["grads"][n].dtype == torch.float32, n
        assert float((two["grads"][n] - g).norm() / g.norm()) < 3e-2, n
    ref_weights = steps_and_weights(trainer, prep, 3)
    diff = torch.cat([(two["weights"][n] - w).flatten() for n, w in ref_weights.items()]).abs()
    assert {w.dtype for w in two["weights"].values()} == {torch.float32}
    # each run moves a weight about 3 lr (3e-2) at most: opposite ways, 6e-2 apart
    assert float(diff.max()) < 6e-2 and float((diff < 1e-3).float().mean()) > 0.9


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory):
    """16 experts, 1 a token, and a shared expert: each rank's half of a batch leaves some experts idle."""
    model = hf_moe_model("qwen2_moe", num_experts=16, num_experts_per_tok=1, num_hidden_layers=2)
    return save_hf(model, tmp_path_factory.mktemp("moe") / "m")


@pytest.mark.slow
def test_two_processes_equal_one_with_experts_idle_on_one_rank(moe_dir, tmp_path):
    """A mixture of experts under DDP and FSDP2: an expert that only one rank's tokens pick still gets the
    same gradient as in one process (DDP used to stop, waiting for the other rank's gradient of it; FSDP2's
    reductions did not line up), and the weights after 3 steps are the same."""
    trainer, prep = build(moe_dir, "lora", World(), "ddp", batch_size=4)
    halves = trainer.micro_batches(0)[1]
    used = []
    for half in (halves[:2], halves[2:]):  # rank 0's and rank 1's examples of step 0
        ids, _ = pad_batch([examples()[i] for i in half], 0, "cpu")
        with torch.no_grad(), count_routed_tokens(prep.base) as stats:
            prep.base(ids)
        used.append({(layer, e) for layer, c in stats.per_layer.items() for e, n in enumerate(c) if n})
    assert used[0] ^ used[1], "every expert was picked on both ranks or on neither: the case is not tested"

    torchrun("dist_worker.py", [moe_dir, tmp_path], tmp_path)
    for mode in ("ddp-lora", "fsdp-lora", "fsdp-full"):
        two = torch.load(tmp_path / f"{mode}.pt", weights_only=True)
        strategy, method = mode.split("-")
        trainer, prep = build(moe_dir, method, World(), strategy, batch_size=4)
        ref_grads = grads(trainer, prep)
        assert two["grads"].keys() == ref_grads.keys()
        for n, g in ref_grads.items():
            torch.testing.assert_close(
                two["grads"][n], g, rtol=1e-4, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}"
            )
        # AdamW moves a weight by lr * m / (sqrt(v) + 1e-8): where a gradient is below that eps (one of
        # k_proj's is 2.6e-9 here), its last bits, summed in another order over 2 ranks, decide a visible
        # share of the step. 2e-4 is 2% of one step of lr 1e-2.
        atol = 2e-4 if method == "full" else 1e-5
        for n, w in steps_and_weights(trainer, prep, 3).items():
            torch.testing.assert_close(
                two["weights"][n], w, rtol=1e-4, atol=atol, msg=lambda m, n=n: f"{n}: {m}"
            )


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

    # the adapter rank 0 wrote loads in peft, with the logits qwenkit gives it
    import peft
    import transformers

    from qwenkit.checkpoint import load_model

    ids = torch.tensor([[9707, 1052, 13, 151644, 872, 198]])
    base = transformers.AutoModelForCausalLM.from_pretrained(tiny_chat_model, dtype=torch.float32)
    with torch.no_grad():
        plain = base(ids).logits
        theirs = peft.PeftModel.from_pretrained(base, tmp_path / "two").eval()(ids).logits
        ours = load_model(tiny_chat_model, dtype="float32", progress=False, adapter=tmp_path / "two")[0](ids)
    assert (theirs - plain).abs().max() > 1e-3  # the adapter changes the output
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_dpo_command_with_two_processes_equals_one(strategy, tiny_chat_model, tmp_path):
    """`qwenkit dpo --nproc 2`: the replicas share out the reference pass and the held-out pairs (3 over 2
    ranks, one at a time: one rank has a forward with nothing to score, which FSDP needs it to run), and
    log one process's losses and metrics, and its adapter."""
    from finetune.test_dpo import run_dpo, write_pairs
    from safetensors.torch import load_file

    from qwenkit.finetune.trainer import TrainArgs

    train, held = write_pairs(tmp_path / "t.jsonl", 0, 4), write_pairs(tmp_path / "h.jsonl", 50, 3)
    common = ["--max-steps", "2", "--lr", "1e-2", "--lora-r", "4", "--lora-dropout", "0", "--beta", "0.5"]
    common += ["--eval-data", str(held), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [
        sys.executable,
        "-m",
        "qwenkit.cli",
        "dpo",
        str(tiny_chat_model),
        str(train),
        str(tmp_path / "two"),
    ]
    cmd += ["--nproc", "2", "--strategy", strategy, "--batch-size", "1", *common]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    args = TrainArgs(max_steps=2, lr=1e-2, lora_r=4, lora_dropout=0.0, batch_size=2, progress=False)
    run_dpo(tiny_chat_model, train, tmp_path / "one", args, eval_path=held, beta=0.5)
    two = [json.loads(x) for x in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    one = [json.loads(x) for x in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert [sorted(r) for r in two] == [sorted(r) for r in one] and len(one) == 3
    for got, want in zip(two, one, strict=True):
        for key in want:
            if key.startswith(("loss", "eval_", "rewards/", "logps/")):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    assert abs(one[-1]["eval_rewards/margins"]) > 1e-3
    a = load_file(tmp_path / "two" / "adapter_model.safetensors")
    b = load_file(tmp_path / "one" / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_errors_under_nproc_are_one_line_and_no_traceback(tiny_chat_model, tmp_path):
    """A missing input is refused once, before any process starts. A bad record, which the ranks find,
    ends the command with their error and exit status 2, as without --nproc; torchrun's agent (run in the
    command's process) adds no traceback of its own. Nothing is written either way."""
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[1] / "src")}

    def run(data):
        cmd = [sys.executable, "-m", "qwenkit.cli", "finetune", str(tiny_chat_model), str(data)]
        cmd += [str(tmp_path / "out"), "--nproc", "2", "--no-progress"]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 2, r.stderr[-3000:]
        assert not (tmp_path / "out").exists() and not (tmp_path / "out.training").exists()
        return [ln for ln in r.stderr.splitlines() if ln.strip() and not ln.startswith(("memory", "  "))]

    assert run(tmp_path / "none.jsonl") == [f"error: {tmp_path / 'none.jsonl'}: no such file"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "robot", "content": "hi"}]}) + "\n")
    found = f"{bad}:1: field 'messages[0].role' is 'robot'; expected one of system, user, assistant, tool"
    assert sorted(run(bad)) == [f"error (rank {k}): {found}" for k in (0, 1)]


def _training_past_its_first_checkpoint(model, tmp_path, out) -> subprocess.Popen:
    """``finetune --nproc 2`` into ``out`` in its own process group, once its first checkpoint is saved."""
    import signal
    import time

    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"The number {i} comes after {i - 1}."}) + "\n" for i in range(8))
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(HERE.parents[1] / "src")}
    cmd = [sys.executable, "-m", "qwenkit.cli", "finetune", str(model), str(data), str(out)]
    cmd += ["--nproc", "2", "--batch-size", "1", "--max-steps", "100000", "--save-every", "1"]
    cmd += ["--lora-r", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 240
    while not list(out.parent.glob(f"{out.name}.training/checkpoints/step-*/trainer_state.pt")):
        if proc.poll() is not None or time.monotonic() > deadline:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its ranks
            raise AssertionError(proc.stderr.read()[-3000:])
        time.sleep(0.5)
    return proc


@pytest.mark.slow
def test_ctrl_c_under_nproc_says_where_to_resume_without_tracebacks(tiny_chat_model, tmp_path):
    """Ctrl-C (SIGINT to the terminal's process group) on `finetune --nproc 2` once printed each rank's
    KeyboardInterrupt traceback and the torchrun agent's SignalException (~170 lines) and exited 1; now
    rank 0's line says where --resume continues, and the command exits 130. A second Ctrl-C (torchrun's
    agent passes the first on, too) once cut that line off."""
    import signal
    import time

    out = tmp_path / "o"
    proc = _training_past_its_first_checkpoint(tiny_chat_model, tmp_path, out)
    try:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.05)  # pressed twice: the second Ctrl-C, like the agent's own, must not cut the line
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("interrupted at step ") and "; --resume continues from " in last, err[-3000:]
    assert not out.exists()


@pytest.mark.slow
def test_sigterm_to_the_launcher_under_nproc_exits_143_saying_where_to_resume(tiny_chat_model, tmp_path):
    """A container stop sends SIGTERM to the command (the launcher), which ends the ranks: the command
    once exited 130, as if Ctrl-C had stopped it, saying nothing; now 143, as one process does, with the
    checkpoint --resume continues from."""
    import signal

    import psutil

    out = tmp_path / "o"
    proc = _training_past_its_first_checkpoint(tiny_chat_model, tmp_path, out)
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        proc.terminate()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err and "SignalException" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"stopped by SIGTERM; --resume continues from {out}.training/checkpoints/step-"), (
        err
    )
    assert not out.exists()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive


@pytest.mark.slow
def test_a_rank_killed_mid_training_is_one_line_naming_it_and_where_to_resume(tiny_chat_model, tmp_path):
    """kill -9 of one rank (the OOM killer) under `finetune --nproc 2`: the surviving rank's collective
    failed, and it once printed gloo's traceback ("Connection reset by peer", ~25 lines) above the
    launcher's line, or was itself named (the agent stops it with SIGTERM in the same second). Now the
    survivor leaves quietly, every process ends, and the one line names the killed rank and the complete
    checkpoint --resume continues from; OUT is not written."""
    import signal

    import psutil

    out = tmp_path / "o"
    proc = _training_past_its_first_checkpoint(tiny_chat_model, tmp_path, out)
    try:
        ranks = psutil.Process(proc.pid).children(recursive=True)
        victim = next(p for p in ranks if p.environ().get("RANK") == "1")
        victim.kill()
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 1, err[-3000:]
    assert "Traceback" not in err and "gloo" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    prefix = f"error: rank 1 was stopped by SIGKILL; --resume continues from {out}.training/checkpoints/step-"
    assert last.startswith(prefix), err[-3000:]
    named = Path(last.split(" continues from ")[1])
    assert sorted(f.name for f in named.iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "trainer_state.pt",
    ]
    assert torch.load(named / "trainer_state.pt", weights_only=True)["step"] == int(named.name[5:])
    assert not out.exists()
    _, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive


def test_the_rank_named_is_the_one_that_failed_not_one_stopped_because_of_it():
    """torchrun's failure timestamps are whole seconds: the survivor the agent stopped with SIGTERM (or
    that left with LOST_STATUS) ties with the killed rank, and rank 0 won the tie."""
    from types import SimpleNamespace as F

    from qwenkit.finetune.command import _first_own_failure

    failures = {0: F(exitcode=-15, timestamp=100), 1: F(exitcode=-9, timestamp=100)}
    assert _first_own_failure(F(failures=failures))[0] == 1
    failures = {0: F(exitcode=4, timestamp=99), 1: F(exitcode=-9, timestamp=100)}
    assert _first_own_failure(F(failures=failures))[0] == 1
    failures = {0: F(exitcode=2, timestamp=101), 1: F(exitcode=2, timestamp=100)}
    assert _first_own_failure(F(failures=failures))[0] == 1


def test_a_rank_that_lost_another_says_one_line_under_a_torchrun_started_by_hand(monkeypatch, capfd):
    from qwenkit.distributed.launch import LOST_STATUS
    from qwenkit.finetune.command import LAUNCHED_ENV, on_lost_rank

    def lost(argv):
        raise RuntimeError(
            "[/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
            "[127.0.0.1]:38592: Connection reset by peer. This is typically caused by a remote worker"
        )

    def bug(argv):
        raise RuntimeError("shape mismatch")

    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv(LAUNCHED_ENV, raising=False)
    with pytest.raises(SystemExit) as e:
        on_lost_rank(lost)([])
    assert e.value.code == LOST_STATUS
    assert capfd.readouterr().err == (
        "error (rank 0): another rank died or stopped answering "
        "(Read error [127.0.0.1]:38592: Connection reset by peer)\n"
    )
    monkeypatch.setenv(LAUNCHED_ENV, "1")  # under --nproc the launcher names the rank that died
    with pytest.raises(SystemExit):
        on_lost_rank(lost)([])
    assert capfd.readouterr().err == ""
    with pytest.raises(RuntimeError, match="shape mismatch"):  # a bug keeps its traceback
        on_lost_rank(bug)([])
