"""Distribution invariant for tensor parallelism: N processes (gloo, CPU) compute what one process
computes, for Qwen v1, Qwen2, Qwen3 and Qwen MoE tiny random models, float, under ``--quantize`` and from
GPTQ checkpoints; bad splits and bad groups give clear errors."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parent.parent / "moe"))
sys.path.insert(0, str(Path(__file__).parent.parent / "gguf"))
from factories import hf_model, save_hf, write_v1_checkpoint
from moe_models import VARIANTS, hf_moe_model
from tp_worker import (
    PROMPT,
    SLOTS,
    greedy,
    interrupt_self,
    load_expecting_error,
    load_with_free_ram,
    raise_on_ranks,
    run_models,
    run_quantized,
    run_with_adapter,
    run_with_served_adapters,
    weight_bytes_held,
    write_threads,
)

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as qwenkit
from qwenkit.config import ModelConfig
from qwenkit.distributed import TensorParallel, check_shardable, local_config
from qwenkit.distributed.launch import RankFailedError, run_ranks
from qwenkit.errors import ConfigError, OutOfMemoryError
from qwenkit.memory import check_fits, format_bytes, weight_bytes


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("tp")
    # 8 query / 4 key-value heads (GQA), so 2 and 4 ranks both split whole kv heads.
    gqa = dict(num_attention_heads=8, num_key_value_heads=4)
    return {
        "qwen2": str(save_hf(hf_model("qwen2", **gqa), root / "qwen2")),
        "qwen3-tied": str(
            save_hf(hf_model("qwen3", head_dim=16, tie_word_embeddings=True, **gqa), root / "qwen3")
        ),
        "qwen-v1": str(write_v1_checkpoint(root / "v1")),
    }  # fmt: skip


@pytest.fixture(scope="module")
def single(models) -> dict[str, dict]:
    out = {}
    for name, path in models.items():
        model, _ = load_model(path, dtype="float32", progress=False)
        with torch.no_grad():
            out[name] = {
                "logits": model(PROMPT),
                "tokens": greedy(model, None, steps=6),
                "weight_bytes": weight_bytes_held(model),
            }
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel_equals_one_process(models, single, world, tmp_path):
    run_ranks(run_models, world, (models, str(tmp_path)), timeout_s=60)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, ref in single.items():
        for rank, result in enumerate(ranks):
            got = result[name]
            diff = (got["logits"] - ref["logits"]).abs().max().item()
            assert got["logits"].shape == ref["logits"].shape, name
            assert diff < 1e-4, f"{name} rank {rank} of {world}: logits differ by {diff:.2e}"
            assert torch.equal(got["tokens"], ref["tokens"]), name
        # Each rank holds its 1/world share of every split weight and a copy of the norms only.
        held = [r[name]["weight_bytes"] for r in ranks]
        share = [h / ref["weight_bytes"] for h in held]
        assert all(abs(s - 1 / world) < 0.02 for s in share), f"{name}: per-rank shares {share}"
        # ... exactly what `qwenkit info --tensor-parallel N` prints per rank
        shard = local_config(ModelConfig.from_dir(models[name]), world)
        assert held == [weight_bytes(shard, torch.float32)] * world
    assert ranks[0]["qwen2"]["kv_heads"] == 4 // world  # the KV cache per rank is 1/world too


@pytest.fixture(scope="module")
def wide_models(tmp_path_factory) -> dict[str, str]:
    """Wide enough that int4's groups of 128 split whole over 2 ranks (o_proj's 256 inputs, down's 512)
    and not over 4 (64 of o_proj's inputs a rank); Qwen2 with q/k/v biases and its own float embedding,
    Qwen3 with the embedding tied to the int8 head."""
    root = tmp_path_factory.mktemp("tp-wide")
    wide = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    return {
        "qwen2": str(save_hf(hf_model("qwen2", **wide), root / "qwen2")),
        "qwen3-tied": str(
            save_hf(hf_model("qwen3", head_dim=32, tie_word_embeddings=True, **wide), root / "qwen3")
        ),
    }  # fmt: skip


def one_process(path: str, quantize: str | None) -> dict[str, torch.Tensor]:
    model, _ = load_model(path, dtype="float32", quantize=quantize, progress=False)
    with torch.no_grad():
        return {"logits": model(PROMPT), "tokens": greedy(model, None, steps=6)}


def assert_like_one_process(out: Path, world: int, models: dict[str, str], quantize=None, tol=1e-2) -> list:
    """Every rank's logits (saved by a tp_worker) within ``tol`` of one process's, its greedy tokens equal.
    The default tolerance: the all-reduce's float sums differ in their last bits, which can move the next
    layer's int8 activations across a rounding edge (about 1e-3 on these logits); nothing more."""
    ranks = [torch.load(out / f"rank{r}.pt") for r in range(world)]
    for name, path in models.items():
        ref = one_process(path, quantize)
        for rank, result in enumerate(ranks):
            diff = (result[name]["logits"] - ref["logits"]).abs().max().item()
            assert diff < tol, f"{name} {quantize} rank {rank} of {world}: logits differ by {diff:.2e}"
            assert torch.equal(result[name]["tokens"], ref["tokens"]), f"{name} {quantize} rank {rank}"
    return ranks


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["int8", "int4"])
def test_quantized_tensor_parallel_equals_one_process(wide_models, quantize, tmp_path):
    """Each rank rounds its shard as one process rounds the whole model: column-parallel rows as they
    are, row-parallel layers whole and then split by columns with their groups' scales."""
    run_ranks(run_quantized, 2, (wide_models, quantize, str(tmp_path)), timeout_s=120)
    assert_like_one_process(tmp_path, 2, wide_models, quantize)


