"""QLoRA on a published-GPTQ-layout checkpoint: a tiny model quantized by `qwenkit quantize` with dynamic
act-order (AutoGPTQ's layout with desc_act and a permuted g_idx) trains with `qwenkit finetune --method
qlora` on its own int4 layers, and the adapter loads in peft + transformers on the checkpoint's exact
dequantized weights with the logits qwenkit computes with `--adapter`."""

from __future__ import annotations

import json

import pytest
import torch
from factories import write_tiny_chat_model

from qwenkit.checkpoint import load_model
from qwenkit.cli import main as qwenkit
from qwenkit.model.served_adapters import served_projections
from qwenkit.quant import QuantizedLinear

IDS = torch.tensor([[151644, 872, 198, 9707, 11, 1246, 525, 498, 30, 151645, 198, 151644, 77091, 198]])


@pytest.fixture(scope="module")
def gptq_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("gptq")
    src = write_tiny_chat_model(root / "float", hidden_size=64, intermediate_size=128)
    calib = root / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = root / "int4"
    args = ["--bits", "4", "--group-size", "32", "--act-order", "dynamic", "--calib", str(calib)]
    assert (
        qwenkit(["quantize", str(src), str(out), "-q", *args, "--calib-samples", "4", "--seq-len", "32"]) == 0
    )
    return out


def dequantized_hf_model(gptq_dir):
    """transformers' model holding what the checkpoint's codes, scales and g_idx mean (AutoGPTQ's
    (q - zero) * scale, in float32): the float base a user would hand to peft."""
    import transformers

    quant, _ = load_model(gptq_dir, "float32", progress=False)
    hf_config = json.loads((gptq_dir / "config.json").read_text())
    hf_config.pop("quantization_config")
    model = transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**hf_config)).eval()
    modules = dict(quant.named_modules())
    with torch.no_grad():
        for name, p in model.named_parameters():
            owner, _, leaf = name.rpartition(".")
            layer = modules[owner]
            exact = isinstance(layer, QuantizedLinear) and leaf == "weight"
            p.copy_(layer.weight_dequantized(torch.float32) if exact else getattr(layer, leaf))
    return model, quant


@pytest.mark.slow
def test_qlora_trains_on_gptq_checkpoint_and_the_adapter_loads_in_peft(gptq_dir, tmp_path, monkeypatch):
    import peft

    # This checks what the adapter file means, so inference runs PyTorch's int4 kernel (bf16 activations,
    # a rounding the adapter does not change); qwenkit's AVX-512 kernels round activations to int8, which
    # the adapter's changed activations then round differently (tests/quant covers those kernels).
    monkeypatch.setenv("QWENKIT_KERNELS", "torch")

    _, config = load_model(gptq_dir, "float32", progress=False)
    assert config.quantization["desc_act"] is True
    data = tmp_path / "train.jsonl"
    with open(data, "w") as f:
        for i in range(8):
            msgs = [{"role": "user", "content": f"Code {i}?"}, {"role": "assistant", "content": "PINEAPPLE"}]
            f.write(json.dumps({"messages": msgs}) + "\n")
    out = tmp_path / "adapter"
    argv = ["finetune", str(gptq_dir), str(data), str(out), "--method", "qlora", "--epochs", "3"]
    argv += ["--lr", "2e-2", "--batch-size", "4", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0"]
    assert qwenkit([*argv, "--max-len", "64"]) == 0
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 6 and losses[-1] < losses[0] - 0.05, losses

    # qwenkit: the GPTQ model itself (its int4 layers, act-order permutation included) with --adapter
    ours_model, _ = load_model(gptq_dir, "float32", progress=False, adapter=out)
    assert isinstance(served_projections(ours_model)["model.layers.0.mlp.down_proj"].base, QuantizedLinear)
    assert any(m.perm is not None for m in ours_model.modules() if isinstance(m, QuantizedLinear))
    base, quant = dequantized_hf_model(gptq_dir)
    peft_model = peft.PeftModel.from_pretrained(base, out).eval()
    with torch.no_grad():
        ours, ours_base = ours_model(IDS), quant(IDS)
        theirs = peft_model(IDS).logits[0]
        with peft_model.disable_adapter():
            theirs_base = peft_model(IDS).logits[0]
    ours, ours_base = ours[0], ours_base[0]
    # The int4 matmul kernel rounds activations to bfloat16, so the two bases differ a little; the
    # adapter adds nothing to that difference, and what it changes is the same on both sides.
    kernel_rounding = (ours_base - theirs_base).abs().max().item()
    assert kernel_rounding < 2e-3
    assert (ours - theirs).abs().max().item() < kernel_rounding + 1e-4
    assert (theirs - theirs_base).abs().max() > 50 * kernel_rounding  # the trained adapter matters
