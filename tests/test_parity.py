"""Parity: our logits equal the reference implementation's on the same weights."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, hf_model_from_config_json, save_hf, write_v1_checkpoint
from qwen_v1_reference import v1_greedy, v1_logits
from safetensors.torch import load_file

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams


def greedy(model, prompt: list[int], n: int) -> list[int]:
    engine = Engine(model, max_batch_size=1)
    rid = engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
    out: list[int] = []
    finish = None
    while engine.has_unfinished():
        for o in engine.step():
            assert o.request_id == rid
            out += o.new_token_ids
            finish = o.finish_reason
    assert finish == "length"
    return out


def hf_greedy(hf, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out = hf.generate(ids, max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt) :].tolist()


FAMILIES = {
    "qwen2": dict(),
    "qwen2-tied": dict(tie_word_embeddings=True),
    "qwen2-yarn": dict(rope_scaling={"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
    "qwen3": dict(),
    "llama": dict(),
}


@pytest.mark.parametrize("variant", list(FAMILIES))
def test_parity_with_transformers(variant, tmp_path):
    family = variant.split("-")[0]
    hf = hf_model(family, **FAMILIES[variant])
    save_hf(hf, tmp_path / "m")
    model, config = load_model(tmp_path / "m", dtype="float32")
    assert config.family == family
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits
        ours = model(ids)
    assert (ours - ref).abs().max().item() < 1e-4
    prompt = ids[0, :7].tolist()
    assert greedy(model, prompt, 32) == hf_greedy(hf, prompt, 32)


SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)  # fmt: skip

# config.json files as users hold them, each read the way transformers reads it (not through a Config class)
CONFIG_JSON = {
    # transformers' Qwen3Config defaults head_dim to 128: qwenkit took 64 / 4 = 16 and refused the tensors
    "qwen3-no-head-dim": dict(model_type="qwen3"),
    # A top-level original_max_position_embeddings overrides rope_scaling's (here the default, 128) when
    # transformers builds the model: qwenkit stretched a 128-token window and its logits differed by 2e-3
    "qwen2-yarn-top-level-original": dict(
        model_type="qwen2", rope_scaling={"type": "yarn", "factor": 4.0}, original_max_position_embeddings=32
    ),
    # transformers' Qwen MLPs have no bias whatever mlp_bias says (Llama's honour it): qwenkit asked the
    # checkpoint for mlp biases and refused it
    "qwen2-mlp-bias": dict(model_type="qwen2", mlp_bias=True),
    "qwen3_moe-mlp-bias": dict(
        model_type="qwen3_moe",
        head_dim=16,
        mlp_bias=True,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
    ),
    "llama-mlp-bias": dict(model_type="llama", mlp_bias=True),
    # Llama 3.1/3.2's rope_scaling (every position here past the original 32-token window) and linear
    # interpolation, in both spellings: qwenkit refused both types ("supports default and yarn")
    "llama-llama3": dict(
        model_type="llama",
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    # transformers 5's spelling; the original window defaults to max_position_embeddings (128)
    "llama-llama3-rope-parameters": dict(
        model_type="llama",
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500.0,
            "factor": 4.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 8.0,
        },
    ),
    "llama-linear": dict(model_type="llama", rope_scaling={"type": "linear", "factor": 4.0}),
    "qwen2-linear-rope-parameters": dict(
        model_type="qwen2", rope_parameters={"rope_type": "linear", "rope_theta": 1e6, "factor": 2.0}
    ),
    # use_sliding_window=true whose max_window_layers covers every layer: transformers runs full attention
    # in each (its layer_types rule); qwenkit refused the config
    "qwen2-sliding-window-on-no-layer": dict(
        model_type="qwen2", use_sliding_window=True, sliding_window=16, max_window_layers=2
    ),
    "qwen2_moe-sliding-window-on-no-layer": dict(
        model_type="qwen2_moe",
        use_sliding_window=True,
        sliding_window=16,
        max_window_layers=0,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
    ),
}


@pytest.mark.parametrize("variant", list(CONFIG_JSON))
def test_config_json_keys_read_as_transformers_reads_them(variant, tmp_path):
    cfg = {**SHAPE, **CONFIG_JSON[variant]}
    hf = hf_model_from_config_json(tmp_path / "m", cfg)
    model, _ = load_model(tmp_path / "m", dtype="float32")
    ids = torch.randint(0, 512, (2, 100), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max().item() < 1e-4
    prompt = ids[0, :9].tolist()
    assert greedy(model, prompt, 60) == hf_greedy(hf, prompt, 60)


def test_parity_qwen_v1_against_reference(tmp_path):
    path = write_v1_checkpoint(tmp_path / "v1", shards=2)
    import json

    cfg = json.loads((path / "config.json").read_text())
    sd = {}
    for f in path.glob("*.safetensors"):
        sd |= load_file(f)
    model, config = load_model(path, dtype="float32")
    assert config.family == "qwen" and config.intermediate_size == cfg["intermediate_size"] // 2
    short = torch.randint(0, 512, (20,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(short[None])[0] - v1_logits(sd, cfg, short)).abs().max() < 1e-4
    # Longer than seq_length (32): dynamic NTK (alpha 3 at 50 tokens) and LogN both act.
    long = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ours = model(long[None], ntk_alphas=[model.ntk_alpha(50)])[0]
    ref = v1_logits(sd, cfg, long)
    assert model.ntk_alpha(50) == 3
    assert (ours - ref).abs().max() < 1e-4
    # Without NTK the long-context logits differ: the test would catch a missing NTK.
    with torch.no_grad():
        plain = model(long[None])[0]
    assert (plain - ref).abs().max() > 1e-3
    # Greedy decoding through the KV cache crosses the trained length; alpha stays the prefill's.
    prompt = long[:28].tolist()
    assert greedy(model, prompt, 32) == v1_greedy(sd, cfg, prompt, 32)
    prompt = long[:40].tolist()
    assert greedy(model, prompt, 12) == v1_greedy(sd, cfg, prompt, 12)
