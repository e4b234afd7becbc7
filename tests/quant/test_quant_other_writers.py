"""GPTQ checkpoints written by optimum and GPTQModel load as their files say.

GPTQModel's ``gptq_v2`` stores zero points without AutoGPTQ's -1 offset. And some checkpoints quantize
only some layers, or some at other bits:

optimum writes ``modules_in_block_to_quantize`` (the suffixes of the quantized layers of each block; the
others stay float) and GPTQModel writes ``dynamic`` (``-:pattern`` keeps a layer float, ``+:pattern``
overrides its bits or group size). Before qwenkit read them, such a checkpoint was refused with
"unexpected tensor ... .weight". The mixed files here are spliced from qwenkit's own int4, int8 and float
outputs of one model, so each layer's expected module is known exactly.
"""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
from factories import hf_model
from safetensors.torch import load_file, save_file
from torch import nn

from qwenkit.checkpoint import load_model
from qwenkit.distributed import check_shardable
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.model.modules import replace_module
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.gptq_format import GPTQConfig, QuantizationError, pack_gptq, unpack_gptq
from qwenkit.quant.pipeline import quantize_checkpoint

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
GPTQ_KEYS = ("qweight", "qzeros", "scales", "g_idx")


@pytest.fixture(scope="module")
def outputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("per-layer")
    hf_model("qwen2", hidden_size=64, intermediate_size=128).save_pretrained(root / "float")
    for bits, group in ((4, 32), (8, 64)):
        quantize_checkpoint(
            root / "float", root / f"int{bits}", bits=bits, group_size=group, method="rtn", progress=False
        )
    return root


def _splice(root, name, quantization, float_layers, int8_layers=()):
    """The int4 checkpoint with ``float_layers`` as float16 weights and ``int8_layers`` from the int8 one."""
    out = root / name
    out.mkdir()
    tensors = load_file(root / "int4" / "model.safetensors")
    floats = load_file(root / "float" / "model.safetensors")
    int8 = load_file(root / "int8" / "model.safetensors")
    for layer in float_layers:
        for key in GPTQ_KEYS:
            del tensors[f"{layer}.{key}"]
        tensors[f"{layer}.weight"] = floats[f"{layer}.weight"].half()
    for layer in int8_layers:
        for key in GPTQ_KEYS:
            tensors[f"{layer}.{key}"] = int8[f"{layer}.{key}"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((root / "int4" / "config.json").read_text())
    config["quantization_config"].update(quantization)
    (out / "config.json").write_text(json.dumps(config))
    return out


def _expected(root, float_layers, int8_layers=()):
    """The int4 model with those layers taken from the float (rounded to float16) and int8 models."""
    model, _ = load_model(root / "int4", dtype="float32", progress=False)
    int8, _ = load_model(root / "int8", dtype="float32", progress=False)
    floats = load_file(root / "float" / "model.safetensors")
    for layer in float_layers:
        weight = floats[f"{layer}.weight"].half().float()
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=f"{layer}.bias" in floats)
        linear.weight.data = weight
        if linear.bias is not None:
            linear.bias.data = floats[f"{layer}.bias"].half().float()
        replace_module(model, layer, linear)
    for layer in int8_layers:
        replace_module(model, layer, copy.deepcopy(int8.get_submodule(layer)))
    return model


