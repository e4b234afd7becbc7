"""GGUF blocks -> integer codes, scale and shift: ``codes * scale + shift`` equals gguf-py's dequantizer
bit for bit in float32 for every type decoded in precision, except the K types, whose sub-block scales
and shifts are rounded to float16 values (within 2^-11 of each term)."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf.constants import GGML_QUANT_SIZES

from qwenkit.checkpoint import gguf_quant
from qwenkit.checkpoint.gguf_quant import AFFINE_BITS, can_decode, decode_affine, take_rows
from qwenkit.kernels import available as kernels_available

Q = gguf.GGMLQuantizationType
QUANTIZABLE = (Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1)  # gguf-py writes these itself
HAND_BUILT = (Q.Q4_K, Q.Q5_K, Q.IQ4_NL, Q.IQ4_XS)  # gguf-py reads but cannot write: random, finite d
ROUNDED_SCALES = (Q.Q4_K, Q.Q5_K, Q.IQ4_XS)  # sub-block scales rounded to float16 values


def random_weight(out_f: int, in_f: int, seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    w = g.standard_normal((out_f, in_f)).astype(np.float32) * 0.05
    w[0, :32] = 0.0  # an all-zero block: d = 0
    w[1, :] += 0.3  # a row with a large offset: minimums matter
    return w


def random_k_blocks(qtype, out_f: int, in_f: int, seed: int) -> np.ndarray:
    """Random K-quant super-blocks (or IQ4 blocks): any bytes are valid codes, indices and 6-bit scales;
    d (and dmin) finite float16."""
    block, type_size = GGML_QUANT_SIZES[qtype]
    heads = 1 if qtype in (Q.IQ4_NL, Q.IQ4_XS) else 2  # d, or d and dmin
    g = np.random.default_rng(seed)
    n_blocks = out_f * in_f // block
    b = g.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d = (g.random((n_blocks, heads)) * 1e-2).astype(np.float16)
    d[0] = 0.0
    b[:, 0 : 2 * heads] = d.view(np.uint8).reshape(n_blocks, 2 * heads)
    return b.reshape(out_f, -1)


@pytest.fixture(params=["kernels", "numpy"])
def decoder(request, monkeypatch) -> str:
    """Decode through qwenkit's C++ kernels, or through the numpy decoders (the path without them)."""
    if request.param == "kernels" and not kernels_available():
        pytest.skip("the CPU kernels are not available here")
    if request.param == "numpy":
        monkeypatch.setattr(gguf_quant, "kernels_available", lambda: False)
    return request.param


