"""GGUF files in IQ4_NL and IQ4_XS (llama.cpp's non-linear 4-bit types, common for Qwen GGUFs): their
4-bit indices pick values from a fixed int8 table, so they load as int8 codes holding exactly those values
(marked ``iq4``); the IQ4 kernel holds them as 4-bit indices again and looks them up in the int4 tile
(the int8 kernels run them where it is switched off); a decode step's layers are one
``kernels.decode_layers`` call each, and the model answers as the file's float weights do."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from factories import hf_model
from gguf.quants import dequantize
from gguf_files import tiny_vocab, write_quantized_qwen2
from test_gguf_quant import random_k_blocks

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import read_gguf
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.affine import AffineWeight

Q = gguf.GGMLQuantizationType


@pytest.fixture(scope="module")
def iq4_file(tmp_path_factory) -> tuple:
    """A 2-layer Qwen2 whose projections are random IQ4_XS blocks (layer 0) and IQ4_NL (layer 1), and
    whose token embedding is IQ4_NL; norms stay F32, as llama.cpp writes them."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]), hidden_size=256, intermediate_size=512,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip

    def blocks_for(name: str, weight: torch.Tensor, seed: int) -> tuple[np.ndarray, Q]:
        layer = 1 if name == "model.embed_tokens.weight" else int(name.split(".")[2])
        qtype = Q.IQ4_XS if layer == 0 else Q.IQ4_NL
        return random_k_blocks(qtype, *weight.shape, seed=seed), qtype

    return write_quantized_qwen2(tmp_path_factory.mktemp("iq4") / "iq4.gguf", model, blocks_for)


def test_iq4_weights_load_as_int8_codes_with_the_files_values(iq4_file):
    path, blocks = iq4_file
    types = read_gguf(path).tensor_types
    assert types["blk.0.attn_q.weight"] == "IQ4_XS" and types["blk.1.ffn_down.weight"] == "IQ4_NL"
    assert types["token_embd.weight"] == "IQ4_NL"
    loaded = dict(read_gguf(path).tensors(keep_quantized=True))
    for name, (data, qtype) in blocks.items():
        w = loaded[name]
        assert isinstance(w, AffineWeight) and (w.bits, w.group_size) == (8, 32), name
        want = torch.from_numpy(dequantize(data, qtype).reshape(w.codes.shape))
        got = w.dequantize()
        if qtype == Q.IQ4_NL:  # d is a float16: the values exactly
            assert torch.equal(got, want), name
        else:  # IQ4_XS's d * (ls - 32) rounded to a float16 value: within 2^-11 of each weight
            assert ((got - want).abs() <= want.abs() * 2.0**-11 * (1 + 1e-6)).all(), name


def test_iq4_model_runs_on_the_kernels_and_answers_as_its_floats(iq4_file):
    path, _ = iq4_file
    fast, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    linears = [m for m in fast.modules() if isinstance(m, QuantizedLinear)]
    assert linears and all(m.bits == 8 for m in linears)
    if kernels.available():  # per layer q/k/v, o, gate/up, down; and the head (tied to the embedding)
        assert len(linears) == 2 * 4 + 1 and all(m.kernel.startswith("qwenkit ") for m in linears)
        assert all(layer.decode_weights is not None for layer in fast.model.layers)
    if kernels.runs_iq4_table():  # held at 4 bits, looked up in the table by the int4 tile
        assert all(m.impl.key == "avx512_iq4" and m.impl.packed.bits == 4 for m in linears)
        assert all("IQ4 table" in m.kernel for m in linears)
    floats, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        got, want = fast(ids).float(), floats(ids)
    # bf16 activations rounded to int8 per block of 32 against float32 (the Q6_K mix measured 2.3%)
    assert (got - want).abs().max() <= 0.05 * want.abs().max(), float((got - want).abs().max())


def test_iq4_kernel_gives_back_the_codes_and_rows_it_was_built_from(iq4_file):
    """The IQ4 kernel keeps 4-bit indices but answers for the 8-bit codes it was given: codes(),
    dequantize() and rows() are the AffineWeight's; codes outside the table are refused by name."""
    from qwenkit.quant.gptq_format import QuantizationError
    from qwenkit.quant.kernels import build_kernel

    if not kernels.runs_iq4_table():
        pytest.skip("the IQ4 kernel needs qwenkit's C++ kernels (none built here)")
    path, _ = iq4_file
    w = dict(read_gguf(path).tensors(keep_quantized=True))["model.layers.0.mlp.up_proj.weight"]
    assert w.iq4
    impl = build_kernel(w, torch.device("cpu"))
    assert impl.key == "avx512_iq4"
    assert torch.equal(impl.codes(), w.codes)
    assert torch.equal(impl.dequantize(torch.float32), w.dequantize())
    ids = torch.tensor([3, 0, w.out_features - 1])
    assert torch.equal(impl.rows(ids, torch.float32), w.dequantize()[ids])
    assert impl.packed.codes.nbytes * 2 == w.codes.nbytes  # half the bytes of int8 codes
    # a weight past one lookup chunk (2M codes: the lookup runs ~1M at a time), its last row included
    g = torch.Generator().manual_seed(0)
    table = kernels.iq4_codes(torch.arange(16))
    big_codes = table[torch.randint(0, 16, (1024, 2048), generator=g)]
    big_scale = torch.rand(2048 // 32, 1024, generator=g).half().float()
    big = AffineWeight(big_codes, big_scale, -128 * big_scale, 32, 8, iq4=True)
    assert torch.equal(build_kernel(big, torch.device("cpu")).codes(), big_codes)
    bad = AffineWeight(w.codes ^ 1, w.scale, w.shift, w.group_size, w.bits, iq4=True)
    with pytest.raises(QuantizationError, match="codes of the IQ4 table's values"):
        build_kernel(bad, torch.device("cpu"))
