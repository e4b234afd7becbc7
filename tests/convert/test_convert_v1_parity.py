"""Conversion invariant: the converted qwen2 checkpoint computes the same function as its Qwen v1 source.

The reference for the source is tests/qwen_v1_reference.py (written from modeling_qwen.py), the reference
for the output is transformers' own Qwen2ForCausalLM: neither shares code with the converter.
"""

from __future__ import annotations

import json

import torch
import transformers
from qwen_v1_reference import v1_greedy, v1_logits
from safetensors.torch import load_file
from v1_sources import source_config, source_tensors, write_source

from qwenkit.convert.v1_to_qwen2 import convert_v1_to_qwen2

PROMPTS = [[5, 17, 300, 2, 99, 45, 12, 8, 400, 3, 1, 0], [42] * 3 + [7, 511, 256], list(range(100, 120))]


def hf_model(path, **kwargs):
    return transformers.Qwen2ForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kwargs).eval()


def output_tensors(path) -> dict[str, torch.Tensor]:
    index = json.loads((path / "model.safetensors.index.json").read_text())
    sd: dict[str, torch.Tensor] = {}
    for f in sorted(set(index["weight_map"].values())):
        sd |= load_file(path / f)
    assert set(sd) == set(index["weight_map"])
    return sd


def test_conversion_logits_equal_v1_reference(converted):
    sd, cfg = source_tensors(converted.src), source_config(converted.src)
    model = hf_model(converted.out)
    for prompt in PROMPTS:
        ids = torch.tensor(prompt)
        assert len(prompt) < cfg["seq_length"]
        with torch.no_grad():
            got = model(ids[None]).logits[0]
        want = v1_logits(sd, cfg, ids)
        assert (got - want).abs().max().item() < 1e-5


def test_conversion_greedy_tokens_equal_v1_reference(converted):
    sd, cfg = source_tensors(converted.src), source_config(converted.src)
    model = hf_model(converted.out)
    for prompt in PROMPTS[:2]:
        n = 10
        assert len(prompt) + n < cfg["seq_length"]  # past seq_length v1's NTK/LogN would act
        ids = torch.tensor([prompt])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            do_sample=False,
            top_k=None,
            top_p=None,
            temperature=None,
            repetition_penalty=None,
        )
        assert out[0, len(prompt) :].tolist() == v1_greedy(sd, cfg, prompt, n)


def test_conversion_w2_is_gate_and_w1_is_up(converted):
    sd, out = source_tensors(converted.src), output_tensors(converted.out)
    for i in range(2):
        assert torch.equal(
            out[f"model.layers.{i}.mlp.gate_proj.weight"], sd[f"transformer.h.{i}.mlp.w2.weight"]
        )
        assert torch.equal(
            out[f"model.layers.{i}.mlp.up_proj.weight"], sd[f"transformer.h.{i}.mlp.w1.weight"]
        )
        assert torch.equal(
            out[f"model.layers.{i}.mlp.down_proj.weight"], sd[f"transformer.h.{i}.mlp.c_proj.weight"]
        )
    # The same weights with gate and up swapped compute something else: the test above matters.
    model = hf_model(converted.out)
    with torch.no_grad():
        for layer in model.model.layers:
            gate, up = layer.mlp.gate_proj.weight.clone(), layer.mlp.up_proj.weight.clone()
            layer.mlp.gate_proj.weight.copy_(up)
            layer.mlp.up_proj.weight.copy_(gate)
        ids = torch.tensor(PROMPTS[0])
        swapped = model(ids[None]).logits[0]
    assert (swapped - v1_logits(sd, source_config(converted.src), ids)).abs().max().item() > 1e-2


def test_conversion_splits_c_attn_rows_into_q_k_v(converted):
    sd, out = source_tensors(converted.src), output_tensors(converted.out)
    h = source_config(converted.src)["hidden_size"]
    for i in range(2):
        w, b = sd[f"transformer.h.{i}.attn.c_attn.weight"], sd[f"transformer.h.{i}.attn.c_attn.bias"]
        for j, proj in enumerate(("q_proj", "k_proj", "v_proj")):
            p = f"model.layers.{i}.self_attn.{proj}"
            assert torch.equal(out[p + ".weight"], w[j * h : (j + 1) * h])
            assert torch.equal(out[p + ".bias"], b[j * h : (j + 1) * h])
        assert torch.equal(
            out[f"model.layers.{i}.self_attn.o_proj.weight"], sd[f"transformer.h.{i}.attn.c_proj.weight"]
        )
    assert torch.equal(out["model.embed_tokens.weight"], sd["transformer.wte.weight"])
    assert torch.equal(out["lm_head.weight"], sd["lm_head.weight"])
    assert torch.equal(out["model.norm.weight"], sd["transformer.ln_f.weight"])
    # embed, norm, lm_head; per layer: 2 norms, q/k/v weight and bias, o, gate, up, down
    assert len(out) == 3 + 2 * 12


def test_conversion_keeps_bfloat16_bit_exact(tmp_path):
    src = write_source(tmp_path / "src", shards=2, dtype=torch.bfloat16)
    result = convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert result.torch_dtype == "bfloat16"
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "bfloat16"
    sd, out = source_tensors(src), load_file(tmp_path / "out" / "model.safetensors")
    assert all(t.dtype == torch.bfloat16 for t in out.values())
    assert torch.equal(out["model.layers.1.mlp.gate_proj.weight"], sd["transformer.h.1.mlp.w2.weight"])
    assert not any("rounds the weights" in n for n in result.notes)


def test_conversion_casts_with_dtype_and_says_it_rounds(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    result = convert_v1_to_qwen2(src, tmp_path / "out", dtype="bfloat16", verify=True, progress=False)
    assert result.verification.lossy and result.verification.passed, result.verification.summary()
    out = load_file(tmp_path / "out" / "model.safetensors")
    assert torch.equal(
        out["model.embed_tokens.weight"], source_tensors(src)["transformer.wte.weight"].bfloat16()
    )
    assert any("float32 -> bfloat16 rounds the weights" in n for n in result.notes)
    # The rounded model is close: transformers in float32 on it vs the v1 reference on the rounded source.
    sd = {k: v.bfloat16().float() for k, v in source_tensors(src).items()}
    ids = torch.tensor(PROMPTS[0])
    with torch.no_grad():
        got = hf_model(tmp_path / "out")(ids[None]).logits[0]
    assert (got - v1_logits(sd, source_config(src), ids)).abs().max().item() < 1e-5


def test_conversion_differs_past_trained_length_and_says_so(converted):
    """v1 dynamic NTK + LogN act past seq_length; qwen2 has neither (qwen_facts §5.3)."""
    sd, cfg = source_tensors(converted.src), source_config(converted.src)
    ids = torch.arange(2 * cfg["seq_length"]) % cfg["vocab_size"]
    with torch.no_grad():
        got = hf_model(converted.out)(ids[None]).logits[0]
    assert (got - v1_logits(sd, cfg, ids)).abs().max().item() > 1e-3
    assert any("LogN" in n and "differ" in n for n in converted.result.notes)
