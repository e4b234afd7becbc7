"""A MoE layer's routed experts in one ``kernels.moe_experts`` call (an inference load on the CPU
kernels): bit for bit what the loop over experts in ``MoEMLP`` computes, for integer codes from a GGUF
file and for bfloat16 experts, whatever rows share the call; bad arguments are refused by name."""

from __future__ import annotations

import pytest
import torch
from gguf_files import Q
from moe_models import hf_moe_model
from test_decode_layer import PROMPTS, _assert_kernel_path_equals_modules, _count_layer_runs, _load, _steps
from test_moe_gguf import _write

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.model.moe import MoEMLP, count_routed_tokens

pytestmark = pytest.mark.skipif(not kernels.available(), reason="the CPU kernels are not available here")


@pytest.fixture(scope="module", params=["q4_0-qwen3_moe", "q8_0-qwen2_moe", "bf16-qwen3_moe"])
def model(request, tmp_path_factory):
    kind, variant = request.param.split("-")
    tmp = tmp_path_factory.mktemp(request.param)
    if kind == "bf16":
        hf_moe_model(variant).save_pretrained(tmp / "hf")
        path = tmp / "hf"
    else:
        path, _ = _write(tmp, variant, {"q4_0": Q.Q4_0, "q8_0": Q.Q8_0}[kind])
    return load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)[0]


def _blocks(model) -> list[MoEMLP]:
    return [m for m in model.modules() if isinstance(m, MoEMLP)]


def test_every_block_runs_its_experts_in_one_call(model):
    blocks = _blocks(model)
    assert blocks and all(b.expert_weights is not None for b in blocks)


@pytest.mark.parametrize("rows", [1, 3, 16, 40, 200])
def test_one_call_equals_the_loop_over_experts(model, rows):
    g = torch.Generator().manual_seed(rows)
    for block in _blocks(model):
        x = torch.randn(rows, model.config.hidden_size, generator=g).bfloat16()
        with torch.no_grad():
            weights, ids = block.route(x)
            fast = kernels.moe_experts(x, ids, weights, block.expert_weights)
            planned, block.expert_weights = block.expert_weights, None
            try:
                loop = block._dispatch(x, weights, ids)
            finally:
                block.expert_weights = planned
        assert torch.equal(fast, loop)
        # each row alone gives its bits in the batch (its experts see other rows beside it there)
        with torch.no_grad():
            alone = torch.cat(
                [
                    kernels.moe_experts(x[i : i + 1], ids[i : i + 1], weights[i : i + 1], planned)
                    for i in range(rows)
                ]
            )
        assert torch.equal(alone, fast)


def test_bad_arguments_are_refused_by_name(model):
    block = _blocks(model)[0]
    x = torch.randn(2, model.config.hidden_size).bfloat16()
    weights, ids = block.route(x)
    op = torch.ops.qwenkit.moe_experts
    with pytest.raises(RuntimeError, match="x must be .* bfloat16"):
        kernels.moe_experts(x.float(), ids, weights, block.expert_weights)
    with pytest.raises(RuntimeError, match="ids must be .* int64"):
        kernels.moe_experts(x, ids.int(), weights, block.expert_weights)
    with pytest.raises(RuntimeError, match="weights must be bfloat16"):
        kernels.moe_experts(x, ids, weights.float(), block.expert_weights)
    with pytest.raises(RuntimeError, match=r"picks expert \d+, which is not listed"):
        op(x, ids, weights, [], [])
    with pytest.raises(RuntimeError, match="8 tensors and 11 ints per expert"):
        op(x, ids, weights, block.expert_weights.tensors[0], [0])


def test_routers_run_on_the_bf16_kernel(model):
    """The router keeps its float weight (never quantized) and runs its product on the packed copy: the
    float32 product of the same bf16 numbers, rounded once to bf16."""
    g = torch.Generator().manual_seed(7)
    for block in _blocks(model):
        assert block.gate.packed is not None
        x = torch.randn(5, model.config.hidden_size, generator=g).bfloat16()
        want = x.float() @ block.gate.weight.float().T
        got = block.gate(x)
        assert got.dtype == torch.bfloat16
        torch.testing.assert_close(got.float(), want, rtol=2**-8, atol=1e-6)


@pytest.mark.parametrize(
    ("variant", "quantize"),
    [
        ("qwen3_moe", None),
        ("qwen3_moe", "int8"),
        ("qwen3_moe", "int4"),
        ("qwen3_moe-top1-mixed", "int4"),
        ("qwen2_moe", "int4"),
        ("qwen2_moe-mixed", None),
    ],
)
def test_moe_layers_decode_in_one_call_as_their_modules(tmp_path, monkeypatch, variant, quantize):
    """A decode step takes MoE layers (router, softmax, top k, experts; Qwen2-MoE's gated shared expert)
    through kernels.decode_layers with the dense ones: the logits and every K/V slot bit for bit the
    modules'."""
    hf_moe_model(variant).save_pretrained(tmp_path / "m")
    model = _load(tmp_path / "m", quantize, monkeypatch)
    weights = [layer.decode_weights for layer in model.model.layers]
    assert all(w is not None for w in weights)
    assert any(w.experts is not None for w in weights)
    calls = _count_layer_runs(monkeypatch)
    _assert_kernel_path_equals_modules(model, 6)
    assert calls == [len(weights)] * 6  # every decode step: all its layers in one kernel call