@pytest.mark.parametrize("qtype", QUANTIZABLE + HAND_BUILT, ids=lambda q: q.name)
@pytest.mark.parametrize("shape", [(64, 256), (24, 768)])
def test_codes_times_scale_plus_shift_equals_gguf_dequantize(qtype, shape, decoder):
    out_f, in_f = shape
    if qtype in QUANTIZABLE:
        data = gguf.quants.quantize(random_weight(out_f, in_f, seed=out_f), qtype)
    else:
        data = random_k_blocks(qtype, out_f, in_f, seed=in_f)
    reference = torch.from_numpy(gguf.quants.dequantize(data, qtype).reshape(out_f, in_f))

    w = decode_affine(data, qtype, shape)

    assert w.codes.dtype == torch.uint8 and w.codes.shape == shape
    assert w.scale.shape == w.shift.shape == (in_f // 32, out_f) and w.scale.dtype == torch.float32
    assert w.group_size == 32 and w.bits == AFFINE_BITS[qtype]
    assert int(w.codes.max()) < 2**w.bits
    gi = torch.arange(in_f) // 32
    # the same through plain per-column arithmetic, independent of dequantize()'s reshaping
    plain = w.codes.float() * w.scale[gi].T + w.shift[gi].T
    if qtype in ROUNDED_SCALES:  # sub-block scales and shifts rounded to float16 values (2 bytes packed)
        assert torch.equal(w.scale, w.scale.half().float()) and torch.equal(w.shift, w.shift.half().float())
        bound = 2.0**-11 * (w.codes.float() * w.scale[gi].T.abs() + w.shift[gi].T.abs()) * (1 + 1e-6)
        assert ((w.dequantize() - reference).abs() <= bound).all()
        assert ((plain - reference).abs() <= bound).all()
        return
    assert torch.equal(w.dequantize(), reference)  # bit-exact, not within a tolerance
    assert torch.equal(plain, reference)


def test_q5_codes_use_the_fifth_bit():
    """Q5 codes reach 16..31 (the high bit decoded), else a wrong qh layout could still pass on zeros."""
    data = gguf.quants.quantize(random_weight(32, 256, seed=3), Q.Q5_1)
    codes = decode_affine(data, Q.Q5_1, (32, 256)).codes
    assert int(codes.max()) == 31 and int(codes.min()) == 0


@pytest.mark.parametrize("qtype", [Q.IQ4_NL, Q.IQ4_XS], ids=lambda q: q.name)
def test_iq4_codes_are_the_table_values_on_q8_0s_zero_point(qtype, decoder):
    """IQ4 indices pick int8 values from a table: the codes are exactly those values + 128 (every one of the
    16 present), the shift -128 times the scale, so the int8 kernels run them on Q8_0's zero point."""
    data = random_k_blocks(qtype, 32, 512, seed=7)
    w = decode_affine(data, qtype, (32, 512))
    table = [-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113]
    assert sorted(int(c) - 128 for c in w.codes.unique()) == table
    assert torch.equal(w.shift, -128 * w.scale)
    if qtype == Q.IQ4_XS:  # a 6-bit ls - 32 per sub-block: negative and zero scales occur
        assert (w.scale < 0).any() and (w.scale == 0).any() and (w.scale > 0).any()


def test_row_slices_keep_codes_and_scales_together():
    data = gguf.quants.quantize(random_weight(48, 64, seed=5), Q.Q4_1)
    w = decode_affine(data, Q.Q4_1, (48, 64))
    perm = torch.randperm(48, generator=torch.Generator().manual_seed(0))
    assert torch.equal(take_rows(w, perm).dequantize(), w.dequantize()[perm])
    assert torch.equal(take_rows(w, slice(16, 32)).dequantize(), w.dequantize()[16:32])


def test_types_without_an_exact_mapping_are_not_decoded():
    assert not can_decode(Q.Q6_K, (32, 256))  # groups of 16, 6-bit codes x 19-bit scales not exact
    assert not can_decode(Q.F16, (32, 256))
    assert not can_decode(Q.Q8_0, (2, 32, 256))  # stacked experts are decoded one (out, in) matrix at a time
    with pytest.raises(ValueError, match="cannot decode Q6_K"):
        decode_affine(np.zeros((32, 210), np.uint8), Q.Q6_K, (32, 256))


def random_q6_k_blocks(out_f: int, in_f: int, seed: int) -> np.ndarray:
    """Random Q6_K blocks (any bytes are valid codes and int8 sub-scales) with finite float16 d, among them
    a zero d (every weight 0: the scale's float16 floor), a subnormal one and the largest sub-scales."""
    _, type_size = GGML_QUANT_SIZES[Q.Q6_K]
    g = np.random.default_rng(seed)
    n_blocks = out_f * in_f // 256
    b = g.integers(0, 256, size=(n_blocks, type_size), dtype=np.uint8)
    d = (g.random(n_blocks) * 1e-3).astype(np.float16)
    d[0], d[1] = 0.0, 1e-7
    b[2, 192:208] = np.array([127, -128] * 8, dtype=np.int8).view(np.uint8)
    b[:, 208:210] = d.view(np.uint8).reshape(n_blocks, 2)
    return b.reshape(out_f, -1)


@pytest.mark.parametrize("shape", [(4, 256), (37, 768), (256, 1536)])
def test_q6_k_requantized_by_the_kernels_equals_gguf_pys_floats_rounded(shape):
    """The kernels' one-pass Q6_K load gives requantize_int8's codes and scales, bit for bit."""
    from qwenkit.checkpoint.gguf_quant import requantize_int8, requantize_q6_k
    from qwenkit.kernels import available

    if not available():
        pytest.skip("the CPU kernels are not available here: Q6_K takes the gguf-py path")
    data = random_q6_k_blocks(*shape, seed=shape[0])
    floats = torch.from_numpy(gguf.quants.dequantize(data, Q.Q6_K).reshape(shape))
    want = requantize_int8(floats)
    got = requantize_q6_k(data, shape)
    assert torch.equal(got.codes, want.codes)
    assert torch.equal(got.scale, want.scale) and torch.equal(got.shift, want.shift)
    assert (got.group_size, got.bits) == (want.group_size, want.bits) == (32, 8)
    assert got.codes[0, :32].eq(128).all() and got.scale[0, 0] == 2**-14  # the zero block
    # and the codes are the weights within half a step of their group
    deq = (got.codes.float() - 128) * got.scale.T.repeat_interleave(32, dim=1)
    assert ((deq - floats).abs() <= got.scale.T.repeat_interleave(32, dim=1) / 2).all()


@pytest.mark.parametrize("shape", [(4, 256), (37, 768), (256, 1536)])
def test_q6_k_decoded_exactly_for_the_q6_k_kernel(shape):
    """Where the Q6_K kernel runs, Q6_K loads as the file holds it: codes 0..63 on zero point 32, scales
    d x an int8 per 16 inputs with d kept beside them, and codes x scale + shift is gguf-py's float for
    every weight, bit for bit (a zero d, a subnormal one and the largest sub-scales among them)."""
    from qwenkit import kernels
    from qwenkit.checkpoint.gguf_quant import decode_q6_k

    if not kernels.runs_q6_k():
        pytest.skip("the Q6_K kernel needs qwenkit's C++ kernels (none built here)")
    data = random_q6_k_blocks(*shape, seed=shape[0])
    floats = torch.from_numpy(gguf.quants.dequantize(data, Q.Q6_K).reshape(shape))
    w = decode_q6_k(data, shape)
    assert (w.bits, w.group_size, w.codes.dtype) == (8, 16, torch.uint8) and int(w.codes.max()) <= 63
    assert torch.equal(w.dequantize(), floats)
    assert torch.equal(w.shift, -32 * w.scale)
    d = w.superscale.repeat_interleave(16, dim=0)
    blocks = data.reshape(-1, 210)
    assert torch.equal(
        w.superscale.T.reshape(-1),
        torch.from_numpy(blocks[:, 208:210].copy().view(np.float16)).float().reshape(-1),
    )
    sub = torch.from_numpy(blocks[:, 192:208].copy().view(np.int8)).reshape(shape[0], -1).T.float()
    assert torch.equal(w.scale, d * sub)


def test_q6_k_loads_through_the_kernels_with_the_reference_values(tmp_path, gguf_writer, monkeypatch):
    """Where the Q6_K kernel does not run, a file with a Q6_K projection loads to the same int8 codes
    whether the kernels requantize it or the gguf-py path does (the kernels switched off for that one
    call)."""
    from factories import hf_model
    from gguf_files import tiny_vocab

    from qwenkit import kernels
    from qwenkit.checkpoint import gguf as gguf_module
    from qwenkit.checkpoint import gguf_quant
    from qwenkit.checkpoint.gguf import read_gguf

    if not kernels.available():
        pytest.skip("the CPU kernels are not available here")
    model = hf_model(
        "qwen2", vocab_size=len(tiny_vocab()[0]), hidden_size=256, intermediate_size=512, num_hidden_layers=1
    )
    state = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("down_proj.weight")}
    down = model.model.layers[0].mlp.down_proj.weight
    blocks = random_q6_k_blocks(down.shape[0], down.shape[1], seed=5)

    def q6k_tensor(w: gguf.GGUFWriter) -> None:
        w.add_tensor("blk.0.ffn_down.weight", blocks, raw_dtype=Q.Q6_K)

    path = gguf_writer(tmp_path / "q6k.gguf", "qwen2", model.config.to_dict(), state, Q.F16, extra=q6k_tensor)

    def down_weight():
        return dict(read_gguf(path).tensors(keep_quantized=True))["model.layers.0.mlp.down_proj.weight"]

    monkeypatch.setattr(kernels, "runs_q6_k", lambda: False)  # as on the AVX2 builds
    calls = []
    real = gguf_module.requantize_q6_k
    monkeypatch.setattr(gguf_module, "requantize_q6_k", lambda *a: calls.append(1) or real(*a))
    fast = down_weight()
    assert calls == [1]  # the kernels' pass did the work
    monkeypatch.setattr(gguf_quant, "kernels_available", lambda: False)
    slow = down_weight()
    assert calls == [1]
    assert torch.equal(fast.codes, slow.codes) and torch.equal(fast.scale, slow.scale)


