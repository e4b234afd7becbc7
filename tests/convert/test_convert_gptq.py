"""GPTQ v1 sources (Qwen-7B-Chat-Int4 layout, qwen_facts §5.3, §9) convert the same way: c_attn's packed
tensors split by output columns, the rest renamed, old AutoGPTQ's all-zero biases dropped."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from v1_sources import QUANTIZE_CONFIG, write_gptq_source

from qwenkit.convert.v1_to_qwen2 import convert_v1_to_qwen2
from qwenkit.convert.verify import verify_conversion
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.quant.gptq_format import QuantizationError

H, PACK = 64, 8  # hidden size of the tiny model; 4-bit words hold 8 values


@pytest.fixture(scope="module")
def gptq(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    src = write_gptq_source(root / "Qwen-tiny-Chat-Int4")
    result = convert_v1_to_qwen2(src, root / "out", progress=False)
    return (
        load_file(src / "model.safetensors"),
        load_file(root / "out" / "model.safetensors"),
        root / "out",
        result,
    )


def test_gptq_c_attn_splits_into_exact_column_slices(gptq):
    sd, out, _, _ = gptq
    for i in range(2):
        c = f"transformer.h.{i}.attn.c_attn."
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            p = f"model.layers.{i}.self_attn.{proj}."
            assert torch.equal(out[p + "qweight"], sd[c + "qweight"][:, j * H : (j + 1) * H])
            assert torch.equal(out[p + "scales"], sd[c + "scales"][:, j * H : (j + 1) * H])
            assert torch.equal(out[p + "qzeros"], sd[c + "qzeros"][:, j * H // PACK : (j + 1) * H // PACK])
            assert torch.equal(out[p + "g_idx"], sd[c + "g_idx"])
            assert torch.equal(out[p + "bias"], sd[c + "bias"][j * H : (j + 1) * H])
            assert out[p + "qweight"].dtype == torch.int32 and out[p + "scales"].dtype == torch.float16


def test_gptq_other_layers_renamed_and_zero_biases_dropped(gptq):
    sd, out, _, result = gptq
    pairs = {
        "attn.c_proj": "self_attn.o_proj",
        "mlp.w2": "mlp.gate_proj",
        "mlp.w1": "mlp.up_proj",
        "mlp.c_proj": "mlp.down_proj",
    }
    for i in range(2):
        for v1, qwen2 in pairs.items():
            for kind in ("qweight", "qzeros", "scales", "g_idx"):
                assert torch.equal(
                    out[f"model.layers.{i}.{qwen2}.{kind}"], sd[f"transformer.h.{i}.{v1}.{kind}"]
                )
            assert f"model.layers.{i}.{qwen2}.bias" not in out
    assert result.dropped_zero_biases == 2 * 4
    assert not any(k.endswith(".weight") and ".layers." in k and "norm" not in k for k in out)
    assert torch.equal(out["lm_head.weight"], sd["lm_head.weight"])  # not quantized


def test_gptq_config_carries_quantization(gptq):
    _, _, out_dir, result = gptq
    cfg = json.loads((out_dir / "config.json").read_text())
    assert cfg["quantization_config"] == {**QUANTIZE_CONFIG, "quant_method": "gptq"}
    assert cfg["torch_dtype"] == "float16" and cfg["model_type"] == "qwen2"
    assert json.loads((out_dir / "quantize_config.json").read_text()) == QUANTIZE_CONFIG
    assert result.torch_dtype == "float16"


def test_gptq_verify_compares_source_and_converted_outputs(gptq):
    src, out = gptq[2].parent / "Qwen-tiny-Chat-Int4", gptq[2]
    verification = verify_conversion(src, out, new_tokens=2)
    assert verification.passed, verification.summary()


def test_gptq_nonzero_bias_where_qwen2_has_none_is_refused(tmp_path):
    src = write_gptq_source(tmp_path / "src", nonzero_bias="mlp.w1")
    with pytest.raises(
        CheckpointError, match=r"model.layers.0.mlp.up_proj.bias is a non-zero bias.*change the model"
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == [src]


def test_gptq_refuses_to_recast_scales(tmp_path):
    src = write_gptq_source(tmp_path / "src")
    with pytest.raises(ConfigError, match="float16 scales"):
        convert_v1_to_qwen2(src, tmp_path / "out", dtype="bfloat16", progress=False)


@pytest.mark.slow
def test_gptq_output_loads_in_transformers_with_gptqmodel(gptq, monkeypatch):
    """What another reader makes of the converted Int4 directory: transformers + optimum + GPTQModel build
    their own quantized layers from config.json's quantization_config (no checkpoint_format: the zero-offset
    "gptq" format) and give the logits qwenkit's v1 model gives on the source, within bfloat16 steps (both
    sides run int4 kernels on bfloat16 activations)."""
    import transformers

    from qwenkit.checkpoint.loader import load_model

    monkeypatch.setenv("QWENKIT_KERNELS", "torch")
    out = gptq[2]
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, device_map="cpu")
    layer = theirs.model.layers[0].self_attn.q_proj
    assert type(layer).__module__.startswith("gptqmodel.nn_modules.qlinear"), type(layer)
    ours, _ = load_model(out.parent / "Qwen-tiny-Chat-Int4", dtype=torch.float32, progress=False)
    ids = torch.tensor([[5, 17, 300, 2, 99, 45, 12, 8, 400, 3], [42, 42, 42, 7, 511, 256, 0, 1, 2, 3]])
    with torch.no_grad():
        want, got = ours(ids), theirs.eval()(ids).logits.float()
    assert float((got - want).abs().max()) <= 4 * 2**-8 * float(want.abs().max())


def _without_g_idx(src, **quantization):
    """The source with every g_idx tensor removed (some exporters omit it without act-order)."""
    sd = load_file(src / "model.safetensors")
    save_file({k: v for k, v in sd.items() if not k.endswith(".g_idx")}, str(src / "model.safetensors"))
    for file in ("config.json", "quantize_config.json"):
        data = json.loads((src / file).read_text())
        data.get("quantization_config", data).update(quantization)
        (src / file).write_text(json.dumps(data))
    return src


def test_gptq_source_without_g_idx_gets_the_plain_one_written(gptq, tmp_path):
    """transformers + GPTQModel leave a missing g_idx uninitialized (garbage groups: an IndexError or
    wrong logits), so the output carries the plain i // group_size that qwenkit and vLLM assume. Before,
    such a source was refused as lacking the g_idx tensors a qwen2 model needs."""
    src = _without_g_idx(write_gptq_source(tmp_path / "src"))
    convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    out, with_g_idx = load_file(tmp_path / "out" / "model.safetensors"), gptq[1]
    assert sorted(out) == sorted(with_g_idx)
    for name, tensor in with_g_idx.items():
        assert torch.equal(out[name], tensor), name
    g_idx = out["model.layers.1.mlp.down_proj.g_idx"]
    plain = torch.arange(g_idx.numel(), dtype=torch.int32) // QUANTIZE_CONFIG["group_size"]
    assert g_idx.numel() > QUANTIZE_CONFIG["group_size"] and torch.equal(g_idx, plain)


def test_gptq_act_order_source_without_g_idx_is_refused(tmp_path):
    src = _without_g_idx(write_gptq_source(tmp_path / "src"), desc_act=True)
    with pytest.raises(QuantizationError) as e:
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert str(e.value) == (
        f"{src.parent / 'src'}: the quantization config says desc_act=true (act-order), but "
        "transformer.h.0.attn.c_attn.g_idx and 9 more is missing; its column groups cannot be rebuilt "
        "without it"
    )
    assert list(tmp_path.iterdir()) == [src]