def test_a_layer_counting_its_routed_tokens_keeps_the_module_path(tmp_path, monkeypatch):
    hf_moe_model("qwen3_moe").save_pretrained(tmp_path / "m")
    model = _load(tmp_path / "m", "int4", monkeypatch)
    calls = _count_layer_runs(monkeypatch)
    with count_routed_tokens(model) as stats:
        _steps(model, 3)
    assert calls == []  # every layer ran its modules, which count
    routed = sum(stats.total)
    _steps(model, 3)
    assert calls == [model.config.num_hidden_layers] * 3
    tokens = sum(len(p) for p in PROMPTS) + 3 * len(PROMPTS)  # the prompts, then 3 decode steps of each
    assert routed == tokens * model.config.num_experts_per_tok * model.config.num_hidden_layers


def test_a_moe_gguf_comes_back_from_the_prepared_cache_with_its_one_call_experts(tmp_path, monkeypatch):
    """The prepared-model cache keeps what the one-call paths need (the experts' and routers' packed
    weights, each layer's decode weights), so the second start decodes as the first."""
    from qwenkit.checkpoint import loader, prepared_cache

    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv(prepared_cache.ENV_SWITCH, raising=False)
    builds: list[int] = []
    real = loader._assign_all
    monkeypatch.setattr(loader, "_assign_all", lambda *a, **k: builds.append(1) or real(*a, **k))
    path, _ = _write(tmp_path, "qwen3_moe", Q.Q4_0)
    first = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)[0]
    again = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)[0]
    assert builds == [1]  # the second load came from the cache
    for model in (first, again):
        assert all(
            layer.decode_weights is not None and layer.decode_weights.experts for layer in model.model.layers
        )
        assert all(b.gate.packed is not None and b.expert_weights is not None for b in _blocks(model))
    x = torch.randn(3, first.config.hidden_size, generator=torch.Generator().manual_seed(2)).bfloat16()
    with torch.no_grad():
        for a, b in zip(_blocks(first), _blocks(again), strict=True):
            assert torch.equal(a(x[None]), b(x[None]))
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    with torch.no_grad():
        assert torch.equal(first(ids), again(ids))


# the servable projections of a MoE model: attention's, the dense layers' FFN and the shared expert's
SERVABLE = ("q_proj", "k_proj", "v_proj", "o_proj", "0.mlp.gate_proj", "0.mlp.up_proj", "0.mlp.down_proj")
SHARED = ("shared_expert.gate_proj", "shared_expert.up_proj", "shared_expert.down_proj")


def test_served_adapters_on_a_moe_model_run_in_the_layer_calls(tmp_path, monkeypatch):
    """Adapters of attention, a dense layer's FFN and the shared experts, served on a Qwen2-MoE model of
    dense and sparse layers: every layer still decodes in the one kernel call, bit for bit its modules,
    each row through its own adapter; one adapting a router is refused by name (routed experts:
    test_moe_served_adapters.py)."""
    from factories import write_lora_adapter
    from test_decode_layer import ADAPTER_ROWS

    from qwenkit.checkpoint import prepared_cache
    from qwenkit.model.served_adapters import AdapterNotServable

    monkeypatch.setenv(prepared_cache.ENV_SWITCH, "off")
    path = tmp_path / "hf"
    hf_moe_model("qwen2_moe-mixed").save_pretrained(path)
    adapters = {
        "a": write_lora_adapter(path, tmp_path / "a", seed=1, targets=SERVABLE + SHARED),
        "b": write_lora_adapter(path, tmp_path / "b", seed=2, r=2, targets=("v_proj", *SHARED)),
    }
    base = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)[0]
    model = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True, adapters=adapters)[0]
    assert all(layer.decode_weights is not None for layer in model.model.layers)
    shared = model.model.layers[1].mlp.shared_expert
    assert type(shared.gate_up_silu.linear).__name__ == "LoRAProjection"
    plain, _ = _steps(base, 3)
    served, _ = _steps(model, 3, adapters=ADAPTER_ROWS)
    for row, slot in enumerate(ADAPTER_ROWS):
        assert torch.equal(served[0][row], plain[0][row]) == (slot == 0)
    calls = _count_layer_runs(monkeypatch)
    _assert_kernel_path_equals_modules(model, 3, ADAPTER_ROWS)
    assert calls == [len(model.model.layers)] * 3
    router = write_lora_adapter(path, tmp_path / "router", seed=3, targets=("gate",))
    with pytest.raises(AdapterNotServable, match=r"adapts model\.layers\.1\.mlp\.gate; served adapters"):
        load_model(path, dtype="bfloat16", progress=False, adapters={"r": router})
