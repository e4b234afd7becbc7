"""GPTQModel's per-layer ``dynamic`` overrides of ``sym`` and ``desc_act`` are honoured, as GPTQModel's and
vLLM's loaders honour them (beside ``bits`` and ``group_size``).

The checkpoints here are qwenkit's int4 output of a tiny Qwen2 with some layers replaced by hand-made
integer weights: asymmetric int8, and act-order layers whose ``g_idx`` is a permutation. Every quantized
layer must load to exactly the weight its packed integers encode, and the logits must equal those of the
same model with each layer's weight dequantized and run as a plain float matmul.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
from factories import hf_model
from safetensors.torch import load_file, save_file
from torch import nn

from qwenkit.checkpoint import load_model
from qwenkit.model.modules import replace_module
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.gptq_format import GPTQConfig, IntWeight, QuantizationError, pack_gptq, unpack_gptq
from qwenkit.quant.pipeline import quantize_checkpoint

IDS = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
BASE = {"bits": 4, "group_size": 32, "sym": True, "desc_act": False}
# Each pattern's layers are rewritten with the settings it names; "damp_percent" steers quantizing only,
# and GPTQModel and vLLM ignore it when loading, as qwenkit does.
DYNAMIC = {
    r"+:.*\.self_attn\.v_proj": {"bits": 8, "group_size": 64, "sym": False},
    r".*\.layers\.1\.self_attn\.o_proj": {"sym": False, "desc_act": True, "group_size": 16},
    r".*\.mlp\.down_proj": {"desc_act": True, "damp_percent": 0.05},
}


def _settings(layer: str, base: dict, dynamic: dict) -> dict:
    """The layer's bits, group_size, sym and desc_act: the first pattern matching from the name's start."""
    for pattern, override in dynamic.items():
        if re.match(pattern.removeprefix("+:"), layer):
            return {**base, **{k: v for k, v in override.items() if k in base}}
    return base


def _int_weight(out_f: int, in_f: int, settings: dict, gen: torch.Generator) -> IntWeight:
    """Random codes, scales and zero points (random, or the middle code where sym); with desc_act the
    groups are a random permutation of the columns."""
    bits, group = settings["bits"], settings["group_size"]
    maxq = 2**bits - 1
    n_groups = in_f // group
    zeros = (
        torch.full((n_groups, out_f), (maxq + 1) // 2, dtype=torch.int16)
        if settings["sym"]
        else torch.randint(0, maxq + 1, (n_groups, out_f), generator=gen, dtype=torch.int16)
    )
    g_idx = torch.arange(in_f, dtype=torch.int32) // group
    if settings["desc_act"]:
        g_idx = g_idx[torch.randperm(in_f, generator=gen)]
    return IntWeight(
        qweight=torch.randint(0, maxq + 1, (out_f, in_f), generator=gen, dtype=torch.uint8),
        scales=(torch.rand(n_groups, out_f, generator=gen) * 0.02 + 0.002).half(),
        zeros=zeros,
        g_idx=g_idx,
        bits=bits,
    )


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("dynamic")
    hf_model("qwen2", hidden_size=64, intermediate_size=128).save_pretrained(root / "float")
    quantize_checkpoint(root / "float", root / "int4", bits=4, group_size=32, method="rtn", progress=False)
    return root


def _mixed(root, name: str, base: dict, dynamic: dict, drop_g_idx=lambda layer: False):
    """qwenkit's int4 checkpoint with every quantized layer rewritten by :func:`_int_weight` to its own
    settings, ``base`` and ``dynamic`` as its quantization config, and the g_idx of ``drop_g_idx``
    layers left out."""
    out = root / name
    shutil.copytree(root / "int4", out)
    tensors = load_file(out / "model.safetensors")
    gen = torch.Generator().manual_seed(1)
    for layer in sorted(k.removesuffix(".qweight") for k in tensors if k.endswith(".qweight")):
        in_f, out_f = tensors[f"{layer}.qweight"].shape[0] * 8, tensors[f"{layer}.qweight"].shape[1]
        for key, t in pack_gptq(_int_weight(out_f, in_f, _settings(layer, base, dynamic), gen)).items():
            tensors[f"{layer}.{key}"] = t
        if drop_g_idx(layer):
            del tensors[f"{layer}.g_idx"]
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    for file in ("config.json", "quantize_config.json"):
        data = json.loads((out / file).read_text())
        data.get("quantization_config", data).update({**base, "dynamic": dynamic})
        (out / file).write_text(json.dumps(data))
    return out


def _check_against_dequantized(path, base: dict, dynamic: dict) -> None:
    """Each quantized layer loads to the weight its packed integers encode (read with its own settings),
    and the logits equal the model's with those weights as plain float Linears."""
    model, _ = load_model(path, dtype="float32", progress=False)
    reference, _ = load_model(path, dtype="float32", progress=False)
    tensors = load_file(path / "model.safetensors")
    layers = sorted(n for n, m in model.named_modules() if isinstance(m, QuantizedLinear))
    assert len(layers) == 2 * 7
    for layer in layers:
        settings = _settings(layer, base, dynamic)
        parts = [tensors[f"{layer}.{k}"] for k in ("qweight", "qzeros", "scales")]
        g_idx = tensors.get(f"{layer}.g_idx")
        weight = unpack_gptq(*parts, g_idx, settings["bits"], group_size=settings["group_size"]).dequantize()
        module = model.get_submodule(layer)
        assert module.bits == settings["bits"], layer
        assert torch.equal(module.weight_dequantized(), weight), layer
        linear = nn.Linear(weight.shape[1], weight.shape[0], bias=module.bias is not None)
        linear.weight.data = weight
        if module.bias is not None:
            linear.bias.data = module.bias.float()
        replace_module(reference, layer, linear)
    with torch.no_grad():
        got, want = model(IDS), reference(IDS)
    # the int kernels run bfloat16 (or int8-rounded) activations: a few of their steps of the largest logit
    torch.testing.assert_close(got, want, rtol=0, atol=8 * 2**-8 * float(want.abs().max()))


