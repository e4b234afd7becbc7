"""A published-layout Qwen v1 GPTQ checkpoint (Qwen-7B-Chat-Int4's names: fused c_attn, w1/w2, zero
biases everywhere) loads to exactly the weights its packed integers encode."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from qwenkit.checkpoint import load_model
from qwenkit.quant import unpack_gptq

sys.path.insert(0, str(Path(__file__).parents[1] / "convert"))
from v1_sources import QUANTIZE_CONFIG, write_gptq_source


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    src = write_gptq_source(tmp_path_factory.mktemp("gptq") / "Qwen-tiny-Chat-Int4")
    model, config = load_model(src, dtype="float32", progress=False)
    return load_file(src / "model.safetensors"), model, config


def expected(sd, prefix: str, columns: slice = slice(None)) -> torch.Tensor:
    """The (out, in) float weight these packed columns encode (as transformers + GPTQModel read them)."""
    bits = QUANTIZE_CONFIG["bits"]
    per_word = 32 // bits
    zcols = slice(
        None if columns.start is None else columns.start // per_word,
        None if columns.stop is None else columns.stop // per_word,
    )
    w = unpack_gptq(
        sd[prefix + "qweight"][:, columns],
        sd[prefix + "qzeros"][:, zcols],
        sd[prefix + "scales"][:, columns],
        sd[prefix + "g_idx"],
        bits,
    )
    return w.dequantize(torch.float32)


def test_v1_gptq_layers_dequantize_exactly(loaded):
    sd, model, config = loaded
    h = config.hidden_size
    for i, layer in enumerate(model.model.layers):
        p = f"transformer.h.{i}."
        attn, mlp = layer.self_attn, layer.mlp
        for proj, cols in (
            (attn.q_proj, slice(0, h)),
            (attn.k_proj, slice(h, 2 * h)),
            (attn.v_proj, slice(2 * h, 3 * h)),
        ):
            assert torch.equal(proj.weight_dequantized(), expected(sd, p + "attn.c_attn.", cols))
        assert torch.equal(attn.q_proj.bias, sd[p + "attn.c_attn.bias"][:h].float())
        assert torch.equal(attn.v_proj.bias, sd[p + "attn.c_attn.bias"][2 * h :].float())
        assert torch.equal(attn.o_proj.weight_dequantized(), expected(sd, p + "attn.c_proj."))
        assert torch.equal(mlp.gate_proj.weight_dequantized(), expected(sd, p + "mlp.w2."))  # w2 is the gate
        assert torch.equal(mlp.up_proj.weight_dequantized(), expected(sd, p + "mlp.w1."))
        assert torch.equal(mlp.down_proj.weight_dequantized(), expected(sd, p + "mlp.c_proj."))
        assert attn.o_proj.bias is None and mlp.gate_proj.bias is None  # zero AutoGPTQ biases dropped


def test_v1_gptq_forward_matches_its_dequantized_float_model(loaded):
    sd, model, config = loaded
    float_model, _ = load_model(_dequantized_copy(sd, config), dtype="float32", progress=False)
    ids = torch.arange(1, 17)[None]
    with torch.no_grad():
        a, b = model(ids), float_model(ids)
    # The packed kernels run in bfloat16 on CPU: close to the float model, not bit-equal.
    assert (a - b).abs().max() / b.abs().max() < 2e-2


def _dequantized_copy(sd, config) -> Path:
    """The same model as a float Qwen v1 checkpoint (fused c_attn rebuilt from the dequantized parts)."""
    import json
    import tempfile

    from safetensors.torch import save_file

    out = Path(tempfile.mkdtemp()) / "float"
    out.mkdir()
    src_cfg = {k: v for k, v in config.to_dict().items()}
    h = config.hidden_size
    float_sd = {k: v.float() for k, v in sd.items() if not k.startswith("transformer.h.") or "ln_" in k}
    for i in range(config.num_hidden_layers):
        p = f"transformer.h.{i}."
        float_sd[p + "attn.c_attn.weight"] = expected(sd, p + "attn.c_attn.")
        float_sd[p + "attn.c_attn.bias"] = sd[p + "attn.c_attn.bias"].float()
        for name in ("attn.c_proj", "mlp.w1", "mlp.w2", "mlp.c_proj"):
            float_sd[p + name + ".weight"] = expected(sd, p + name + ".")
    save_file(float_sd, str(out / "model.safetensors"))
    v1 = {
        "model_type": "qwen", "vocab_size": src_cfg["vocab_size"], "hidden_size": h,
        "num_attention_heads": config.num_attention_heads, "num_hidden_layers": config.num_hidden_layers,
        "intermediate_size": 2 * config.intermediate_size, "kv_channels": config.head_dim,
        "rotary_emb_base": config.rope_theta, "seq_length": config.max_position_embeddings,
        "use_dynamic_ntk": config.use_dynamic_ntk, "use_logn_attn": config.use_logn_attn,
        "layer_norm_epsilon": config.rms_norm_eps,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(v1))
    return out


def test_gptq_calibrates_a_v1_window_past_seq_length_with_its_ntk_alpha(tmp_path):
    """A calibration window longer than seq_length ran with NTK alpha 1 beside LogN's scaling: activations
    no forward of the model produces, since inference (and modeling_qwen.py under AutoGPTQ) fixes the
    alpha from the window's length. Layer 0's o_proj, whose input is the attention (so RoPE's), is now
    quantized from the Hessian of what inference feeds it."""
    from factories import write_v1_checkpoint

    from qwenkit.quant.gptq import HessianAccumulator, gptq_quantize_model, gptq_quantize_weight
    from qwenkit.quant.gptq_format import GPTQConfig

    src = write_v1_checkpoint(tmp_path / "v1", {"seq_length": 32})
    model, _ = load_model(src, dtype="float32", progress=False, dequantize=True)
    windows = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(3))
    assert model.ntk_alpha(100) == 7
    o_proj = model.model.layers[0].self_attn.o_proj
    seen = HessianAccumulator(o_proj.in_features, torch.device("cpu"))
    hook = o_proj.register_forward_hook(lambda _m, args, _out: seen.add(args[0]))
    with torch.no_grad():
        for window in windows:
            model(window[None], ntk_alphas=[7])
    hook.remove()
    config = GPTQConfig(bits=4, group_size=32, true_sequential=False)
    expected = gptq_quantize_weight(o_proj.weight, seen.hessian, config.bits, config.group_size)

    gptq_quantize_model(model, windows, config, progress=False)
    got = model.model.layers[0].self_attn.o_proj.weight_dequantized()
    assert torch.equal(got, expected.dequantize(torch.float32))
