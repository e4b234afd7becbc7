"""The files around the weights: config.json (qwen_facts §5.2), generation_config.json (§7.4), the
license, and nothing of v1's remote code."""

from __future__ import annotations

import json

import pytest
from v1_sources import BASE_GENERATION, write_source

from qwenkit.cli.info import describe
from qwenkit.config import ModelConfig
from qwenkit.convert.v1_to_qwen2 import convert_v1_to_qwen2


def read(path):
    return json.loads(path.read_text())


def test_config_maps_every_v1_field(converted):
    v1, cfg = read(converted.src / "config.json"), read(converted.out / "config.json")
    assert cfg == {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": v1["vocab_size"],
        "hidden_size": v1["hidden_size"],
        "intermediate_size": v1["intermediate_size"] // 2,  # v1 stores twice the FFN width
        "num_hidden_layers": v1["num_hidden_layers"],
        "num_attention_heads": v1["num_attention_heads"],
        "num_key_value_heads": v1["num_attention_heads"],
        "head_dim": v1["kv_channels"],
        "hidden_act": "silu",
        "rms_norm_eps": v1["layer_norm_epsilon"],
        "rope_theta": 1000.0,  # from rotary_emb_base, not qwen2's default
        "rope_scaling": None,
        "max_position_embeddings": v1["seq_length"],
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": v1["num_hidden_layers"],
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 151643,
        "eos_token_id": 151645,  # a chat model (chat_format chatml) stops at <|im_end|>
        "torch_dtype": "float32",
    }
    # Our own reader sees the same model, now as qwen2 without the v1 long-context tricks.
    a, b = ModelConfig.from_hf(v1), ModelConfig.from_hf(cfg)
    for key in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "rotary_dim",
        "rms_norm_eps",
        "rope_theta",
        "qkv_bias",
        "o_bias",
        "mlp_bias",
        "max_position_embeddings",
    ):
        assert getattr(a, key) == getattr(b, key), key
    assert not b.use_dynamic_ntk and not b.use_logn_attn


def test_generation_config_of_chat_model(converted):
    gen = read(converted.out / "generation_config.json")
    assert gen == {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "eos_token_id": [151645, 151643],
        "do_sample": True,
        "top_k": 0,
        "top_p": 0.8,
        "repetition_penalty": 1.1,
        "max_new_tokens": 512,
    }


def test_generation_config_of_base_model(tmp_path):
    src = write_source(
        tmp_path / "src", generation={**BASE_GENERATION, "stop_words_ids": [[151643], [198, 198]]}
    )
    result = convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    gen = read(tmp_path / "out" / "generation_config.json")
    assert gen["eos_token_id"] == 151643 and gen["top_p"] == 0.8 and "stop_words_ids" not in gen
    assert "chat_format" not in gen
    assert read(tmp_path / "out" / "config.json")["eos_token_id"] == 151643
    assert any("multi-token stop words [[198, 198]]" in n for n in result.notes)


def test_generation_config_without_source_file(tmp_path):
    src = write_source(tmp_path / "src")
    convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert read(tmp_path / "out" / "generation_config.json") == {
        "bos_token_id": 151643,
        "pad_token_id": 151643,
        "eos_token_id": 151643,
    }


def test_license_files_copied_and_info_shows_terms(converted):
    assert (converted.out / "LICENSE").read_text() == (converted.src / "LICENSE").read_text()
    assert (converted.out / "NOTICE").is_file()
    text = describe(str(converted.out))
    assert "family" in text and "qwen2 (Qwen2ForCausalLM)" in text
    assert "tongyi-qianwen: Tongyi Qianwen License" in text and "100 million monthly active users" in text


def test_no_license_in_source_is_a_note(tmp_path):
    src = write_source(tmp_path / "src", license_text=None)
    result = convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / "LICENSE").exists()
    assert any("no LICENSE or NOTICE" in n and "Tongyi Qianwen" in n for n in result.notes)


def test_output_has_only_qwen2_files(converted):
    names = {p.name for p in converted.out.iterdir()}
    assert names == {
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "vocab.json",
        "merges.txt",
        "LICENSE",
        "NOTICE",
        *(
            f"model-{i:05d}-of-{converted.result.shards:05d}.safetensors"
            for i in range(1, converted.result.shards + 1)
        ),
    }
    assert converted.result.shards > 1
    assert (
        "modeling_qwen.py" not in names
        and "qwen.tiktoken" not in names
        and "quantize_config.json" not in names
    )
    assert not list(converted.out.parent.glob(".*partial*"))


@pytest.mark.parametrize("key", ["use_dynamic_ntk", "use_logn_attn"])
def test_no_long_context_note_without_the_tricks(tmp_path, key):
    src = write_source(tmp_path / "src", cfg={"use_dynamic_ntk": False, "use_logn_attn": False, key: True})
    result = convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert sum("Qwen2 does not have" in n for n in result.notes) == 1
    src2 = write_source(tmp_path / "src2", cfg={"use_dynamic_ntk": False, "use_logn_attn": False})
    assert not any(
        "Qwen2 does not have" in n for n in convert_v1_to_qwen2(src2, tmp_path / "o2", progress=False).notes
    )
