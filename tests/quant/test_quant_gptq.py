"""GPTQ: lower output error than RTN on correlated inputs; quantize -> AutoGPTQ files -> load is exact."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from qwenkit.config import ModelConfig
from qwenkit.model import Transformer
from qwenkit.quant import (
    GPTQConfig,
    IntWeight,
    QuantizationError,
    QuantizedLinear,
    calibration_token_ids,
    gptq_quantize_model,
    gptq_quantize_weight,
    quantize_weight_rtn,
    save_gptq,
)
from qwenkit.quant.gptq import HessianAccumulator
from qwenkit.quant.quantizer import find_params, quantize_codes, round_scale


def _correlated_inputs(tokens: int, dim: int, seed: int = 0) -> torch.Tensor:
    """Activations that live near a low-rank subspace with a few loud channels, like real hidden states."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.randn(8, dim, generator=g)
    x = torch.randn(tokens, 8, generator=g) @ basis + 0.1 * torch.randn(tokens, dim, generator=g)
    return x * (1 + 4 * (torch.arange(dim) % 17 == 0))


@pytest.mark.parametrize(
    ("gs", "sym", "act_order"),
    [(32, True, "none"), (64, False, "dynamic"), (64, True, "static"), (-1, True, "dynamic")],
)
def test_gptq_beats_rtn_on_layer_output(gs: int, sym: bool, act_order: str) -> None:
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = _correlated_inputs(512, 128)
    acc = HessianAccumulator(128, x.device)
    acc.add(x)
    gptq = gptq_quantize_weight(w, acc.hessian, 4, gs, sym, act_order=act_order)
    rtn = quantize_weight_rtn(w, 4, gs, sym)
    ref = x @ w.T
    err_gptq = (x @ gptq.dequantize().T - ref).norm()
    err_rtn = (x @ rtn.dequantize().T - ref).norm()
    assert err_gptq < 0.8 * err_rtn, (float(err_gptq), float(err_rtn))
    if act_order == "dynamic" and gs != -1:
        assert not torch.equal(gptq.g_idx.sort().values, gptq.g_idx)  # g_idx really is act-order
    else:
        assert torch.equal(gptq.g_idx.sort().values, gptq.g_idx)
    # every group has group_size columns, as AutoGPTQ writes them
    assert torch.bincount(gptq.g_idx.long()).unique().numel() == 1