@pytest.mark.slow
def test_int4_groups_that_straddle_two_ranks_are_rounded_per_rank_as_well_as_one_process_rounds(
    wide_models, tmp_path
):
    """Over 4 ranks o_proj's 64 inputs a rank cut its groups of 128: each rank rounds its own columns
    in groups of 64 instead. A different rounding, not a worse one: as close to the float model."""
    path = wide_models["qwen2"]
    run_ranks(run_quantized, 4, ({"qwen2": path}, "int4", str(tmp_path)), timeout_s=120)
    floats, ref = one_process(path, None)["logits"], one_process(path, "int4")["logits"]
    got = torch.load(tmp_path / "rank0.pt")["qwen2"]["logits"]
    assert (got - ref).abs().max() > 1e-2  # not the one-process rounding ...
    # ... but as near the float model's logits (random weights: int4 moves them by ~0.2 here)
    assert (got - floats).abs().mean() < 1.25 * (ref - floats).abs().mean()


@pytest.fixture(scope="module")
def gptq_models(wide_models, tmp_path_factory) -> dict[str, str]:
    """AutoGPTQ checkpoints of the wide Qwen2: int4 in groups of 128 (whole over 2 ranks, not 4), int4 in
    groups of 32 and int8 per channel (whole over 4)."""
    from qwenkit.quant.pipeline import quantize_checkpoint

    root = tmp_path_factory.mktemp("tp-gptq")
    out = {}
    for bits, group in ((4, 128), (4, 32), (8, -1)):
        path = root / f"int{bits}-g{group}"
        quantize_checkpoint(
            wide_models["qwen2"], path, bits=bits, group_size=group, method="rtn", progress=False
        )
        out[f"int{bits}-g{group}"] = str(path)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
def test_gptq_tensor_parallel_equals_one_process(gptq_models, world, tmp_path):
    """Each rank loads only its slices of the packed GPTQ tensors (whole groups, whole words)."""
    models = {n: p for n, p in gptq_models.items() if world == 2 or n != "int4-g128"}
    run_ranks(run_models, world, (models, str(tmp_path)), timeout_s=120)
    assert_like_one_process(tmp_path, world, models)


def gptq_config(group: int = 128, bits: int = 4, head_dim: int | None = None, **fields) -> ModelConfig:
    quantization = {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": False, **fields}
    shape = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2)
    if head_dim:
        shape |= dict(head_dim=head_dim, rotary_dim=head_dim)
    return ModelConfig(family="qwen2", num_attention_heads=8, num_key_value_heads=4, **shape,
                       quantization=quantization)  # fmt: skip


