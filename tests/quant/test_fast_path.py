"""The CPU kernels' fast path end to end: packed bf16 layers and the int kernels keep the engine's invariants.

Each op is checked against plain PyTorch in tests/kernels; here the layers built from them are checked
inside models: against the plain path within bf16/int8-activation rounding, and for exact batch
invariance (every kernel computes each row on its own, for any number of rows).
"""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, run_engine, save_hf

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.dense import PackedBf16Embedding, PackedBf16Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")


@pytest.fixture(scope="module")
def path(tmp_path_factory):
    return save_hf(hf_model("qwen2", tie_word_embeddings=True), tmp_path_factory.mktemp("fast") / "m")


def test_packed_bf16_linear_matches_torch() -> None:
    g = torch.Generator().manual_seed(0)
    w = (torch.randn(131, 96, generator=g) * 0.05).bfloat16()
    b = torch.randn(131, generator=g).bfloat16()
    layer = PackedBf16Linear(w, b)
    for rows in (1, 3, 40):
        x = torch.randn(rows, 96, generator=g).bfloat16()
        ref = x.float() @ w.float().T + b.float()
        torch.testing.assert_close(layer(x).float(), ref, rtol=2**-7, atol=2e-3)
    ids = torch.tensor([0, 15, 16, 130])
    assert torch.equal(layer.rows(ids), w[ids])
    assert torch.equal(layer.unpacked(), w)


def test_fast_model_matches_plain(path) -> None:
    plain, _ = load_model(path, dtype="bfloat16", progress=False)
    fast, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    packed = [m for m in fast.modules() if isinstance(m, PackedBf16Linear)]
    # per layer fused q/k/v, o, fused gate/up and down (quant.fused); and the head
    assert len(packed) == 2 * 4 + 1
    emb = fast.model.embed_tokens
    assert isinstance(emb, PackedBf16Embedding) and emb.source is fast.lm_head  # one copy, tied
    ids = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(emb(ids), plain.model.embed_tokens(ids))
    with torch.no_grad():
        want, got = plain(ids).float(), fast(ids).float()
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9


PROMPTS = [list(range(5, 12)), list(range(100, 140)), [7], list(range(300, 321))]


@pytest.mark.parametrize("quantize", [None, "int8", "int4"])
def test_fast_path_batched_equals_alone(path, quantize) -> None:
    model, _ = load_model(path, dtype="bfloat16", quantize=quantize, progress=False, fast_kernels=True)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear | PackedBf16Linear)]
    fast = [m for m in layers if m.kernel.startswith("qwenkit ")]  # AVX-512 or AVX2
    # every layer, int4's down_proj too: 128 does not tile the tiny FFN width 160, so it gets groups of 32
    assert len(fast) == len(layers)
    if quantize == "int4":
        assert {m.group_size for m in layers if m.in_features == 160} == {32}
    assert all(layer.self_attn.qkv_proj is not None for layer in model.model.layers)  # fused layout
    assert all(layer.mlp.gate_up_silu is not None for layer in model.model.layers)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    alone = [run_engine(Engine(model, max_batch_size=1), [p], params)[0] for p in PROMPTS]
    together = run_engine(Engine(model, max_batch_size=4, prefill_chunk=8), PROMPTS, params)
    assert together == alone
    # the static-shape decode step (the CUDA-graph path, run eagerly here) over the fused layout
    static = run_engine(Engine(model, max_batch_size=4, prefill_chunk=8, cuda_graphs=True), PROMPTS, params)
    assert static == alone


@pytest.fixture(scope="module", params=["qwen2", "qwen3", "llama"])
def path_head_dim_32(request, tmp_path_factory):
    """Head dim 32 (prefill_attention's smallest): Qwen2 (q a view into the fused q/k/v rows), Qwen3 (q
    normed, a tensor of its own) and Llama."""
    if request.param == "qwen3":
        model = hf_model("qwen3", tie_word_embeddings=True)  # head_dim 32 by the factory
    else:
        model = hf_model(request.param, tie_word_embeddings=True, hidden_size=128, num_attention_heads=4)
    return save_hf(model, tmp_path_factory.mktemp(f"fast32-{request.param}") / "m")


def test_prompts_on_the_prefill_attention_kernel_keep_batch_and_chunk_invariance(
    path_head_dim_32, monkeypatch
) -> None:
    """Where AMX runs, prompt chunks attend on kernels.prefill_attention (head dim 32 here): a request's
    greedy tokens are the same alone in one chunk as in a batch cut into chunks of 8 and 5 tokens."""
    if not kernels.prefill_attention_runs(32):
        pytest.skip("kernels.prefill_attention needs AMX (this CPU or kernel build has none)")
    calls: list[int] = []
    real = kernels.prefill_attention

    def counted(q, *args):
        calls.append(q.shape[0])
        return real(q, *args)

    monkeypatch.setattr(kernels, "prefill_attention", counted)
    model, _ = load_model(path_head_dim_32, dtype="bfloat16", progress=False, fast_kernels=True)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    alone = [run_engine(Engine(model, max_batch_size=1), [p], params)[0] for p in PROMPTS]
    # each prompt in one chunk (a one-token prompt is a decode row)
    assert set(calls) == {len(p) for p in PROMPTS if len(p) > 1}
    for chunk in (8, 5):
        calls.clear()
        assert run_engine(Engine(model, max_batch_size=4, prefill_chunk=chunk), PROMPTS, params) == alone
        assert 1 < max(calls) <= chunk  # the prompts went in pieces
