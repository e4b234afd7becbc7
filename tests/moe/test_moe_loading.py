"""Loading MoE checkpoints: per-expert tensors over many shards, and bad input naming expert and layer."""

from __future__ import annotations

import json

import pytest
import torch
from moe_models import hf_moe_model
from safetensors.torch import load_file, save_file

from qwenkit.checkpoint import load_model
from qwenkit.errors import CheckpointError


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A Qwen2-MoE checkpoint whose per-expert tensors are spread over many shards."""
    hf = hf_moe_model("qwen2_moe")
    path = tmp_path_factory.mktemp("moe") / "sharded"
    hf.save_pretrained(path, max_shard_size="40KB")
    return hf, path


def test_many_shards_load_to_the_same_logits(sharded):
    hf, path = sharded
    index = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
    expert_files = {f for n, f in index.items() if ".experts." in n}
    assert len(set(index.values())) >= 8 and len(expert_files) >= 4
    model, config = load_model(path, dtype="float32", progress=False)
    assert config.num_experts == 8 and config.shared_expert_intermediate_size == 96
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def _rewrite(path, tmp_path, edit):
    """Copy a single-file checkpoint with ``edit(state_dict)`` applied."""
    out = tmp_path / "edited"
    out.mkdir()
    (out / "config.json").write_text((path / "config.json").read_text())
    sd = load_file(path / "model.safetensors")
    edit(sd)
    save_file(sd, str(out / "model.safetensors"))
    return out


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    path = tmp_path_factory.mktemp("moe") / "single"
    hf_moe_model("qwen2_moe-mixed").save_pretrained(path)
    return path


def test_missing_expert_tensor_names_expert_and_layer(single, tmp_path):
    bad = _rewrite(single, tmp_path, lambda sd: sd.pop("model.layers.3.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError) as e:
        load_model(bad, dtype="float32", progress=False)
    msg = str(e.value)
    assert "missing tensor(s)" in msg and "expert 5 of layer 3" in msg and "\n" not in msg


def test_misshapen_expert_tensor_names_expert_and_layer(single, tmp_path):
    def edit(sd):
        sd["model.layers.1.mlp.experts.2.down_proj.weight"] = torch.zeros(64, 31)

    with pytest.raises(CheckpointError) as e:
        load_model(_rewrite(single, tmp_path, edit), dtype="float32", progress=False)
    msg = str(e.value)
    assert "expert 2 of layer 1" in msg and "(64, 31)" in msg and "(64, 32)" in msg


def test_extra_expert_beyond_num_experts_is_named(single, tmp_path):
    def edit(sd):
        sd["model.layers.1.mlp.experts.8.up_proj.weight"] = torch.zeros(32, 64)

    with pytest.raises(CheckpointError, match=r"expert 8 of layer 1, but config.json has num_experts=8"):
        load_model(_rewrite(single, tmp_path, edit), dtype="float32", progress=False)


def test_a_config_of_far_more_experts_than_the_weights_is_refused_before_the_build(single, tmp_path):
    """num_experts 1,000,000 over 8 built a million experts a layer before any tensor was read."""
    out = _rewrite(single, tmp_path, lambda sd: None)
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "num_experts": 1_000_000}))
    with pytest.raises(CheckpointError, match=r"num_experts is 1,000,000, but the checkpoint holds 8 routed"):
        load_model(out, dtype="float32", progress=False)


def test_expert_in_a_dense_layer_is_named(single, tmp_path):
    def edit(sd):
        sd["model.layers.0.mlp.experts.0.up_proj.weight"] = torch.zeros(32, 64)

    with pytest.raises(CheckpointError, match=r"expert 0 of layer 0, a dense layer in config.json"):
        load_model(_rewrite(single, tmp_path, edit), dtype="float32", progress=False)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num_experts_per_tok=9), "num_experts_per_tok=9 must be between 1 and num_experts=8"),
        (dict(moe_intermediate_size=0), "moe_intermediate_size=0 must be positive"),
        (dict(mlp_only_layers="0"), "mlp_only_layers must be a list"),
        # read only under output_router_logits; the message named no key ("could not convert string ...")
        (
            dict(output_router_logits=True, router_aux_loss_coef="abc"),
            "^config.json: router_aux_loss_coef must be a number, not 'abc'$",
        ),
        # the string "false" turned the load-balancing loss on
        (dict(output_router_logits="false"), "^config.json: output_router_logits must be true or false"),
    ],
)
def test_bad_moe_config_is_one_line(single, tmp_path, change, message):
    from qwenkit.config import ModelConfig
    from qwenkit.errors import ConfigError

    cfg = json.loads((single / "config.json").read_text()) | change
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(cfg)


@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_a_bf16_moe_on_the_kernels_comes_back_from_the_prepared_cache(variant, tmp_path, monkeypatch, capfd):
    """Experts and shared expert packed into the kernels' tiles are cached like a dense model's layers:
    the second load maps the entry back (nothing built again, nothing said on stderr), same logits."""
    from qwenkit import kernels
    from qwenkit.checkpoint import loader

    if not kernels.available():
        pytest.skip("the CPU kernels are not available here: nothing is packed, nothing cached")
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "cache"))
    builds = []
    real = loader._assign_all
    monkeypatch.setattr(loader, "_assign_all", lambda *a, **k: builds.append(1) or real(*a, **k))
    path = tmp_path / variant
    hf_moe_model(variant).save_pretrained(path)
    capfd.readouterr()
    first, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    second, _ = load_model(path, dtype="bfloat16", progress=False, fast_kernels=True)
    assert len(builds) == 1 and len(list((tmp_path / "cache" / "prepared").glob("*.pt"))) == 1
    assert capfd.readouterr().err == ""  # no "could not cache" or "rebuilding" line
    ids = torch.arange(3, 20)[None]
    with torch.no_grad():
        assert torch.equal(first(ids), second(ids))


def test_a_zero_width_shared_expert_loads_as_none(tmp_path):
    """shared_expert_intermediate_size 0 in a Qwen2-MoE config: transformers builds a shared expert of width
    0 and saves its empty tensors and its gate, which add sigmoid(gate) x 0. They were refused as
    unexpected tensors; they load as no shared expert, to transformers' logits."""
    hf = hf_moe_model("qwen2_moe", shared_expert_intermediate_size=0)
    hf.save_pretrained(tmp_path / "m")
    model, config = load_model(tmp_path / "m", dtype="float32", progress=False)
    assert config.shared_expert_intermediate_size == 0
    assert all(layer.mlp.shared_expert is None for layer in model.model.layers)
    ids = torch.arange(3, 40)[None]
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_a_shared_expert_tensor_with_weights_is_refused_at_width_zero(single, tmp_path):
    """Only the empty tensors of a zero-width shared expert (and its gate) are dropped: a shared expert
    with weights under shared_expert_intermediate_size 0 is still named."""

    def edit(sd):
        for name in [n for n in sd if ".shared_expert." in n]:
            sd[name] = sd[name][:, :0] if name.endswith("down_proj.weight") else sd[name][:0]
        sd["model.layers.1.mlp.shared_expert.up_proj.weight"] = torch.zeros(4, 64)

    path = _rewrite(single, tmp_path, edit)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "shared_expert_intermediate_size": 0}))
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'model.layers.1.mlp.shared_expert.up_proj"):
        load_model(path, dtype="float32", progress=False)


def test_qwen3_moe_expert_counts_that_disagree_are_one_line():
    """A Qwen3-MoE config.json with both num_experts and num_local_experts: transformers 5 runs
    num_local_experts (num_experts is only its alias), qwenkit ran num_experts. Disagreeing, neither
    is sure to be the checkpoint's: refused, naming both."""
    import transformers

    from qwenkit.config import ModelConfig
    from qwenkit.errors import ConfigError

    cfg = hf_moe_model("qwen3_moe").config.to_dict() | {"num_experts": 8, "num_local_experts": 4}
    assert transformers.Qwen3MoeConfig(**cfg).num_local_experts == 4
    message = r"^config.json gives num_experts=8 and num_local_experts=4"
    with pytest.raises(ConfigError, match=message):
        ModelConfig.from_hf(cfg)
    assert ModelConfig.from_hf(cfg | {"num_experts": 4}).num_experts == 4  # agreeing: fine