def _reference_static_gptq(
    w: torch.Tensor, hessian: torch.Tensor, bits: int, gs: int, order: torch.Tensor, damp: float = 0.01
) -> IntWeight:
    """Textbook GPTQ in float64, one column at a time in ``order``, written independently of qwenkit's.

    Each group's grid is fixed up front from the original weights, in file order (static groups). After a
    column is rounded its error goes to the other columns through the inverse Hessian, which is then
    downdated to forget that column (the OBS step) instead of qwenkit's blocked Cholesky form.
    """
    W = w.double().clone()
    H = hessian.double().clone()
    H += damp * H.diagonal().mean() * torch.eye(H.shape[0], dtype=H.dtype)
    Hinv = torch.linalg.inv(H)
    n_groups = W.shape[1] // gs
    grids = [find_params(W[:, g * gs : (g + 1) * gs], bits, True) for g in range(n_groups)]
    scales = torch.stack([round_scale(s) for s, _ in grids])
    zeros = torch.stack([z for _, z in grids])
    codes = torch.zeros_like(W)
    for c in order.tolist():
        s, z = scales[c // gs], zeros[c // gs]
        codes[:, c] = quantize_codes(W[:, c], s, z, bits)
        err = (W[:, c] - s * (codes[:, c] - z)) / Hinv[c, c]
        W -= err[:, None] * Hinv[c][None, :]
        Hinv -= Hinv[:, c : c + 1] @ Hinv[c : c + 1, :] / Hinv[c, c]
    g_idx = (torch.arange(W.shape[1]) // gs).to(torch.int32)
    return IntWeight(codes.to(torch.uint8), scales, zeros.to(torch.int16), g_idx, bits)


def test_static_act_order_equals_reference_gptq() -> None:
    """Static act-order: columns visited by decreasing diag(H), groups and their grids in file order."""
    torch.manual_seed(0)
    w = (torch.randn(48, 256) * 0.05).double()
    x = _correlated_inputs(1024, 256, seed=3).double()
    hessian = 2 * x.T @ x / x.shape[0]
    got = gptq_quantize_weight(w, hessian, 4, 64, True, act_order="static")
    assert torch.equal(got.g_idx, (torch.arange(256) // 64).to(torch.int32))  # monotone, file order

    act_order = torch.argsort(hessian.diagonal(), descending=True)
    want = _reference_static_gptq(w, hessian, 4, 64, act_order)
    assert torch.equal(got.scales.double(), want.scales.double())
    assert torch.equal(got.zeros, want.zeros)
    assert torch.equal(got.qweight, want.qweight)
    assert torch.equal(got.dequantize(torch.float64), want.dequantize(torch.float64))

    # the order matters: file order gives other codes and a larger output error on these inputs
    natural = _reference_static_gptq(w, hessian, 4, 64, torch.arange(256))
    assert not torch.equal(natural.qweight, want.qweight)
    ref = x @ w.T
    assert (x @ got.dequantize(torch.float64).T - ref).norm() < (
        x @ natural.dequantize(torch.float64).T - ref
    ).norm()


def test_gptq_rejects_mismatched_hessian() -> None:
    with pytest.raises(
        QuantizationError, match=r"Hessian shape \(64, 64\) does not match weight \(32, 128\)"
    ):
        gptq_quantize_weight(torch.randn(32, 128), torch.eye(64), 4)


TINY = {
    "model_type": "qwen2",
    "architectures": ["Qwen2ForCausalLM"],
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}


def _tiny_model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(ModelConfig.from_hf(TINY))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
        for layer in model.model.layers:
            layer.input_layernorm.weight.fill_(1)
            layer.post_attention_layernorm.weight.fill_(1)
        model.model.norm.weight.fill_(1)
        for p in model.parameters():
            p.copy_(p.half().float())  # AutoGPTQ files keep float tensors in float16
    return model.eval()


@pytest.mark.parametrize(
    "config",
    [
        GPTQConfig(bits=4, group_size=32, act_order="dynamic", sym=False),
        GPTQConfig(bits=4, group_size=32, act_order="static", sym=True),
        GPTQConfig(bits=8, group_size=64, act_order="none", sym=True),
    ],
    ids=["int4-dynamic-asym", "int4-static", "int8-sym"],
)
def test_round_trip_through_autogptq_files(tmp_path, config: GPTQConfig) -> None:
    from qwenkit.checkpoint import load_model

    model = _tiny_model()
    calib = torch.randint(0, 256, (4, 48), generator=torch.Generator().manual_seed(1))
    gptq_quantize_model(model, calib, config, progress=False)
    quantized = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert len(quantized) == 2 * 7 and "lm_head" not in quantized

    save_gptq(model, tmp_path, config, TINY)
    qcfg = json.loads((tmp_path / "quantize_config.json").read_text())
    assert qcfg["bits"] == config.bits and qcfg["desc_act"] == (config.act_order == "dynamic")
    assert qcfg["static_groups"] == (config.act_order == "static")
    assert qcfg["meta"]["act_order"] == config.act_order
    assert GPTQConfig.from_model_dir(tmp_path) == config
    g_idx = {k: t for k, t in load_file(tmp_path / "model.safetensors").items() if k.endswith(".g_idx")}
    assert len(g_idx) == 2 * 7
    for name, g in g_idx.items():  # only dynamic act-order permutes g_idx; static keeps file-order groups
        monotone = bool((g[1:] >= g[:-1]).all())
        assert monotone == (config.act_order != "dynamic"), name
    assert json.loads((tmp_path / "config.json").read_text())["quantization_config"]["quant_method"] == "gptq"

    loaded, _ = load_model(tmp_path, dtype=torch.float32, progress=False)
    ids = torch.randint(0, 256, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got = model(ids), loaded(ids)
    for name, layer in quantized.items():
        other = loaded.get_submodule(name)
        assert isinstance(other, QuantizedLinear)
        assert torch.equal(other.weight_dequantized(), layer.weight_dequantized()), name
        assert other.kernel == layer.kernel
    assert torch.equal(got, want)


def test_gptq_model_close_to_float() -> None:
    model = _tiny_model()
    ids = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids)
    gptq_quantize_model(
        model, torch.randint(0, 256, (4, 48)), GPTQConfig(bits=8, group_size=-1), progress=False
    )
    with torch.no_grad():
        err = (model(ids) - ref).norm() / ref.norm()
    assert err < 0.02


def test_default_calibration_text_is_offline_prose() -> None:
    windows = calibration_token_ids(lambda s: list(s.encode()), n_samples=8, seq_len=64)
    assert len(windows) == 8 and all(len(w) == 64 for w in windows)
    assert b"the" in bytes(windows[0] + windows[1] + windows[2])


def test_calibration_windows_start_as_prompts_do() -> None:
    """With a BOS-wanting tokenizer every window is BOS + text, still ``seq_len`` long, and the text runs
    on from window to window (no token skipped or repeated); without start ids the windows are plain text."""
    tokenize = lambda s: list(s.encode())  # noqa: E731
    text = bytes(range(32, 127)).decode() * 3
    plain = calibration_token_ids(tokenize, n_samples=100, seq_len=16, text=text)
    bos = calibration_token_ids(tokenize, n_samples=100, seq_len=16, text=text, start_ids=[1])
    assert all(len(w) == 16 for w in plain[:-1] + bos[:-1])  # fewer than 100: the last one is the tail
    assert all(w[0] == 1 and 1 not in w[1:] for w in bos)
    assert b"".join(bytes(w[1:]) for w in bos) == text.encode()
    assert b"".join(bytes(w) for w in plain) == text.encode()
    assert calibration_token_ids(tokenize, seq_len=16, text="short", start_ids=[1]) == [[1, *b"short"]]


def test_a_text_of_fewer_windows_than_asked_is_used_whole() -> None:
    """2.5 windows of text and 32 asked for: the half window at its end is calibrated on too (it was
    dropped, and the note then said the text held only the full windows' tokens)."""
    tokenize = lambda s: list(s.encode())  # noqa: E731
    text = "abcdefghij" * 4  # 40 tokens, windows of 15 after the start id
    windows = calibration_token_ids(tokenize, n_samples=32, seq_len=16, text=text, start_ids=[1])
    assert [len(w) for w in windows] == [16, 16, 11]
    assert b"".join(bytes(w[1:]) for w in windows) == text.encode()
    two = calibration_token_ids(tokenize, n_samples=2, seq_len=16, text=text, start_ids=[1])
    assert [len(w) for w in two] == [16, 16]  # enough full windows: none shorter
