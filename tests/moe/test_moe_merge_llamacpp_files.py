"""A merged MoE model is what llama.cpp's ``convert_hf_to_gguf.py`` reads (the end-to-end run with
llama.cpp itself is ``benchmarks/check_llamacpp_reads.py``; the suite has no llama.cpp)."""

from __future__ import annotations

import json
import shutil

from factories import qwen3_tokenizer_dir, write_lora_adapter
from moe_models import hf_moe_model
from safetensors import safe_open

from qwenkit.finetune.merge import merge


def tensors(path):
    with safe_open(path / "model.safetensors", "pt") as f:
        return {k: (str(f.get_slice(k).get_dtype()), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


def test_merged_moe_keeps_per_expert_names_and_untied_head(tmp_path):
    """The converter's Qwen2MoeModel stacks ``mlp.experts.{e}.{gate,up,down}_proj.weight`` per layer and
    maps ``mlp.shared_expert*`` and ``mlp.gate``; a merge writes those names, shapes and the untied
    ``lm_head.weight`` as the base has them (8 experts, a shared expert and its gate)."""
    base = tmp_path / "base"
    hf_moe_model("qwen2_moe", vocab_size=151936).save_pretrained(base)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, base / name)
    merge(base, write_lora_adapter(base, tmp_path / "lora", seed=1), tmp_path / "merged")
    written = tensors(tmp_path / "merged")
    assert written == tensors(base)
    layer0 = {k.removeprefix("model.layers.0.mlp.") for k in written if k.startswith("model.layers.0.mlp.")}
    experts = {f"experts.{e}.{p}_proj.weight" for e in range(8) for p in ("gate", "up", "down")}
    shared = {f"shared_expert.{p}_proj.weight" for p in ("gate", "up", "down")}
    assert layer0 == experts | shared | {"gate.weight", "shared_expert_gate.weight"}
    assert written["lm_head.weight"] == ("F32", (151936, 64))
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"] == ["Qwen2MoeForCausalLM"] and config["num_experts"] == 8
    assert config["shared_expert_intermediate_size"] == 96 and config["moe_intermediate_size"] == 32
