"""Parity: our MoE logits and greedy tokens equal transformers' Qwen2MoeForCausalLM / Qwen3MoeForCausalLM."""

from __future__ import annotations

import pytest
import torch
from moe_models import VARIANTS, hf_moe_model
from test_parity import greedy, hf_greedy

from qwenkit.checkpoint import load_model
from qwenkit.model.mlp import MLP
from qwenkit.model.moe import MoEMLP


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_parity_with_transformers(variant, tmp_path):
    hf = hf_moe_model(variant)
    hf.save_pretrained(tmp_path / "m")
    model, config = load_model(tmp_path / "m", dtype="float32", progress=False)
    assert config.family == VARIANTS[variant][0]
    # The layer kinds follow transformers' rule (mlp_only_layers, decoder_sparse_step).
    for i, layer in enumerate(model.model.layers):
        hf_sparse = "experts" in dict(hf.model.layers[i].mlp.named_children())
        assert isinstance(layer.mlp, MoEMLP if hf_sparse else MLP)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert (ours - ref).abs().max().item() < 1e-4
    prompt = ids[0, :7].tolist()
    assert greedy(model, prompt, 32) == hf_greedy(hf, prompt, 32)


def test_mixed_config_has_dense_and_sparse_layers(tmp_path):
    hf_moe_model("qwen2_moe-mixed").save_pretrained(tmp_path / "m")
    _, config = load_model(tmp_path / "m", dtype="float32", progress=False)
    assert config.sparse_layers == (1, 3)
    assert config.num_experts_per_tok == 3 and config.norm_topk_prob


def test_routing_really_varies(tmp_path):
    """Guard for the parity test: the random routers spread tokens over many experts."""
    from qwenkit.model.moe import count_routed_tokens

    hf_moe_model("qwen2_moe").save_pretrained(tmp_path / "m")
    model, _ = load_model(tmp_path / "m", dtype="float32", progress=False)
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(3))
    with count_routed_tokens(model) as stats, torch.no_grad():
        model(ids)
    assert sorted(stats.per_layer) == [0, 1, 2]
    for counts in stats.per_layer.values():
        assert sum(counts) == 64 * 2  # every token goes to top-2 experts
        assert sum(c > 0 for c in counts) >= 6
