"""A merged model is what llama.cpp's ``convert_hf_to_gguf.py`` reads, the usual next step after a merge
(the end-to-end run with llama.cpp itself is ``benchmarks/check_llamacpp_reads.py``; the suite has no
llama.cpp): the files below are the ones that converter opens, with the keys it reads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from factories import write_lora_adapter, write_tiny_chat_model
from safetensors import safe_open

from qwenkit.finetune.merge import merge

SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "generation_config.json")


def tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_merged_tied_model_has_the_files_and_names_llamacpps_converter_reads(tmp_path, family):
    """convert_hf_to_gguf.py picks its model class by ``architectures[0]``, reads the shape keys of
    config.json, maps each safetensors name through gguf-py's tensor map (an unknown name stops it: no
    ``rotary`` buffer may leak in), skips ``lm_head.weight`` only by its absence for a tied model, takes
    the vocabulary from tokenizer.json (its pre-tokenizer identified by hashing AutoTokenizer's ids),
    eos/pad from tokenizer_config.json, the chat template from it, and general.sampling.* from
    generation_config.json. A merge of a tied model whose adapter leaves the embedding alone keeps all of
    it: the base's names, dtypes and shapes exactly, the tie, and the side files byte for byte."""
    base = write_tiny_chat_model(tmp_path / "base", family=family)
    adapter = write_lora_adapter(base, tmp_path / "lora", seed=1)
    merge(base, adapter, tmp_path / "merged")
    out = tmp_path / "merged"
    assert tensors(out) == tensors(base)
    assert "lm_head.weight" not in tensors(out)
    config, source = (json.loads((d / "config.json").read_text()) for d in (out, base))
    arch = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}[family]
    assert config["architectures"] == [arch] and config["tie_word_embeddings"] is True
    assert config == {**source, "torch_dtype": "float32"}
    for name in SIDE_FILES:
        assert (out / name).read_bytes() == (base / name).read_bytes(), name
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<|im_end|>"
    assert "<|im_start|>" in json.loads((out / "tokenizer_config.json").read_text())["chat_template"]


def test_merge_to_bfloat16_names_the_dtype_the_converter_picks_by(tmp_path):
    """``--outtype auto`` (the converter's default) writes BF16 where the first float tensor is bfloat16,
    and transformers reads config.json's dtype: a bfloat16 merge stores every tensor bfloat16 and says so
    in both keys."""
    base = write_tiny_chat_model(tmp_path / "base", family="qwen3")
    merge(base, write_lora_adapter(base, tmp_path / "lora", seed=1), tmp_path / "bf16", dtype="bfloat16")
    assert {d for d, _ in tensors(tmp_path / "bf16").values()} == {"BF16"}
    config = json.loads((tmp_path / "bf16" / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config.get("dtype", "bfloat16") == "bfloat16"