def test_gptq_splits_that_cut_groups_or_words_are_refused_naming_the_splits_that_work():
    with pytest.raises(
        ConfigError,
        match=r"^--tensor-parallel 4 would cut the GPTQ groups of 128 of o_proj's 256 inputs \(64 a rank\); "
        r"this checkpoint splits over 1, 2 ranks$",
    ):
        check_shardable(gptq_config(128), 4)
    check_shardable(gptq_config(128), 2)
    check_shardable(gptq_config(32), 4)
    # head_dim 4: k_proj's 16 outputs give 4 a rank over 4 ranks, half a word of 8 int4 codes
    narrow = gptq_config(-1, head_dim=4)
    with pytest.raises(ConfigError, match=r"each rank 4 of k_proj's 16 GPTQ outputs, not whole words of 8"):
        check_shardable(narrow, 4)


def test_gptq_with_dynamic_act_order_groups_is_refused():
    dynamic = gptq_config(128, desc_act=True)
    with pytest.raises(ConfigError, match=r"act-order and dynamic groups \(desc_act without static_groups\)"):
        check_shardable(dynamic, 2)
    static = gptq_config(128, desc_act=False, static_groups=True, meta={"act_order": "static"})
    check_shardable(static, 2)  # static groups follow the column order: they split


@pytest.fixture(scope="module")
def moe_models(tmp_path_factory) -> dict[str, str]:
    """Every MoE variant (shared expert or none, dense layers mixed in, top-1 to top-4), with expert
    widths that give each of 2 ranks whole 32-input blocks of int8 activations (as every Qwen MoE does)."""
    root = tmp_path_factory.mktemp("tp-moe")
    out = {}
    for variant in VARIANTS:
        shared = {"shared_expert_intermediate_size": 128} if variant.startswith("qwen2") else {}
        out[variant] = str(save_hf(hf_moe_model(variant, moe_intermediate_size=64, **shared), root / variant))
    return out


@pytest.mark.slow
def test_mixture_of_experts_tensor_parallel_equals_one_process(moe_models, tmp_path):
    """Each expert splits as a dense MLP, the router stays whole, the block's output is summed once."""
    (tmp_path / "float").mkdir(), (tmp_path / "int8").mkdir()
    run_ranks(run_models, 2, (moe_models, str(tmp_path / "float")), timeout_s=120)
    sparse_only = {v: p for v, p in moe_models.items() if "mixed" not in v}  # whole int8 blocks a rank
    run_ranks(run_quantized, 2, (sparse_only, "int8", str(tmp_path / "int8")), timeout_s=120)
    assert_like_one_process(tmp_path / "float", 2, moe_models, tol=1e-4)
    assert_like_one_process(tmp_path / "int8", 2, sparse_only, "int8")


def test_expert_widths_that_do_not_divide_are_refused():
    shape = dict(vocab_size=512, hidden_size=64, intermediate_size=160, num_hidden_layers=2)
    experts = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=30)
    experts |= dict(shared_expert_intermediate_size=96)
    moe = ModelConfig(family="qwen2_moe", num_attention_heads=8, num_key_value_heads=4, **shape, **experts)
    with pytest.raises(
        ConfigError,
        match=r"^--tensor-parallel 4 does not divide the model's 30 experts' FFN width "
        r"\(moe_intermediate_size\); this model splits over 1, 2 ranks$",
    ):
        check_shardable(moe, 4)
    check_shardable(moe, 2)


