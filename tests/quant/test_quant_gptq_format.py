"""AutoGPTQ layout: an independent replay of AutoGPTQ's ``pack()`` unpacks to exactly the known weights."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from qwenkit.quant.gptq_format import GPTQConfig, IntWeight, QuantizationError, pack_gptq, unpack_gptq


def autogptq_pack(
    q: np.ndarray, zeros: np.ndarray, bits: int, v1: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """AutoGPTQ ``QuantLinear.pack()`` re-done with numpy loops from integer codes.

    q: (out, in) codes; zeros: (G, out) true zero points. Returns int32 qweight (in*bits/32, out) and
    qzeros (G, out*bits/32); the "gptq" (v1) format stores zero - 1.
    """
    per = 32 // bits
    intweight = q.T.astype(np.uint32)  # (in, out)
    qweight = np.zeros((intweight.shape[0] // per, intweight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per):
            qweight[row] |= intweight[row * per + j] << np.uint32(bits * j)
    z = (zeros.astype(np.int64) - (1 if v1 else 0)).astype(np.uint32)
    qzeros = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per):
            qzeros[:, col] |= z[:, col * per + j] << np.uint32(bits * j)
    return qweight.view(np.int32), qzeros.view(np.int32)


def _case(
    bits: int, act_order: bool, sym: bool, out_f: int = 48, in_f: int = 256, gs: int = 64, seed: int = 0
):
    g = torch.Generator().manual_seed(seed)
    maxq = 2**bits - 1
    n_groups = in_f // gs
    q = torch.randint(0, maxq + 1, (out_f, in_f), generator=g)
    if sym:
        zeros = torch.full((n_groups, out_f), (maxq + 1) // 2)
    else:
        zeros = torch.randint(1, maxq + 1, (n_groups, out_f), generator=g)  # AutoGPTQ v1 cannot store zero 0
    scales = (torch.rand(n_groups, out_f, generator=g) * 0.02 + 0.001).half()
    g_idx = torch.arange(in_f) // gs
    if act_order:
        g_idx = g_idx[torch.randperm(in_f, generator=g)]
    return q, zeros, scales, g_idx.to(torch.int32)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_unpack_matches_autogptq_pack(bits: int, act_order: bool, sym: bool) -> None:
    q, zeros, scales, g_idx = _case(bits, act_order, sym)
    qweight, qzeros = autogptq_pack(q.numpy(), zeros.numpy(), bits)
    w = unpack_gptq(torch.from_numpy(qweight), torch.from_numpy(qzeros), scales, g_idx, bits)
    gi = g_idx.long()
    expected = scales.float()[gi].T * (q.float() - zeros.float()[gi].T)  # (out, in)
    assert torch.equal(w.qweight.long(), q)
    assert torch.equal(w.zeros.long(), zeros)
    assert torch.equal(w.dequantize(), expected)
    # and our packer writes the same words
    ours = pack_gptq(w)
    assert torch.equal(ours["qweight"], torch.from_numpy(qweight))
    assert torch.equal(ours["qzeros"], torch.from_numpy(qzeros))


def test_gptq_v2_has_no_zero_offset() -> None:
    q, zeros, scales, g_idx = _case(4, False, False)
    zeros[0, 0] = 0  # representable in v2 only
    qweight, qzeros = autogptq_pack(q.numpy(), zeros.numpy(), 4, v1=False)
    w = unpack_gptq(torch.from_numpy(qweight), torch.from_numpy(qzeros), scales, g_idx, 4, "gptq_v2")
    assert torch.equal(w.zeros.long(), zeros)
    assert torch.equal(pack_gptq(w, "gptq_v2")["qzeros"], torch.from_numpy(qzeros))


def gptqmodel_v1_qzeros(zeros: np.ndarray, bits: int) -> np.ndarray:
    """GPTQModel's v1 qzeros (``convert_gptq_v2_to_v1_format_module``): the true zeros packed as v2, then
    0x11111111 (4-bit) / 0x01010101 (8-bit) subtracted from each uint32 word, borrows and all."""
    per = 32 // bits
    z = zeros.astype(np.uint32)
    words = np.zeros((z.shape[0], z.shape[1] // per), dtype=np.uint32)
    for col in range(words.shape[1]):
        for j in range(per):
            words[:, col] |= z[:, col * per + j] << np.uint32(bits * j)
    ones = np.uint32(sum(1 << (bits * j) for j in range(per)))
    return (words - ones).view(np.int32)  # uint32 arithmetic wraps, as the int32 tensor op does


@pytest.mark.parametrize("bits", [4, 8])
def test_asymmetric_zero_point_0_reads_as_gptqmodel_writes_it(bits: int) -> None:
    """An asymmetric group whose weights are all >= 0 has zero point 0, which the "gptq" format's -1 turns
    into a borrow from the next code of the word (GPTQModel, and so transformers + optimum, subtract per
    word). Masking each code on its own read the next zero one too low, and wrote files that
    transformers read one too high: zeros [0, 5] came back [0, 4]."""
    q, zeros, scales, g_idx = _case(bits, False, False)
    zeros[0, :8] = 0  # a whole word of zero points 0, and single ones before non-zero neighbours
    zeros[1, 3] = 0
    zeros[2, 7] = 0
    zeros[3, -1] = 0  # the last code of the last word: its borrow leaves the word
    qzeros = torch.from_numpy(gptqmodel_v1_qzeros(zeros.numpy(), bits))
    qweight = torch.from_numpy(autogptq_pack(q.numpy(), zeros.numpy(), bits)[0])
    w = unpack_gptq(qweight, qzeros, scales, g_idx, bits)
    assert torch.equal(w.zeros.long(), zeros)
    assert torch.equal(pack_gptq(w)["qzeros"], qzeros)


@pytest.mark.parametrize(("bits", "word"), [(4, 0x77777777), (8, 0x7F7F7F7F)])
def test_symmetric_qzeros_words(bits: int, word: int) -> None:
    """qwen_facts §9.5: symmetric checkpoints hold 0x77777777 (4-bit) / 0x7F7F7F7F (8-bit) in qzeros."""
    q, zeros, scales, g_idx = _case(bits, False, True)
    packed = pack_gptq(IntWeight(q.to(torch.uint8), scales, zeros.to(torch.int16), g_idx, bits))
    assert bool((packed["qzeros"] == word).all())
    assert packed["qweight"].shape == (256 * bits // 32, 48)
    assert packed["qzeros"].shape == (4, 48 * bits // 32)


def test_config_reading(tmp_path) -> None:
    qwen = {
        "bits": 4,
        "group_size": 128,
        "damp_percent": 0.01,
        "desc_act": False,
        "static_groups": False,
        "sym": True,
        "true_sequential": True,
        "model_name_or_path": None,
        "model_file_base_name": "model",
    }
    (tmp_path / "quantize_config.json").write_text(json.dumps(qwen))
    cfg = GPTQConfig.from_model_dir(tmp_path)
    assert (cfg.bits, cfg.group_size, cfg.desc_act, cfg.sym, cfg.checkpoint_format) == (
        4,
        128,
        False,
        True,
        "gptq",
    )
    v2 = GPTQConfig.from_dict({**qwen, "bits": 8, "desc_act": True, "checkpoint_format": "gptq_v2"})
    assert (v2.bits, v2.desc_act, v2.checkpoint_format) == (8, True, "gptq_v2")
    assert GPTQConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"bits": 3}, "bits=3 is not supported"),
        ({"bits": 4, "group_size": 0}, "group_size=0 must be -1"),
        ({"bits": 4, "checkpoint_format": "marlin"}, "checkpoint_format='marlin' is not supported"),
        ({"bits": 4, "quant_method": "awq"}, "quant_method 'awq' is not supported"),
        ({"group_size": 128}, "has no 'bits'"),
        ({"bits": 4, "lm_head": True}, "quantized lm_head"),
        # a hand-edited or corrupt file: one line naming the field, not int()'s traceback
        ({"bits": "four"}, "bits='four' must be an integer"),
        ({"bits": None}, "has no 'bits'"),
        ({"bits": 4, "pack_dtype": "int64"}, "pack_dtype='int64' is not supported; qwenkit reads int32"),
        ({"bits": 4.5}, r"bits=4\.5 must be an integer"),
        ({"bits": 4, "group_size": "128g"}, "group_size='128g' must be an integer"),
        ({"bits": 4, "damp_percent": "low"}, "damp_percent='low' must be a number"),
        ({"bits": 4, "dynamic": {"+:.*q_proj": {"bits": "x"}}}, r"dynamic\['\+:\.\*q_proj'\]: GPTQ bits='x'"),
        # a string "false" was truthy: sym or desc_act read as true
        ({"bits": 4, "sym": "false"}, r"^GPTQ sym='false' must be true or false \(a JSON boolean\)$"),
        ({"bits": 4, "desc_act": "false"}, "GPTQ desc_act='false' must be true or false"),
        ({"bits": 4, "static_groups": "true"}, "GPTQ static_groups='true' must be true or false"),
        ({"bits": 4, "true_sequential": 1}, "GPTQ true_sequential=1 must be true or false"),
        ({"bits": 4, "lm_head": "false"}, "GPTQ lm_head='false' must be true or false"),
    ],
)
def test_config_rejects(cfg: dict, message: str) -> None:
    with pytest.raises(QuantizationError, match=message):
        GPTQConfig.from_dict(cfg)


def test_null_optional_fields_take_their_defaults() -> None:
    cfg = GPTQConfig.from_dict({"bits": 8, "group_size": None, "damp_percent": None, "pack_dtype": "int32"})
    assert (cfg.bits, cfg.group_size, cfg.damp_percent) == (8, 128, 0.01)
    flags = GPTQConfig.from_dict({"bits": 4, "sym": None, "desc_act": None, "true_sequential": None})
    assert (flags.sym, flags.act_order, flags.true_sequential) == (True, "none", True)
    dyn = GPTQConfig.from_dict({"bits": 4, "dynamic": {"+:.*q_proj": {"bits": 8, "group_size": None}}})
    assert (dyn.for_layer("model.layers.0.self_attn.q_proj").bits, dyn.for_layer("x").bits) == (8, 4)


def test_mismatched_shapes_are_named() -> None:
    q, zeros, scales, g_idx = _case(4, False, True)
    qweight, qzeros = (torch.from_numpy(a) for a in autogptq_pack(q.numpy(), zeros.numpy(), 4))
    with pytest.raises(QuantizationError, match=r"scales shape \(4, 40\) does not match qweight \(32, 48\)"):
        unpack_gptq(qweight, qzeros, scales[:, :40], g_idx, 4)
    with pytest.raises(QuantizationError, match=r"qzeros shape \(4, 5\) does not match"):
        unpack_gptq(qweight, qzeros[:, :5], scales, g_idx, 4)
    with pytest.raises(QuantizationError, match=r"g_idx shape \(255,\) does not match"):
        unpack_gptq(qweight, qzeros, scales, g_idx[:255], 4)
    with pytest.raises(QuantizationError, match=r"g_idx values must lie in 0\.\.3"):
        unpack_gptq(qweight, qzeros, scales, g_idx + 1, 4)
    with pytest.raises(QuantizationError, match="must be int32"):
        unpack_gptq(qweight.float(), qzeros, scales, g_idx, 4)
