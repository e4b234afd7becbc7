"""A MoE layer's routed experts in one ``kernels.moe_experts`` call (an inference load on the CPU
kernels): bit for bit what the loop over experts in ``MoEMLP`` computes, for integer codes from a GGUF
file and for bfloat16 experts, whatever rows share the call; bad arguments are refused by name."""

from __future__ import annotations

import pytest
import torch
from gguf_files import Q
from moe_models import hf_moe_model
from test_moe_gguf import _write

from qwenkit import kernels
from qwenkit.checkpoint import load_model
from qwenkit.model.moe import MoEMLP

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


@pytest.mark.parametrize("rows", [1, 3, 16, 40])
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