@pytest.mark.slow
def test_served_adapters_under_tensor_parallel_equal_one_process(wide_models, tmp_path):
    """``--lora-modules`` over 2 ranks: every rank serves its slices of each adapter's pairs as side
    paths (A's columns where the layer splits its inputs, whose partial updates the layer's all-reduce
    sums; B's rows where it splits its outputs), routed experts and the shared expert included; tokens of
    different adapters in one forward get the one-process logits of each."""
    from factories import write_lora_adapter

    moe = tmp_path / "moe"
    hf_moe_model("qwen2_moe").save_pretrained(moe)
    cases = {}
    for name, path in (("dense", wide_models["qwen2"]), ("moe", str(moe))):
        root = tmp_path / f"{name}-adapters"
        root.mkdir()
        adapters = {
            "a": write_lora_adapter(Path(path), root / "a", seed=1, r=4),
            "b": write_lora_adapter(Path(path), root / "b", seed=2, r=2, targets=("q_proj", "down_proj")),
        }
        cases[name] = (path, {k: str(v) for k, v in adapters.items()})
    run_ranks(run_with_served_adapters, 2, (cases, str(tmp_path)), timeout_s=180)
    got = [torch.load(tmp_path / f"rank{rank}.pt") for rank in range(2)]
    for name, (path, adapters) in cases.items():
        model, _ = load_model(path, dtype="float32", adapters=adapters, progress=False)
        with torch.no_grad():
            want = {k: model(PROMPT, adapter_slots=slots) for k, slots in SLOTS.items()}
        assert (want["a"] - want["base"]).abs().max() > 1e-2  # the adapter changes the logits
        for rank in range(2):
            for k in SLOTS:
                assert (got[rank][name][k] - want[k]).abs().max() < 1e-4, (name, rank, k)


