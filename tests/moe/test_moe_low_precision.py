"""MoE parity in bfloat16 and float16 (``--dtype``), against transformers run at the same dtype.

transformers 5's experts (grouped_mm, its default) add a token's K weighted expert outputs in float32
and round once, as vLLM and llama.cpp do; qwenkit rounded each of the K - 1 partial sums to bf16, so with
top-4 its logits were up to 0.03 off transformers' (8 bf16 steps) where top-2 (one add) matched exactly.
"""

from __future__ import annotations

import pytest
import torch
from moe_models import hf_moe_model

from qwenkit.checkpoint import load_model

CASES = {
    "qwen3_moe-top4": ("qwen3_moe", dict(num_experts_per_tok=4)),
    "qwen3_moe-top8-raw": ("qwen3_moe", dict(num_experts_per_tok=8, norm_topk_prob=False)),
    "qwen2_moe-top4-shared": ("qwen2_moe", dict(num_experts_per_tok=4)),
}


@pytest.mark.parametrize("case", list(CASES))
# qwenkit's CPU kernels (fast_kernels) add the K outputs as MoEMLP does, bit for bit (test_moe_kernels);
# their packed products round some other sums in another order, so there the logits are not transformers'
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_topk_sum_rounds_once_as_transformers(case, dtype, tmp_path):
    import transformers

    variant, extra = CASES[case]
    # weights ten times transformers' init: logits of a few units, where a bf16 step is 0.016
    hf_moe_model(variant, initializer_range=0.1, **extra).save_pretrained(tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m", dtype=dtype).eval()
    model, _ = load_model(tmp_path / "m", dtype=dtype, progress=False)
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        ours = model(ids).float()
    assert ref.abs().max() > 2
    assert (ours - ref).abs().max().item() == 0.0