def test_for_layer_applies_sym_and_desc_act() -> None:
    config = GPTQConfig.from_dict({**BASE, "dynamic": DYNAMIC})
    v = config.for_layer("model.layers.0.self_attn.v_proj")
    assert (v.bits, v.group_size, v.sym, v.desc_act) == (8, 64, False, False)
    o1 = config.for_layer("model.layers.1.self_attn.o_proj")
    assert (o1.bits, o1.group_size, o1.sym, o1.desc_act) == (4, 16, False, True)
    down = config.for_layer("model.layers.0.mlp.down_proj")
    assert (down.bits, down.group_size, down.sym, down.act_order) == (4, 32, True, "dynamic")
    assert down.damp_percent == 0.01  # a quantize-time key: ignored when loading, as GPTQModel and vLLM do
    assert config.for_layer("model.layers.0.self_attn.o_proj") is config
    # desc_act false in an entry of an act-order checkpoint: that layer's g_idx is the plain one
    act = GPTQConfig.from_dict({**BASE, "desc_act": True, "dynamic": {".*q_proj": {"desc_act": False}}})
    assert act.for_layer("model.layers.0.self_attn.q_proj").act_order == "none"
    assert act.for_layer("model.layers.0.self_attn.k_proj").desc_act


def test_mixed_sym_and_act_order_layers_equal_the_dequantized_model(root) -> None:
    _check_against_dequantized(_mixed(root, "mixed", BASE, DYNAMIC), BASE, DYNAMIC)


def test_missing_g_idx_of_a_layer_whose_entry_says_desc_act_is_refused(root) -> None:
    """Before, the global desc_act false let the plain g_idx stand in for down_proj's permutation."""
    out = _mixed(root, "no-g-idx", BASE, DYNAMIC, lambda layer: layer.endswith("down_proj"))
    with pytest.raises(QuantizationError) as e:
        load_model(out, dtype="float32", progress=False)
    assert str(e.value) == (
        f"{out}: the quantization config says desc_act=true (act-order) for "
        "model.layers.0.mlp.down_proj (its dynamic entry), but model.layers.0.mlp.down_proj.g_idx and 1 "
        "more is missing; its column groups cannot be rebuilt without it"
    )


def test_act_order_checkpoint_whose_plain_layers_lack_g_idx_loads(root) -> None:
    """desc_act true overall, false in the entries of every layer but down_proj and layer 1's o_proj:
    those layers' g_idx may be left out, as GPTQModel then uses the plain groups. Before, the whole
    checkpoint was refused because of the global desc_act."""
    base = {**BASE, "desc_act": True}
    dynamic = {
        r"+:.*\.self_attn\.v_proj": {"bits": 8, "group_size": 64, "sym": False, "desc_act": False},
        r".*\.(q_proj|k_proj|gate_proj|up_proj|layers\.0\.self_attn\.o_proj)": {"desc_act": False},
    }
    permuted = ("down_proj", "layers.1.self_attn.o_proj")
    out = _mixed(root, "act-order", base, dynamic, lambda layer: not layer.endswith(permuted))
    _check_against_dequantized(out, base, dynamic)
