"""Group sizes that tile every quantized layer: the fallback, its note, the refusal, and --partial-groups."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import hf_model, qwen3_tokenizer_dir
from safetensors.torch import load_file

from qwenkit.checkpoint import load_model
from qwenkit.cli import main
from qwenkit.quant import QuantizationError
from qwenkit.quant.group_size import choose_group_size, per_row_int4_note, reader_size_note

KINDS = ("self_attn.q_proj", "self_attn.o_proj", "mlp.up_proj", "mlp.down_proj")


def _smollm2_widths(layers: int = 30) -> dict[str, int]:
    """SmolLM2-135M's quantized Linears: 576 inputs, except down_proj (1536)."""
    return {
        f"model.layers.{i}.{k}": 1536 if k == "mlp.down_proj" else 576 for i in range(layers) for k in KINDS
    }


def test_fallback_is_the_largest_reader_size_that_tiles_every_layer() -> None:
    choice = choose_group_size(_smollm2_widths(), 128)
    assert (choice.group_size, choice.requested) == (64, 128)  # 576 = 9 x 64; 128 leaves 64 over
    assert sorted(choice.untiled) == [576] and len(choice.untiled[576]) == 3 * 30
    assert choice.note() == (
        "group size 128 does not divide the input width of self_attn.q_proj, self_attn.o_proj, "
        "mlp.up_proj in 30 layers (576 inputs); using 64, the largest size that tiles every quantized "
        "layer (--partial-groups keeps 128 with a short last group)"
    )
    assert choose_group_size({"model.layers.0.mlp.down_proj": 96 * 3}, 128).group_size == 32


@pytest.mark.parametrize(("requested", "widths"), [(64, 576), (-1, 100), (96, 576), (128, 1536)])
def test_a_size_that_tiles_is_kept(requested: int, widths: int) -> None:
    choice = choose_group_size({"model.layers.0.self_attn.q_proj": widths}, requested)
    assert choice.group_size == requested and choice.note() is None


def test_partial_groups_keep_the_size_and_name_the_readers_that_refuse_them() -> None:
    choice = choose_group_size(_smollm2_widths(2), 128, partial_groups=True)
    assert choice.group_size == 128 and choice.partial
    assert choice.note() == (
        "group size 128 leaves a short last group in self_attn.q_proj, self_attn.o_proj, mlp.up_proj in "
        "2 layers (576 inputs); vLLM (weight shape) and GPTQModel's CPU int4 kernel (K not divisible by "
        "group) refuse such checkpoints"
    )


def test_no_size_tiles_is_refused_naming_the_layer_and_sizes_that_work() -> None:
    widths = {"model.layers.0.self_attn.q_proj": 200, "model.layers.0.mlp.down_proj": 100}
    with pytest.raises(QuantizationError) as e:
        choose_group_size(widths, 128)
    assert str(e.value) == (
        "--group-size 128 does not tile model.layers.0.mlp.down_proj (100 inputs) and no smaller reader "
        "size (64, 32) tiles every layer; use --group-size 100, 50, 25, 20 or -1 (one group per row), "
        "or --partial-groups"
    )


@pytest.mark.parametrize(
    ("requested", "tried", "fits"),
    [
        (96, " and no smaller reader size (64, 32) tiles every layer", "50, 25, 20, 10"),
        (24, "", "20, 10, 5, 4"),
    ],
)
def test_the_refusal_names_only_the_sizes_it_tried(requested, tried, fits) -> None:
    """--group-size 96 said "no smaller size of 128, 64, 32": 128 is not smaller, and was not tried."""
    widths = {"model.layers.0.self_attn.q_proj": 200, "model.layers.0.mlp.down_proj": 100}
    with pytest.raises(QuantizationError) as e:
        choose_group_size(widths, requested)
    assert str(e.value) == (
        f"--group-size {requested} does not tile model.layers.0.mlp.down_proj (100 inputs){tried}; "
        f"use --group-size {fits} or -1 (one group per row), or --partial-groups"
    )


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """A tiny Qwen2 whose widths (80, 160) no reader size tiles, but 40 and -1 do."""
    path = tmp_path_factory.mktemp("gs") / "src"
    hf_model(
        "qwen2",
        vocab_size=151936,
        hidden_size=80,
        intermediate_size=160,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        tie_word_embeddings=True,
    ).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    return path


def test_cli_refuses_in_one_line_before_writing(src, tmp_path, capsys) -> None:
    assert main(["quantize", str(src), str(tmp_path / "out"), "-q", "--method", "rtn"]) == 2
    err = capsys.readouterr().err
    assert err == (
        "error: --group-size 128 does not tile model.layers.0.self_attn.q_proj (80 inputs) and no smaller "
        "reader size (64, 32) tiles every layer; use --group-size 80, 40, 20, 16 or -1 (one group per row), "
        "or --partial-groups\n"
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "group", "rows"), [(["--group-size", "40"], 40, 2), (["--partial-groups"], 128, 1)]
)
def test_cli_writes_the_group_size_it_reports(src, tmp_path, capsys, args, group, rows) -> None:
    out = tmp_path / "out"
    assert main(["quantize", str(src), str(out), "-q", "--method", "rtn", *args]) == 0
    err = capsys.readouterr().err
    assert ("short last group" in err) == ("--partial-groups" in args)
    assert ("note: group size 40 is not one vLLM's GPTQ kernels take" in err) == (group == 40)
    assert json.loads((out / "quantize_config.json").read_text())["group_size"] == group
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.scales"].shape[0] == rows  # 80 columns
    assert tensors["model.layers.0.mlp.down_proj.scales"].shape[0] == -(-160 // group)
    loaded, _ = load_model(out, dtype="float32", progress=False)  # qwenkit reads short groups too
    with torch.no_grad():
        assert torch.isfinite(loaded(torch.tensor([[1, 2, 3]]))).all()


def test_int4_per_row_groups_name_the_reader_that_refuses_them() -> None:
    assert per_row_int4_note(_smollm2_widths(1)) == (
        "4-bit with --group-size -1 makes groups as wide as the rows (576, 1536); GPTQModel's CPU int4 "
        "kernel (transformers on CPU) takes only 32, 64, 128, 256"
    )
    assert per_row_int4_note({"model.layers.0.mlp.down_proj": 256}) is None


@pytest.mark.parametrize(
    ("requested", "note"),
    [
        (64, None),
        (-1, None),
        (
            96,  # tiles 576 and 1536, so it is kept: once without a word, yet vLLM and transformers refuse it
            "group size 96 is not one vLLM's GPTQ kernels take (-1, 32, 64, 128), nor GPTQModel's "
            "(transformers on CPU: 16 to 1024 in powers of 2); qwenkit and AutoGPTQ read it",
        ),
        (
            192,
            "group size 192 is not one vLLM's GPTQ kernels take (-1, 32, 64, 128), nor GPTQModel's "
            "(transformers on CPU: 16 to 1024 in powers of 2); qwenkit and AutoGPTQ read it",
        ),
    ],
)
def test_a_size_readers_refuse_is_kept_with_a_note(requested: int, note: str | None) -> None:
    choice = choose_group_size(_smollm2_widths(1), requested)
    assert choice.group_size == requested and choice.note() is None
    assert reader_size_note(choice) == note


def test_a_power_of_two_vllm_refuses_names_vllm_only() -> None:
    choice = choose_group_size({"model.layers.0.mlp.down_proj": 1536}, 256)
    assert reader_size_note(choice) == (
        "group size 256 is not one vLLM's GPTQ kernels take (-1, 32, 64, 128); qwenkit and AutoGPTQ read it"
    )