@pytest.mark.slow
@pytest.mark.parametrize(
    "targets",
    [["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], ["lm_head", "v_proj"]],
)
def test_a_lora_adapter_under_tensor_parallel_equals_one_process(wide_models, tmp_path, targets):
    """A peft adapter on every projection: each rank takes B's rows of the layers split by outputs and
    A's columns of those split by inputs, whose partial updates the layer's all-reduce sums. One on the
    output head too, whose file holds peft's copy of the whole head (save_embedding_layers): that copy
    was compared with a rank's half of the head and refused as "not this model's" weights."""
    import peft
    import transformers

    path = wide_models["qwen2"]
    base = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    tuned = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    torch.manual_seed(5)
    with torch.no_grad():
        for name, p in tuned.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    tuned.save_pretrained(tmp_path / "adapter")
    run_ranks(run_with_adapter, 2, (path, str(tmp_path / "adapter"), str(tmp_path)), timeout_s=120)
    model, _ = load_model(path, dtype="float32", adapter=tmp_path / "adapter", progress=False)
    with torch.no_grad():
        ref, tokens = model(PROMPT), greedy(model, None, steps=6)
    assert (ref - one_process(path, None)["logits"]).abs().max() > 1e-2  # the adapter changes the logits
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt")
        assert (got["logits"] - ref).abs().max() < 1e-4, f"rank {rank}"
        assert torch.equal(got["tokens"], tokens)


@pytest.fixture(scope="module")
def gguf_models(tmp_path_factory) -> dict[str, str]:
    """GGUF files of the wide Qwen2 in Q8_0, Q4_1, Q5_0, and Q4_0 with Q6_K down_proj (256-input blocks)."""
    import gguf
    from gguf_files import q6_k_blocks, write_gguf

    Q = gguf.GGMLQuantizationType
    root = tmp_path_factory.mktemp("tp-gguf")
    model = hf_model(
        "qwen2", hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4
    )
    config = model.config.to_dict()
    out = {}
    for qtype in (Q.Q8_0, Q.Q4_1, Q.Q5_0):
        state = {n: p.detach() for n, p in model.state_dict().items()}
        out[qtype.name] = str(write_gguf(root / f"{qtype.name}.gguf", "qwen2", config, state, qtype))
    state = {n: p.detach() for n, p in model.state_dict().items() if "down_proj" not in n}

    def q6_k_down(w: gguf.GGUFWriter) -> None:
        for i in range(2):
            w.add_tensor(f"blk.{i}.ffn_down.weight", q6_k_blocks(256, 512, i), raw_dtype=Q.Q6_K)

    out["Q4_0+Q6_K"] = str(write_gguf(root / "mix.gguf", "qwen2", config, state, Q.Q4_0, extra=q6_k_down))
    return out


@pytest.mark.slow
def test_gguf_tensor_parallel_runs_in_the_files_own_precision(gguf_models, tmp_path):
    """Each rank keeps its share of the file's codes (rows, or columns with their groups' scales): the
    single-process logits and tokens, with no float copy of any projection."""
    (tmp_path / "2").mkdir(), (tmp_path / "4").mkdir()
    run_ranks(run_models, 2, (gguf_models, str(tmp_path / "2")), timeout_s=180)
    mix = {"Q4_0+Q6_K": gguf_models["Q4_0+Q6_K"]}
    run_ranks(run_models, 4, (mix, str(tmp_path / "4")), timeout_s=180)
    norms = 2 * (2 * 256) * 4 + 256 * 4  # float32 bytes of the layers' two norms each and the final one
    for result in assert_like_one_process(tmp_path / "2", 2, gguf_models):
        # every projection, the embedding and the head in codes
        assert all(result[name]["weight_bytes"] == norms for name in gguf_models)
    # over 4 ranks down_proj's 128 inputs a rank cut Q6_K's 256-input blocks: that layer's share in floats
    got = torch.load(tmp_path / "4" / "rank0.pt")["Q4_0+Q6_K"]
    assert got["weight_bytes"] == norms + 2 * 256 * 128 * 4
    floats = one_process(gguf_models["Q4_0+Q6_K"], None)["logits"]
    assert (got["logits"] - floats).abs().max() < 0.1


def test_kv_heads_that_do_not_divide_are_refused_with_the_splits_that_work():
    config = ModelConfig(
        family="qwen2",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    with pytest.raises(ConfigError, match=r"does not divide the model's 2 key/value heads.*over 1, 2 ranks"):
        check_shardable(config, 4)
    # not "use at most 4": 4 ranks do not divide the 2 key/value heads; the hint names what works
    with pytest.raises(
        ConfigError,
        match=r"^--tensor-parallel 8 is more ranks than the model's 4 attention heads; "
        r"this model splits over 1, 2 ranks$",
    ):
        check_shardable(config, 8)
    check_shardable(config, 2)


def test_a_bad_split_is_refused_before_any_collective(models):
    """Refused up front (no process group needed): nothing is loaded, nothing waits."""
    with pytest.raises(ConfigError, match="more ranks than the model's 8 attention heads"):
        load_model(models["qwen2"], dtype="float32", tensor_parallel=TensorParallel(0, 16), progress=False)


@pytest.mark.parametrize(
    ("gpus", "message"),
    [
        (0, "--device cuda was asked for, but no CUDA device is available"),
        (
            1,
            "--tensor-parallel 2 runs one rank a GPU, and this machine has 1 GPU(s); "
            "use --tensor-parallel 1 or fewer, or more machines (torchrun)",
        ),
    ],
)
@pytest.mark.parametrize("command", ["generate", "chat", "eval"])
def test_more_ranks_than_gpus_is_refused_before_any_process_starts(
    models, monkeypatch, capfd, gpus, message, command
):
    """Each rank sets its own GPU: with none it divided by zero in every rank (a traceback each), and with
    too few two ranks would share one, which NCCL refuses."""
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    argv = [command, models["qwen2"], "--device", "cuda", "--tensor-parallel", "2"]
    argv += {"eval": ["--task", "gsm8k"]}.get(command, ["-p", "hi"])
    assert qwenkit(argv) == 2
    assert capfd.readouterr().err == f"error: {message}\n"


@pytest.mark.slow
def test_mismatched_checkpoints_across_ranks_fail_on_every_rank(models, tmp_path):
    paths = [models["qwen2"], models["qwen3-tied"]]
    started = time.monotonic()
    with pytest.raises(RankFailedError, match=r"rank \d of 2 exited with status 2"):
        run_ranks(load_expecting_error, 2, (paths, str(tmp_path), -1), timeout_s=20)
    assert time.monotonic() - started < 60
    for rank in (0, 1):
        message = (tmp_path / f"rank{rank}.txt").read_text()
        assert message.startswith("CheckpointError: tensor-parallel ranks 1 have a different checkpoint")


def test_ranks_on_one_machines_cpu_must_fit_in_its_ram_together(models, tmp_path):
    """Two CPU ranks on one machine each hold half the model in the same RAM: RAM for 3/4 of the model
    was checked per rank (half each fitted, so the load went on to the OOM killer); it is now refused
    for both together in one line, while RAM for 3/2 of the model loads both halves."""
    config = ModelConfig.from_hf(json.loads((Path(models["qwen2"]) / "config.json").read_text()))
    need = check_fits(config, torch.float32, "cpu", 256, free=2**50)
    for free, expected in ((need * 3 // 4, "OutOfMemoryError: not enough free RAM: 2 tensor-parallel"),
                           (need * 3 // 2, "loaded")):  # fmt: skip
        run_ranks(load_with_free_ram, 2, (models["qwen2"], free, str(tmp_path)), timeout_s=30)
        for rank in (0, 1):
            assert (tmp_path / f"rank{rank}.txt").read_text().startswith(expected)


def test_the_memory_check_names_the_ranks_and_on_a_gpu_the_split(models):
    """The need said is all ranks' together; on a GPU, splitting over GPUs is among the advice."""
    config = ModelConfig.from_hf(json.loads((Path(models["qwen2"]) / "config.json").read_text()))
    need = check_fits(config, torch.float32, "cpu", 256, free=2**50)
    ranks = 2**30 // need + 1  # with 1 GiB free: one rank's need fits, these ranks' together do not
    with pytest.raises(OutOfMemoryError) as two:
        check_fits(config, torch.float32, "cpu", 256, free=2**30, ranks=ranks)
    assert str(two.value).startswith(
        f"not enough free RAM: {ranks} tensor-parallel ranks on this machine, each with its share of the "
        f"weights (float32) and a KV cache of 256 tokens need {ranks * need / 2**30:.2f} GiB, "
        "but only 1.00 GiB"
    )
    with pytest.raises(
        OutOfMemoryError, match=r"--quantize int8/int4, or split it over GPUs \(--tensor-parallel N\)$"
    ):
        check_fits(config, torch.float32, "cuda", 256, free=need - 1)
    with pytest.raises(OutOfMemoryError, match=r"--quantize int8/int4$"):
        check_fits(config, torch.float32, "cpu", 256, free=need - 1)


@pytest.mark.parametrize(("world", "omp"), [(2, None), (1, "1")])
def test_ranks_on_the_cpu_share_the_cores_unless_omp_num_threads_says(world, omp, tmp_path, monkeypatch):
    """(torch caps OMP_NUM_THREADS at the cores, so the user's choice shown is one below them.)"""
    from qwenkit.distributed.launch import usable_cores

    if omp is None:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    else:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    run_ranks(write_threads, world, (str(tmp_path),))
    expected = omp or str(max(1, usable_cores() // world))
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(world)] == [expected] * world


def test_more_ranks_than_cores_is_warned_before_they_start(models, monkeypatch, capsys):
    import argparse

    from qwenkit.cli import common

    monkeypatch.setattr("qwenkit.distributed.launch.usable_cores", lambda: 1)
    common.check_tensor_parallel(argparse.Namespace(model=models["qwen2"], tensor_parallel=2, device="cpu"))
    assert capsys.readouterr().err == (
        "warning: --tensor-parallel 2 on 1 CPU cores: the ranks share cores and will run slower than one "
        "process; it saves memory per process, not time\n"
    )


def test_an_error_every_rank_meets_is_said_once_as_one_process_says_it():
    with pytest.raises(RankFailedError) as raised:
        run_ranks(raise_on_ranks, 2, ([0, 1], "model.safetensors is not a readable safetensors file"))
    assert str(raised.value) == "model.safetensors is not a readable safetensors file"
    assert (raised.value.rank, raised.value.exitcode) == (0, 2)


def test_an_error_of_one_rank_alone_is_said_under_its_number():
    with pytest.raises(RankFailedError) as raised:
        run_ranks(raise_on_ranks, 2, ([1], "not enough memory for shard 1"), timeout_s=20)
    assert str(raised.value) == "tensor-parallel rank 1 of 2: not enough memory for shard 1"
    assert raised.value.detail == "not enough memory for shard 1"


def test_a_ctrl_c_reaching_the_ranks_leaves_the_decision_to_the_launcher(tmp_path):
    """A terminal's Ctrl-C reaches every rank as well as the launcher; only the launcher acts on it (it
    stops the ranks), so no rank prints its own KeyboardInterrupt traceback."""
    run_ranks(interrupt_self, 2, (str(tmp_path),), timeout_s=20)
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in range(2)] == ["finished", "finished"]


@pytest.mark.slow
def test_a_rank_that_dies_is_an_error_not_a_hang(models, tmp_path):
    paths = [models["qwen2"]] * 2
    started = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1 of 2 exited with status 3"):
        run_ranks(load_expecting_error, 2, (paths, str(tmp_path), 1), timeout_s=10)
    elapsed = time.monotonic() - started
    assert elapsed < 10 + 5 + 20, f"took {elapsed:.0f} s"
    # rank 0 got an error from its collective (peer gone or timed out) rather than waiting forever
    assert (tmp_path / "rank0.txt").read_text().startswith("RuntimeError: "), (
        tmp_path / "rank0.txt"
    ).read_text()


def test_info_prints_memory_per_rank(models, capsys):
    assert qwenkit(["info", models["qwen2"], "--tensor-parallel", "4"]) == 0
    out = capsys.readouterr().out
    config = ModelConfig.from_dir(models["qwen2"])
    per_rank = format_bytes(weight_bytes(local_config(config, 4), torch.float32))
    whole = format_bytes(weight_bytes(config, torch.float32))
    assert "memory per rank with --tensor-parallel 4" in out
    section = out.split("memory per rank")[1]
    assert per_rank in section.splitlines()[1] and whole not in section
    int4_per_rank = format_bytes(weight_bytes(local_config(config, 4), torch.bfloat16, "int4"))
    assert section.splitlines()[4].split() == ["int4", "(weight-only)", *int4_per_rank.split()]
    assert qwenkit(["info", models["qwen2"], "--tensor-parallel", "3"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "does not divide the model's 8 attention heads" in err


@pytest.mark.slow
def test_generate_with_tensor_parallel_prints_the_single_process_tokens(tmp_path, capfd):
    from factories import write_tiny_chat_model

    path = str(write_tiny_chat_model(tmp_path / "chat", num_key_value_heads=2))
    argv = ["generate", path, "--prompt-ids", "9,8,7,6", "--max-new-tokens", "12", "--json"]
    argv += ["--dtype", "float32", "--temperature", "0"]
    assert qwenkit(argv) == 0
    single = json.loads(capfd.readouterr().out)
    assert qwenkit([*argv, "--tensor-parallel", "2"]) == 0
    out = capfd.readouterr().out  # written by rank 0's process; rank 1 writes nothing
    sharded = json.loads(out)
    assert sharded["output_token_ids"] == single["output_token_ids"] and single["output_token_ids"]
    assert sharded["text"] == single["text"]
    # a split the model cannot take: one line, exit 2, no process started
    assert qwenkit([*argv, "--tensor-parallel", "4"]) == 2
    err = capfd.readouterr().err.strip().splitlines()
    assert err == [
        "error: --tensor-parallel 4 is more ranks than the model's 2 attention heads; "
        "this model splits over 1, 2 ranks"
    ]


@pytest.mark.slow
def test_generate_quantized_with_tensor_parallel_prints_the_single_process_logprobs(tmp_path, capfd):
    """`qwenkit generate --quantize int4 --tensor-parallel 2`: each rank rounds its shard, and the answer
    is the one-process int4 answer (not the float one), log-probabilities included."""
    from factories import write_tiny_chat_model

    wide = dict(hidden_size=256, intermediate_size=512, num_attention_heads=8, num_key_value_heads=4)
    path = str(write_tiny_chat_model(tmp_path / "chat", **wide))
    argv = ["generate", path, "--prompt-ids", "9,8,7,6", "--max-new-tokens", "3", "--json", "--logprobs", "1"]
    argv += ["--dtype", "float32", "--temperature", "0"]
    runs = {}
    for name, extra in (("float", []), ("int4", ["--quantize", "int4"])):
        assert qwenkit([*argv, *extra]) == 0
        runs[name] = json.loads(capfd.readouterr().out)
    assert qwenkit([*argv, "--quantize", "int4", "--tensor-parallel", "2"]) == 0
    sharded = json.loads(capfd.readouterr().out)
    assert sharded["output_token_ids"] == runs["int4"]["output_token_ids"]
    assert sharded["logprobs"] == pytest.approx(runs["int4"]["logprobs"], abs=1e-4)
    moved = [abs(a - b) for a, b in zip(runs["int4"]["logprobs"], runs["float"]["logprobs"], strict=True)]
    assert max(moved) > 1e-3  # int4 did round the weights