@pytest.mark.parametrize("qtype", QUANTIZABLE + HAND_BUILT, ids=lambda q: q.name)
def test_the_kernels_decode_any_bytes_as_numpy_does(qtype, monkeypatch):
    """Random bytes in every field (K types: d and dmin from tiny to past float16's range, so sub-block
    scales overflow float16 or fall below its normal range and stay float32): the C++ decoder's codes,
    scales and shifts are the numpy decoders', bit for bit."""
    if not kernels_available():
        pytest.skip("the CPU kernels are not available here")
    block, type_size = GGML_QUANT_SIZES[qtype]
    out_f, in_f = 40, 4 * 256
    g = np.random.default_rng(int(qtype))
    data = g.integers(0, 256, size=(out_f * in_f // block, type_size), dtype=np.uint8)
    n = data.shape[0]
    heads = 2 if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0, Q.IQ4_NL, Q.IQ4_XS) else 4  # bytes of float16 d (and min)
    values = (g.standard_normal((n, heads // 2)) * 10.0 ** g.integers(-9, 5, (n, heads // 2))).astype(
        np.float16
    )
    values[:4] = (
        [[0.0], [6e4], [-6e4], [1e-7]][:4]
        if heads == 2
        else [[0.0, 0.0], [6e4, 6e4], [-1.0, 3e4], [1e-7, -1e-6]]
    )
    data[:, :heads] = values.view(np.uint8).reshape(n, heads)
    fast = decode_affine(data, qtype, (out_f, in_f))
    monkeypatch.setattr(gguf_quant, "kernels_available", lambda: False)
    slow = decode_affine(data, qtype, (out_f, in_f))
    assert torch.equal(fast.codes, slow.codes)
    assert torch.equal(fast.scale, slow.scale) and torch.equal(fast.shift, slow.shift)
    assert fast.scale.is_contiguous() and fast.shift.is_contiguous() and fast.codes.is_contiguous()
