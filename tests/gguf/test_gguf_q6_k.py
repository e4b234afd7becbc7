"""GGUF Q6_K (the output and token embedding of most K-quant files, half their ``ffn_down``/``attn_v``, and
whole Q6_K files): where qwenkit's C++ kernels build (AVX-512, AVX-VNNI, AVX2) it loads exactly as the file
holds it (codes 0..63, an int8 scale per 16 inputs, d per 256) and runs on the Q6_K kernel at the file's
0.82 bytes a weight; without them it is rounded again to int8 codes (tests/gguf/test_gguf_quant.py). Every
layer stays one ``decode_layers`` call."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from factories import hf_model
from gguf.quants import dequantize
from gguf_files import tiny_vocab, write_quantized_qwen2
from test_gguf_quant import random_q6_k_blocks

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import read_gguf
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.gptq_format import QuantizationError
from qwenkit.quant.kernels import build_kernel

Q = gguf.GGMLQuantizationType
CPU = torch.device("cpu")
needs_q6_k = pytest.mark.skipif(not kernels.runs_q6_k(), reason="the Q6_K kernel needs qwenkit's C++ kernels")


def _qtype(name: str) -> Q:
    """Layer 0: Q8_0, with Q6_K v_proj and down_proj (as a Q4_K_M file mixes them); layer 1 all Q6_K;
    the token embedding and the (untied) output Q6_K."""
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return Q.Q6_K
    if int(name.split(".")[2]) == 1 or ".v_proj." in name or ".down_proj." in name:
        return Q.Q6_K
    return Q.Q8_0


def small_q6_k_blocks(out_f: int, in_f: int, seed: int) -> np.ndarray:
    """Random Q6_K blocks with weights of a trained model's size (sub-scales -8..8, d up to 2e-3), so a
    random 2-layer model's logits stay comparable between its float and integer paths."""
    b = random_q6_k_blocks(out_f, in_f, seed).reshape(-1, 210)
    g = np.random.default_rng(seed)
    b[:, 192:208] = g.integers(-8, 9, size=(b.shape[0], 16)).astype(np.int8).view(np.uint8)
    b[:, 208:210] = (g.random((b.shape[0], 1)) * 2e-3).astype(np.float16).view(np.uint8)
    return b.reshape(out_f, -1)


@pytest.fixture(scope="module")
def q6_k_file(tmp_path_factory) -> tuple:
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip

    def blocks_for(name: str, weight: torch.Tensor, seed: int) -> tuple[np.ndarray, Q]:
        qtype = _qtype(name)
        if qtype == Q.Q6_K:
            return small_q6_k_blocks(*weight.shape, seed=seed), qtype
        return gguf.quants.quantize(weight.float().numpy(), qtype), qtype

    path = tmp_path_factory.mktemp("q6k") / "q6k.gguf"
    return write_quantized_qwen2(
        path, model, blocks_for, also=("model.embed_tokens.weight", "lm_head.weight")
    )


@needs_q6_k
def test_q6_k_weights_load_exactly(q6_k_file):
    path, blocks = q6_k_file
    loaded = dict(read_gguf(path).tensors(keep_quantized=True))
    for name, (data, qtype) in blocks.items():
        if qtype != Q.Q6_K:
            continue
        w = loaded[name]
        assert isinstance(w, AffineWeight) and w.superscale is not None, name
        want = torch.from_numpy(dequantize(data, qtype).reshape(w.codes.shape))
        assert torch.equal(w.dequantize(), want), name


@needs_q6_k
def test_q6_k_model_runs_on_the_q6_k_kernel(q6_k_file):
    path, _ = q6_k_file
    fast, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    keys = {n: m.impl.key for n, m in fast.named_modules() if isinstance(m, QuantizedLinear)}
    assert keys["lm_head"] == keys["model.embed_tokens.source"] == "avx512_q6_k"
    assert keys["model.layers.0.self_attn.v_proj"] == keys["model.layers.0.mlp.down_proj"] == "avx512_q6_k"
    assert keys["model.layers.0.self_attn.q_proj"] == "avx512_int8"  # Q8_0 beside the Q6_K v_proj
    assert (
        keys["model.layers.1.self_attn.qkv_proj"]
        == keys["model.layers.1.mlp.gate_up_silu.linear"]
        == "avx512_q6_k"
    )
    assert all(layer.decode_weights is not None for layer in fast.model.layers)
    assert "Q6_K" in fast.lm_head.kernel
    assert fast.lm_head.impl.packed.bits == 6
    floats, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        got, want = fast(ids).float(), floats(ids)
    # bf16 activations rounded to int8 per block of 32 against float32; the weights are the file's
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), float((got - want).abs().max())


@needs_q6_k
def test_q6_k_decode_is_batch_invariant(q6_k_file):
    """Each prompt's greedy tokens alone and among three, through the one-call decode layers."""
    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.generate import LLM, tokenizer_for

    path, _ = q6_k_file
    model, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    tokenizer = tokenizer_for(open_checkpoint(path))
    prompts = ["hello world", "the cat sat", "a b c d"]
    alone = []
    for prompt in prompts:
        llm = LLM(model, tokenizer, max_batch_size=1)
        alone += [
            c.token_ids for c in llm.generate([prompt], llm.default_params(max_tokens=6, temperature=0.0))
        ]
    llm = LLM(model, tokenizer, max_batch_size=3)
    together = [c.token_ids for c in llm.generate(prompts, llm.default_params(max_tokens=6, temperature=0.0))]
    assert together == alone and all(len(t) for t in alone)


@needs_q6_k
def test_q6_k_kernel_gives_back_what_it_was_built_from(q6_k_file):
    path, _ = q6_k_file
    w = dict(read_gguf(path).tensors(keep_quantized=True))["model.embed_tokens.weight"]
    impl = build_kernel(w, CPU)
    assert impl.key == "avx512_q6_k"
    assert torch.equal(impl.codes(), w.codes)
    assert torch.equal(impl.dequantize(torch.float32), w.dequantize())
    ids = torch.tensor([3, 0, w.out_features - 1])
    assert torch.equal(impl.rows(ids, torch.float32), w.dequantize()[ids])
    padded_rows = -(-w.out_features // 16) * 16
    assert impl.packed.codes.nbytes == padded_rows * w.in_features * 13 // 16  # 0.8125 bytes a weight
    bad = AffineWeight(w.codes, w.scale * 1.5, -32 * w.scale * 1.5, 16, 8, superscale=w.superscale)
    with pytest.raises(QuantizationError, match="d times an int8 per 16 inputs"):
        build_kernel(bad, CPU)
    shifted = AffineWeight(w.codes, w.scale, w.shift + w.scale, 16, 8, superscale=w.superscale)
    with pytest.raises(QuantizationError, match="zero point 32"):
        build_kernel(shifted, CPU)
