"""peft's VeLoRA adapters (``velora_config``): VeLoRA compresses the activations kept for the backward
pass only, so the adapter computes plain LoRA at inference (peft's eval forward and merge are
``x @ A.T @ B.T * scaling``); its saved ``lora_velora_embed`` is training state, not a weight."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.finetune.adapter_io import load_adapter

peft = pytest.importorskip("peft")
VeloraConfig = getattr(peft.tuners.lora.config, "VeloraConfig", None)

IDS = torch.tensor([[3, 17, 200, 5, 9, 41, 300, 7]])


@pytest.mark.skipif(VeloraConfig is None, reason="this peft has no VeLoRA")
def test_a_velora_adapter_runs_as_peft_runs_it(tmp_path):
    import transformers

    base_dir = save_hf(hf_model("qwen2"), tmp_path / "m")
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], velora_config=VeloraConfig(num_groups=4)
    )
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base_dir), config)
    model.train()
    model(IDS).logits.sum().backward()  # a training step sets VeLoRA's projection from the activations
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    model.eval().save_pretrained(tmp_path / "velora")
    with torch.no_grad():
        theirs = model(IDS).logits
        merged = model.merge_and_unload()(IDS).logits
    path = tmp_path / "velora"

    served, _ = load_model(base_dir, "float32", progress=False, adapters={"v": path})
    wrapped, _ = load_model(base_dir, "float32", progress=False)
    load_adapter(wrapped, path)
    plain, _ = load_model(base_dir, "float32", progress=False)
    with torch.no_grad():
        ours = served(IDS, adapter_slots=[1] * IDS.shape[1])
        assert (theirs - plain(IDS)).abs().max() > 0.05  # the adapter matters
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
        torch.testing.assert_close(wrapped(IDS), theirs, rtol=0, atol=1e-4)
        torch.testing.assert_close(ours, merged, rtol=0, atol=1e-4)
