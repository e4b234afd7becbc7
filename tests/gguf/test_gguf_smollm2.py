"""The bundled SmolLM2-135M-Instruct Q4_1 GGUF reads exactly as transformers reads it."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.slow

CORPUS = [
    "Hello world! How are you today?",
    "  leading spaces, trailing spaces   ",
    "def fib(n):\n    return n if n < 2 else fib(n - 1) + fib(n - 2)\n",
    'for (int i = 0; i < 10; ++i) { printf("%d\\n", i); }',
    "Numbers: 0 7 42 1234567890 3.14159 -2e10 1,000,000",
    "Emoji: 😀🤖👍🏽 ❤️ 🇫🇷",
    "中文：你好，世界！我们今天学习分词。",
    "日本語とEnglishの混在 テキスト",
    "tabs\tand\nnewlines\r\n\n\n   and    runs      of     spaces",
    "Special tokens in text: <|im_start|>user\nhi<|im_end|>\n<|endoftext|>",
    "Ünïcödé àccents, naïve café, straße",
    "superscripts ²³ and fractions ½ ¾ and Ⅻ",
    "",
]
# Where transformers' GGUF import reads this file differently from llama.cpp: it ignores the pre-tokenizer
# ``smollm``, whose digit split (llama.cpp's, and Digits in SmolLM2's own tokenizer.json) reads " ½" as
# "Ġ" + "Â½" where transformers reads "ĠÂ" + "½". Ids from llama.cpp's libllama (vocab only) on this file.
LLAMA_CPP_IDS = {
    "superscripts ²³ and fractions ½ ¾ and Ⅻ": [
        35375, 366, 4818, 99, 216, 19133, 39050, 284, 17161, 216, 16738, 216, 43124, 284, 216, 173, 223, 121,
    ],
}  # fmt: skip


def test_gguf_facts(smollm) -> None:
    assert smollm.architecture == "llama"
    assert smollm.license == "apache-2.0"
    assert set(smollm.tensor_types.values()) == {"Q4_1", "Q8_0", "F32"}
    assert smollm.tensor_types["token_embd.weight"] == "Q8_0"
    assert "output.weight" not in smollm.tensor_types  # tied head


def test_gguf_hf_config_matches_transformers(smollm, hf_smollm) -> None:
    ours, theirs = smollm.hf_config, hf_smollm.config
    assert ours["model_type"] == theirs.model_type == "llama"
    assert ours["architectures"] == ["LlamaForCausalLM"]
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "rms_norm_eps", "max_position_embeddings",
                "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "attention_bias",
                "mlp_bias", "hidden_act"):  # fmt: skip
        assert ours[key] == getattr(theirs, key), key
    assert ours["rope_theta"] == theirs.rope_parameters["rope_theta"] == 100000.0
    assert (ours["hidden_size"], ours["num_hidden_layers"], ours["num_attention_heads"]) == (576, 30, 9)
    assert (ours["num_key_value_heads"], ours["intermediate_size"], ours["vocab_size"]) == (3, 1536, 49152)
    assert ours["tie_word_embeddings"] is True


def test_gguf_hf_config_loads_in_transformers(smollm) -> None:
    import transformers

    config = transformers.AutoConfig.for_model(**smollm.hf_config)
    assert type(config).__name__ == "LlamaConfig"
    assert config.rope_parameters["rope_theta"] == 100000.0
    assert config.head_dim == 64


def test_gguf_tensors_equal_transformers(smollm, hf_smollm) -> None:
    params = dict(hf_smollm.named_parameters())  # the tied lm_head is listed once, as embed_tokens
    seen = set()
    for name, tensor in smollm.tensors():
        assert tensor.dtype == torch.float32
        expected = params[name]
        assert tensor.shape == expected.shape, name
        assert torch.equal(tensor, expected), f"{name}: max diff {(tensor - expected).abs().max()}"
        seen.add(name)
    assert seen == set(params)
    assert sorted(smollm.tensor_names()) == sorted(seen)
    assert smollm.total_bytes == sum(p.numel() * 4 for p in params.values())


def test_gguf_f32_tensors_are_not_copied(smollm) -> None:
    """F32 norms come back as views of the memory map (copy-on-write), not copies."""
    _, tensor = next((n, t) for n, t in smollm.tensors() if n.endswith("input_layernorm.weight"))
    base = smollm._maps[0]  # the file's memory map
    start = base.ctypes.data
    assert start <= tensor.data_ptr() < start + base.nbytes


def test_gguf_tokenizer_ids_match_transformers(smollm, hf_smollm_tokenizer) -> None:
    tok = smollm.tokenizer
    for text in CORPUS:
        ours = tok.encode(text).ids
        theirs = LLAMA_CPP_IDS.get(text) or hf_smollm_tokenizer(text)["input_ids"]
        assert ours == theirs, text
        assert tok.decode(ours, skip_special_tokens=False) == hf_smollm_tokenizer.decode(theirs), text
    assert tok.get_vocab_size() == len(hf_smollm_tokenizer) == 49152


def test_gguf_tokenizer_config_matches_transformers(smollm, hf_smollm_tokenizer) -> None:
    cfg = smollm.tokenizer_config
    assert cfg["chat_template"] == smollm.chat_template == hf_smollm_tokenizer.chat_template
    assert "<|im_start|>" in cfg["chat_template"]
    for role in ("bos", "eos", "pad", "unk"):
        assert cfg[f"{role}_token"] == getattr(hf_smollm_tokenizer, f"{role}_token"), role
    assert (cfg["bos_token"], cfg["eos_token"]) == ("<|im_start|>", "<|im_end|>")
    assert cfg["add_bos_token"] is False
    added = {int(i): t["content"] for i, t in cfg["added_tokens_decoder"].items()}
    assert added == {i: t.content for i, t in hf_smollm_tokenizer.added_tokens_decoder.items()}
    assert added[2] == "<|im_end|>" and len(added) == 17


def test_gguf_chat_template_renders_like_transformers(smollm, hf_smollm_tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    ids = hf_smollm_tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert ids.startswith("<|im_start|>system\n")
    assert smollm.tokenizer.encode(ids).ids == hf_smollm_tokenizer(ids)["input_ids"]
