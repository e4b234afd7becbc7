"""Parity in bfloat16 and float16 (``--dtype``): our logits equal transformers' run at the same dtype, bit
for bit, so every rounding (RMSNorm in float32, RoPE in the activation dtype, residual adds, q/k norm,
tied head, attention bias) is transformers' own. float16 decode steps through the engine's paged KV cache
too (bfloat16 steps run qwenkit's attention kernels, which sum in another order)."""

from __future__ import annotations

import pytest
import torch
from factories import hf_model
from transformers import DynamicCache

from qwenkit.checkpoint import load_model
from qwenkit.engine import Engine, SamplingParams

VARIANTS = {
    "qwen2": ("qwen2", {}),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("qwen3", {}),
    "qwen3-attention-bias": ("qwen3", dict(attention_bias=True)),
    "llama-attention-bias": ("llama", dict(attention_bias=True)),
}
DTYPES = pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])


def _models(variant: str, dtype: torch.dtype, path):
    import transformers

    family, extra = VARIANTS[variant]
    # weights five times transformers' init: logits of a few units, where a bf16 step is 0.016
    hf_model(family, initializer_range=0.1, **extra).save_pretrained(path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()
    return hf, load_model(path, dtype=dtype, progress=False)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
@DTYPES
def test_prompt_logits_equal_transformers_at_the_same_dtype(variant, dtype, tmp_path):
    hf, model = _models(variant, dtype, tmp_path / "m")
    ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids).logits.float()
        ours = model(ids).float()
    assert ref.abs().max() > 2
    assert (ours - ref).abs().max().item() == 0.0


def _engine_logits(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    """Greedy tokens and the logits of every step (prefill's last row, then each decode step)."""
    rows: list[torch.Tensor] = []
    hook = model.lm_head.register_forward_hook(
        lambda m, i, o: rows.append(o.detach().float().reshape(-1, o.shape[-1])[-1]) if o.numel() else None
    )
    try:
        engine = Engine(model, max_batch_size=1)
        engine.add_request(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True))
        tokens: list[int] = []
        while engine.has_unfinished():
            for out in engine.step():
                tokens += out.new_token_ids
    finally:
        hook.remove()
    return tokens, torch.stack(rows)


@pytest.mark.parametrize("variant", ["qwen2", "qwen3", "llama-attention-bias"])
def test_float16_decode_steps_equal_transformers_cached_steps(variant, tmp_path):
    hf, model = _models(variant, torch.float16, tmp_path / "m")
    prompt = torch.randint(0, 512, (30,), generator=torch.Generator().manual_seed(1)).tolist()
    tokens, ours = _engine_logits(model, prompt, 12)
    with torch.no_grad():
        cache = DynamicCache()
        out = hf(torch.tensor([prompt]), past_key_values=cache, use_cache=True)
        ref = [out.logits[0, -1]]
        for token in tokens[:-1]:
            out = hf(torch.tensor([[token]]), past_key_values=out.past_key_values, use_cache=True)
            ref.append(out.logits[0, -1])
    assert (ours - torch.stack(ref).float()).abs().max().item() == 0.0
