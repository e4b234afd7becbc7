"""A file as llama.cpp's Q4_K_M writes one for Qwen2.5's 896-wide layers: Q5_0 projections, a Q8_0 v_proj
and a Q6_K down_proj. Q5_0 codes share Q8_0's zero point, so a layer's q/k/v still fuse into one product;
Q6_K runs on its own kernel (tests/gguf/test_gguf_q6_k.py) or, with the C++ kernels switched off or
missing, comes as int8 codes rounded again per group of 32; so every layer of a decode step is one
``kernels.decode_layers`` call and nothing runs in bfloat16."""

from __future__ import annotations

import gguf
import torch
from factories import hf_model
from gguf.quants import dequantize
from gguf_files import q6_k_blocks

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import read_gguf
from qwenkit.checkpoint.gguf_quant import requantize_int8
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.affine import AffineWeight

Q = gguf.GGMLQuantizationType


def test_requantized_codes_are_within_half_a_step():
    w = torch.from_numpy(dequantize(q6_k_blocks(64, 512, 0), Q.Q6_K).reshape(64, 512))
    w[0, :32] = 0.0  # an all-zero group
    w[1, :32] = w[1, :32].abs() + 0.01  # an all-positive group: its largest still on the grid
    a = requantize_int8(w)
    assert (a.bits, a.group_size, a.codes.dtype) == (8, 32, torch.uint8)
    step = a.scale.T.repeat_interleave(32, dim=1)  # (out, in)
    assert ((a.dequantize() - w).abs() <= step / 2 * (1 + 1e-6)).all()
    group_max = w.abs().reshape(64, 16, 32).amax(-1).repeat_interleave(32, dim=1)
    # the group's largest / 127, rounded up to a float16 value (at least float16's smallest normal)
    tightest = torch.clamp(group_max / 127 * (1 + 2**-10), min=torch.finfo(torch.float16).tiny)
    assert (step >= group_max / 127).all() and (step <= tightest).all()
    assert torch.equal(a.scale, a.scale.half().float())  # float16 scales: packed at 2 bytes


def test_q4_k_m_style_layers_all_run_on_the_int_kernels(tmp_path, gguf_writer):
    model = hf_model("qwen2", hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
    state = {n: p.detach() for n, p in model.state_dict().items()}
    cfg = model.config.to_dict()
    down = {i: q6_k_blocks(256, 512, i) for i in range(2)}
    v = {
        i: gguf.quants.quantize(state.pop(f"model.layers.{i}.self_attn.v_proj.weight").numpy(), Q.Q8_0)
        for i in range(2)
    }
    for i in range(2):
        del state[f"model.layers.{i}.mlp.down_proj.weight"]

    def extra(w: gguf.GGUFWriter) -> None:
        for i in range(2):
            w.add_tensor(f"blk.{i}.ffn_down.weight", down[i], raw_dtype=Q.Q6_K)
            w.add_tensor(f"blk.{i}.attn_v.weight", v[i], raw_dtype=Q.Q8_0)

    path = gguf_writer(tmp_path / "mix.gguf", "qwen2", cfg, state, Q.Q5_0, extra=extra)
    types = read_gguf(path).tensor_types
    assert {types[f"blk.0.{n}.weight"] for n in ("attn_q", "attn_v", "ffn_down")} == {"Q5_0", "Q8_0", "Q6_K"}
    fast, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    linears = [m for m in fast.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(m.kernel.startswith("qwenkit ") and m.bits == 8 for m in linears)
    if kernels.available():  # each layer one kernel call: q/k/v fused across Q5_0 and Q8_0
        assert all(layer.decode_weights is not None for layer in fast.model.layers)
    floats, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        got, want = fast(ids).float(), floats(ids)
    # int8 activations per block of 32, bf16 activations, the Q6_K weights' second rounding (measured 2.3%)
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), float((got - want).abs().max())
    a = read_gguf(path)
    down0 = dict(a.tensors(keep_quantized=True))["model.layers.0.mlp.down_proj.weight"]
    assert isinstance(down0, AffineWeight) and down0.bits == 8