def _float_layers(model) -> list[str]:
    return sorted(n for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layers." in n)


@pytest.mark.parametrize(
    "fields",
    [{"format": "gptq_v2", "checkpoint_format": "gptq_v2"}, {"format": "gptq_v2"}],
    ids=["both-names", "format-only"],  # GPTQModel writes both; its own reader takes "format" alone
)
def test_gptqmodel_v2_zero_points_load_like_the_v1_file(outputs, tmp_path, fields) -> None:
    tensors = load_file(outputs / "int4" / "model.safetensors")
    for name in [k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")]:
        parts = [tensors[f"{name}.{key}"] for key in GPTQ_KEYS]
        v2 = pack_gptq(unpack_gptq(*parts, bits=4), checkpoint_format="gptq_v2")
        assert not torch.equal(v2["qzeros"], tensors[f"{name}.qzeros"])  # 0x88888888, not 0x77777777
        tensors[f"{name}.qzeros"] = v2["qzeros"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((outputs / "int4" / "config.json").read_text())
    config["quantization_config"].pop("checkpoint_format")
    config["quantization_config"].update(fields)
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded, _ = load_model(tmp_path, dtype="float32", progress=False)
    v1, _ = load_model(outputs / "int4", dtype="float32", progress=False)
    with torch.no_grad():
        assert torch.equal(loaded(IDS), v1(IDS))


def test_modules_in_block_to_quantize_keeps_the_other_layers_float(outputs) -> None:
    mlp = [f"model.layers.{i}.mlp.{p}" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    attention = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"]]
    path = _splice(outputs, "optimum", {"modules_in_block_to_quantize": attention}, mlp)
    loaded, _ = load_model(path, dtype="float32", progress=False)
    assert _float_layers(loaded) == sorted(mlp)
    assert sum(isinstance(m, QuantizedLinear) for m in loaded.modules()) == 2 * 4
    with torch.no_grad():
        assert torch.equal(loaded(IDS), _expected(outputs, mlp)(IDS))


def test_gptqmodel_dynamic_skips_and_overrides_layers(outputs) -> None:
    dynamic = {
        r"-:model\.layers\.1\.mlp\.down_proj": {},
        r"+:.*\.self_attn\.v_proj": {"bits": 8, "group_size": 64},
        r".*\.layers\.1\.mlp\..*": {"bits": 4},  # after the skip: first match wins, down_proj stays float
    }
    float_layers = ["model.layers.1.mlp.down_proj"]
    int8_layers = [f"model.layers.{i}.self_attn.v_proj" for i in range(2)]
    path = _splice(outputs, "gptqmodel", {"dynamic": dynamic}, float_layers, int8_layers)
    loaded, config = load_model(path, dtype="float32", progress=False)
    assert _float_layers(loaded) == float_layers
    assert [loaded.get_submodule(n).bits for n in int8_layers] == [8, 8]
    assert loaded.get_submodule("model.layers.0.mlp.down_proj").bits == 4
    with torch.no_grad():
        assert torch.equal(loaded(IDS), _expected(outputs, float_layers, int8_layers)(IDS))
    with pytest.raises(ConfigError, match="keeps some layers float or quantizes them otherwise"):
        check_shardable(config, 2)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"dynamic": {"-:model.layers.(1": {}}}, r"dynamic pattern '-:model.layers.\(1' is not a regular"),
        ({"dynamic": {".*v_proj": {"bits": 3}}}, r"dynamic\['\.\*v_proj'\]: GPTQ bits=3 is not supported"),
        ({"dynamic": {".*v_proj": 8}}, r"dynamic\['\.\*v_proj'\] is 8, not a mapping"),
        # per-layer sym/desc_act are honoured, so a value that is no JSON boolean is refused, not ignored
        ({"dynamic": {".*v_proj": {"sym": "false"}}}, r"dynamic\['\.\*v_proj'\]: GPTQ sym='false' must be"),
        ({"dynamic": {".*v_proj": {"desc_act": 1}}}, r"dynamic\['\.\*v_proj'\]: GPTQ desc_act=1 must be"),
        # GPTQModel reads a per-layer pack_dtype; qwenkit reads int32 words only
        (
            {"dynamic": {".*v_proj": {"pack_dtype": "int16"}}},
            r"^GPTQ dynamic\['\.\*v_proj'\]: pack_dtype='int16' is not supported; qwenkit reads int32",
        ),
        ({"modules_in_block_to_quantize": "q_proj"}, "is not a list of module-name lists"),
    ],
)
def test_unreadable_per_layer_fields_are_refused(fields, message) -> None:
    with pytest.raises(QuantizationError, match=message):
        GPTQConfig.from_dict({"bits": 4, "group_size": 32, **fields})


def test_gptq_tensors_without_a_quantization_config_say_so(outputs) -> None:
    """A GPTQ directory that lost its quantize_config.json and config.json's quantization_config (copied
    without them, or a tool that rewrote config.json) was refused as "unexpected tensor ... for a qwen2
    model", which sent the user looking for a model mismatch."""
    out = outputs / "no-config"
    shutil.copytree(outputs / "int4", out)
    (out / "quantize_config.json").unlink()
    config = json.loads((out / "config.json").read_text())
    del config["quantization_config"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_model(out, dtype="float32", progress=False)
    assert str(e.value).endswith(
        "for a qwen2 model; it is a GPTQ tensor, but config.json has no quantization_config "
        "and no quantize_config.json"
    )
