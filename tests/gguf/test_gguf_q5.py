"""GGUF files in Q5_0, Q5_1 and Q5_K (the projections of llama.cpp's Q4_K_M files of 896-wide models, and
Q5_K_M files): their codes load as 8-bit codes spanning 32 values (marked ``q5_base``); the 5-bit kernel
(every build of the C++ kernels) holds them at 5 bits again (0.625 bytes a code, not 1) and computes
exactly what the int8 kernel computes on the same codes; switched off, the int8 kernels run them. A layer
mixing Q5_0 and Q8_0 projections runs them as products side by side, still one ``kernels.decode_layers``
call."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from factories import hf_model
from gguf.quants import dequantize, quantize
from gguf_files import tiny_vocab, write_quantized_qwen2
from test_gguf_quant import random_k_blocks, random_weight

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import read_gguf
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.gptq_format import QuantizationError
from qwenkit.quant.kernels import build_kernel

Q = gguf.GGMLQuantizationType
CPU = torch.device("cpu")


def _qtype(name: str) -> Q:
    """Layer 0: Q5_0 projections but a Q8_0 v_proj (as llama.cpp's Q4_K_M writes a 0.5B model's);
    layer 1: Q5_K; the token embedding: Q5_1."""
    if name == "model.embed_tokens.weight":
        return Q.Q5_1
    if int(name.split(".")[2]) == 1:
        return Q.Q5_K
    return Q.Q8_0 if ".v_proj." in name else Q.Q5_0


@pytest.fixture(scope="module")
def q5_file(tmp_path_factory) -> tuple:
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip

    def blocks_for(name: str, weight: torch.Tensor, seed: int) -> tuple[np.ndarray, Q]:
        qtype = _qtype(name)
        if qtype == Q.Q5_K:  # gguf-py cannot write K-quants: random super-blocks, finite d and dmin
            return random_k_blocks(qtype, *weight.shape, seed=seed), qtype
        return quantize(random_weight(*weight.shape, seed=seed), qtype), qtype

    return write_quantized_qwen2(tmp_path_factory.mktemp("q5") / "q5.gguf", model, blocks_for)


def test_q5_weights_load_as_8_bit_codes_spanning_32_values(q5_file):
    path, blocks = q5_file
    loaded = dict(read_gguf(path).tensors(keep_quantized=True))
    bases = {Q.Q5_0: 112, Q.Q5_1: 0, Q.Q5_K: 0, Q.Q8_0: None}
    for name, (data, qtype) in blocks.items():
        w = loaded[name]
        assert isinstance(w, AffineWeight) and (w.bits, w.group_size) == (8, 32), name
        assert w.q5_base == bases[qtype], name
        if w.q5_base is not None:
            assert int(w.codes.min()) >= w.q5_base and int(w.codes.max()) <= w.q5_base + 31, name
        want = torch.from_numpy(dequantize(data, qtype).reshape(w.codes.shape))
        got = w.dequantize()
        if qtype == Q.Q5_K:  # d * sc and dmin * m rounded to float16 values: within 2^-11 of their terms
            scale = w.scale.T.repeat_interleave(32, dim=1)
            terms = (w.codes.float() * scale).abs() + w.shift.T.repeat_interleave(32, dim=1).abs()
            assert ((got - want).abs() <= 2.0**-11 * terms * (1 + 1e-6)).all(), name
        else:
            assert torch.equal(got, want), name


def test_q5_model_runs_on_the_5_bit_kernel_and_answers_as_its_floats(q5_file):
    path, _ = q5_file
    fast, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    linears = {n: m for n, m in fast.named_modules() if isinstance(m, QuantizedLinear)}
    assert linears and all(m.bits == 8 for m in linears.values())
    if kernels.available():
        assert all(m.kernel.startswith("qwenkit ") for m in linears.values())
        assert all(layer.decode_weights is not None for layer in fast.model.layers)
    if kernels.runs_int5():  # every Q5 weight at 5 bits; the Q8_0 v_proj on the int8 kernel beside q and k
        five = {n for n, m in linears.items() if m.impl.key == "avx512_int5"}
        assert all(linears[n].impl.packed.bits == 5 and "int5" in linears[n].kernel for n in five)
        assert linears["model.layers.0.self_attn.v_proj"].impl.key == "avx512_int8"
        assert "model.layers.0.self_attn.q_proj" in five  # not fused with the int8 v_proj
        assert {"model.layers.1.self_attn.qkv_proj", "model.layers.1.mlp.down_proj"} <= five
        assert "model.embed_tokens.source" in five  # the Q5_1 embedding: rows gathered from the packed codes
    floats, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        got, want = fast(ids).float(), floats(ids)
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), float((got - want).abs().max())


@pytest.mark.parametrize("decode_rows", [1, 3])
def test_q5_decode_steps_match_the_int8_kernel(q5_file, decode_rows, monkeypatch):
    """The whole model's decode logits on the 5-bit kernel equal, bit for bit, those of the same file
    with every Q5 weight on the int8 kernel (the codes and scales are the same; so are the sums)."""
    if not kernels.runs_int5():
        pytest.skip("the 5-bit kernel needs qwenkit's C++ kernels (none built here)")
    from qwenkit.checkpoint import open_checkpoint
    from qwenkit.generate import LLM, tokenizer_for

    path, _ = q5_file
    five, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    monkeypatch.setattr(kernels, "runs_int5", lambda: False)
    monkeypatch.setenv("QWENKIT_PREPARED_CACHE", "off")  # not the 5-bit model prepared just before
    eight, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    keys = {n: m.impl.key for n, m in eight.named_modules() if getattr(m, "impl", None) is not None}
    assert "avx512_int5" not in keys.values(), keys
    tokenizer = tokenizer_for(open_checkpoint(path))
    prompts = ["hello world", "the cat sat", "a b c d"][:decode_rows]
    answers = []
    for model in (five, eight):
        llm = LLM(model, tokenizer, max_batch_size=decode_rows)
        params = llm.default_params(max_tokens=6, temperature=0.0)
        answers.append([out.token_ids for out in llm.generate(prompts, params)])
    assert answers[0] == answers[1]


def test_q5_kernel_gives_back_the_codes_and_rows_it_was_built_from(q5_file):
    """The 5-bit kernel keeps 5-bit codes but answers for the 8-bit codes it was given (Q5_0's q + 112
    on zero point 128 and Q5_1's q with its minimum alike): codes(), dequantize() and rows() are the
    AffineWeight's; codes outside 32 values are refused by name."""
    if not kernels.runs_int5():
        pytest.skip("the 5-bit kernel needs qwenkit's C++ kernels (none built here)")
    path, _ = q5_file
    loaded = dict(read_gguf(path).tensors(keep_quantized=True))
    for name in ("model.layers.0.mlp.up_proj.weight", "model.embed_tokens.weight",
                 "model.layers.1.mlp.down_proj.weight"):  # fmt: skip
        w = loaded[name]
        impl = build_kernel(w, CPU)
        assert impl.key == "avx512_int5", name
        assert torch.equal(impl.codes(), w.codes), name
        assert torch.equal(impl.dequantize(torch.float32), w.dequantize()), name
        ids = torch.tensor([3, 0, w.out_features - 1])
        assert torch.equal(impl.rows(ids, torch.float32), w.dequantize()[ids]), name
        padded_rows = -(-w.out_features // 16) * 16  # tiles of 16 rows
        assert impl.packed.codes.nbytes * 8 == padded_rows * w.in_features * 5, name  # 5 bits a code
    w = loaded["model.layers.0.mlp.up_proj.weight"]
    bad = AffineWeight(w.codes - 1, w.scale, w.shift, w.group_size, w.bits, q5_base=112)
    with pytest.raises(QuantizationError, match=r"5-bit weights must be codes in 112..143"):
        build_kernel(bad, CPU)
    shifted = AffineWeight(w.codes, w.scale, w.shift + w.scale, w.group_size, w.bits, q5_base=112)
    with pytest.raises(QuantizationError, match="5-bit codes from 112 need the zero point 128"):
        build_kernel(shifted, CPU)
