"""MoE GGUF files (llama.cpp's stacked experts ffn_*_exps, router ffn_gate_inp, shared expert *_shexp)
load to the logits of the same weights in transformers, and convert to a checkpoint transformers loads."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from gguf.quants import dequantize, quantize
from gguf_files import Q, tiny_vocab, write_gguf
from moe_models import hf_moe_model
from safetensors.torch import load_file, save_file

from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf

VOCAB = len(tiny_vocab()[0])
ARCH = {"qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
IDS = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(0))


def _stacked(sd: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    """Per-expert checkpoint tensors -> llama.cpp's layout: experts stacked, the shared gate 1-D."""
    out = {n: t for n, t in sd.items() if ".mlp.experts." not in n}
    for i in range(config.num_hidden_layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            parts = [sd[f"model.layers.{i}.mlp.experts.{e}.{proj}.weight"] for e in range(config.num_experts)]
            out[f"model.layers.{i}.mlp.experts.{proj}.weight"] = torch.stack(parts)  # (E, rows, cols)
        gate = f"model.layers.{i}.mlp.shared_expert_gate.weight"
        if gate in out:
            out[gate] = out[gate][0]  # (hidden,), as quantized llama.cpp files hold it
    return out


def _rounded(sd: dict[str, torch.Tensor], qtype) -> dict[str, torch.Tensor]:
    """What the GGUF stores: 1-D tensors (and the shared gate, written 1-D) exact, the rest rounded to
    F16 or Q8_0 blocks of 32."""

    def rounded(name: str, t: torch.Tensor) -> torch.Tensor:
        if t.ndim == 1 or name.endswith("shared_expert_gate.weight"):
            return t
        if qtype == Q.F16:
            return t.half().float()
        return torch.from_numpy(dequantize(quantize(t.numpy(), Q.Q8_0), Q.Q8_0))

    return {n: rounded(n, t) for n, t in sd.items()}


def _write(tmp_path, variant: str, qtype):
    hf = hf_moe_model(variant, vocab_size=VOCAB)
    cfg = hf.config
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")

    def moe_keys(w) -> None:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if variant.startswith("qwen2_moe"):
            w.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)

    arch = ARCH[variant.split("-")[0]]
    path = write_gguf(tmp_path / "moe.gguf", arch, cfg.to_dict(), _stacked(sd, cfg), qtype, extra=moe_keys)
    # transformers running exactly the weights the file holds
    ref_dir = tmp_path / "rounded"
    ref_dir.mkdir()
    (ref_dir / "config.json").write_text((tmp_path / "hf" / "config.json").read_text())
    save_file(_rounded(sd, qtype), str(ref_dir / "model.safetensors"))
    ref = transformers.AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float32).eval()
    return path, ref


@pytest.mark.parametrize("qtype", [Q.F16, Q.Q8_0], ids=["f16", "q8_0"])
@pytest.mark.parametrize("variant", ["qwen2_moe", "qwen3_moe"])
def test_moe_gguf_loads_to_the_same_logits(tmp_path, variant, qtype):
    path, ref = _write(tmp_path, variant, qtype)
    ckpt = read_gguf(path)
    cfg = ckpt.hf_config
    assert cfg["model_type"] == variant and cfg["num_experts"] == 8
    assert cfg["num_experts_per_tok"] == ref.config.num_experts_per_tok
    assert cfg["norm_topk_prob"] == ref.config.norm_topk_prob and cfg["mlp_only_layers"] == []
    assert cfg["moe_intermediate_size"] == 32
    if variant == "qwen2_moe":
        assert cfg["shared_expert_intermediate_size"] == 96
    names = ckpt.tensor_names()
    assert "model.layers.2.mlp.experts.7.down_proj.weight" in names
    assert names == [n for n, _ in ckpt.tensors()]

    model, _ = load_model(path, dtype="float32", progress=False, dequantize=True)
    with torch.no_grad():
        ours, theirs = model(IDS), ref(IDS).logits
    # F16: the same function exactly; Q8_0: exactly what its rounded weights compute.
    assert (ours - theirs).abs().max().item() < 1e-4
    # In the file's precision, attention runs on int8 kernels (bfloat16 activations); the stacked experts
    # stay float (no kernel runs them quantized yet).
    own, _ = load_model(path, dtype="float32", progress=False)
    with torch.no_grad():
        got = own(IDS)
    assert (got - theirs).abs().max().item() < 2e-2 * theirs.abs().max().item()


@pytest.mark.slow
def test_convert_moe_gguf_to_hf_loads_in_transformers(tmp_path):
    path, ref = _write(tmp_path, "qwen2_moe", Q.Q8_0)
    out = convert_gguf_to_hf(path, tmp_path / "converted")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2MoeForCausalLM"] and cfg["num_experts"] == 8
    theirs = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        assert (theirs(IDS).logits - ref(IDS).logits).abs().max().item() < 1e-4
    ours, _ = load_model(out, dtype="float32", progress=False)
    with torch.no_grad():
        assert (ours(IDS) - ref(IDS).logits).abs().max().item() < 1e-4


def test_moe_gguf_expert_count_mismatch_is_one_line(tmp_path):
    hf = hf_moe_model("qwen3_moe", vocab_size=VOCAB)
    hf.save_pretrained(tmp_path / "hf")
    sd = load_file(tmp_path / "hf" / "model.safetensors")

    def wrong(w) -> None:
        w.add_expert_count(6)
        w.add_expert_used_count(2)

    path = write_gguf(
        tmp_path / "bad.gguf", "qwen3moe", hf.config.to_dict(), _stacked(sd, hf.config), extra=wrong
    )
    with pytest.raises(GGUFError, match=r"expert_count 6 disagrees with blk.0.ffn_up_exps \(8 experts\)"):
        read_gguf(path)
