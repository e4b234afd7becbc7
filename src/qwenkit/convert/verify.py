"""Check that a converted checkpoint computes the same function as its source.

Both directories are loaded with ``load_model`` in float32 (one after the other, so memory holds one
model at a time) and run on the same prompts: the full-prompt logits are compared and a few greedy tokens
are decoded from each. Within the trained length a lossless conversion gives the same numbers; past it,
a Qwen v1 source with dynamic NTK / LogN differs, and that difference is measured when it is cheap.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass, field
from pathlib import Path

import torch

from qwenkit.checkpoint.loader import load_model, open_checkpoint
from qwenkit.config import ModelConfig

PROMPTS = (
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "通义千问是阿里云研发的大语言模型，它可以",
)
EXACT_TOLERANCE = 1e-4  # relative to the largest |logit|; float32, identical weights: in practice 0
LOSSY_TOLERANCE = 2e-2  # weights rounded to a narrower dtype
LONG_CONTEXT_PROBE_MAX = 1024  # measure past the trained length only when that is this short (tests)


@dataclass
class VerifyResult:
    prompts: int = 0
    max_abs_diff: float = 0.0
    logit_scale: float = 0.0  # largest |logit| of the source, what the tolerance is relative to
    tolerance: float = 0.0
    greedy_agree: int = 0
    greedy_total: int = 0
    lossy: bool = False
    long_context: str | None = None
    mismatched_prompts: list[int] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        greedy_ok = self.lossy or self.greedy_agree == self.greedy_total
        return self.max_abs_diff <= self.tolerance and greedy_ok

    def summary(self) -> str:
        return (
            f"{self.prompts} prompts, max |logit difference| {self.max_abs_diff:.3g} "
            f"(tolerance {self.tolerance:.3g}, largest |logit| {self.logit_scale:.3g}), "
            f"greedy tokens agree {self.greedy_agree}/{self.greedy_total}"
        )


def verify_conversion(
    src: str | Path,
    out: str | Path,
    *,
    new_tokens: int = 8,
    lossy: bool = False,
    progress: bool = False,
) -> VerifyResult:
    """Compare the Qwen v1 checkpoint ``src`` with its conversion ``out`` (see the module docstring)."""
    config = ModelConfig.from_hf(open_checkpoint(src).hf_config)
    result = VerifyResult(lossy=lossy)
    seq_length = config.max_position_embeddings
    new_tokens = max(1, min(new_tokens, seq_length // 2))
    prompts = _prompt_ids(Path(out), config.vocab_size, seq_length - new_tokens)
    long_probe = None
    if (config.use_dynamic_ntk or config.use_logn_attn) and 2 * seq_length <= LONG_CONTEXT_PROBE_MAX:
        g = torch.Generator().manual_seed(1)
        long_probe = torch.randint(0, config.vocab_size, (2 * seq_length,), generator=g).tolist()

    ref = _run(src, prompts, new_tokens, long_probe, progress)
    got = _run(out, prompts, new_tokens, long_probe, progress)

    result.prompts = len(prompts)
    for i, ((ref_logits, ref_tokens), (logits, tokens)) in enumerate(
        zip(ref.prompts, got.prompts, strict=True)
    ):
        diff = float((ref_logits - logits).abs().max())
        result.max_abs_diff = max(result.max_abs_diff, diff)
        result.logit_scale = max(result.logit_scale, float(ref_logits.abs().max()))
        agree = sum(a == b for a, b in zip(ref_tokens, tokens, strict=True))
        result.greedy_agree += agree
        result.greedy_total += len(ref_tokens)
        if agree != len(ref_tokens):
            result.mismatched_prompts.append(i)
    result.tolerance = (LOSSY_TOLERANCE if lossy else EXACT_TOLERANCE) * max(1.0, result.logit_scale)
    if long_probe is not None:
        assert ref.long is not None and got.long is not None
        diff = float((ref.long - got.long).abs().max())
        same = int(ref.long.argmax()) == int(got.long.argmax())
        result.long_context = (
            f"at {len(long_probe)} tokens (twice the trained {seq_length}) the next-token logits differ "
            f"by up to {diff:.3g}; the top token is {'the same' if same else 'different'}"
        )
    return result


@dataclass
class _Outputs:
    prompts: list[tuple[torch.Tensor, list[int]]]  # per prompt: logits (T, V), greedy tokens
    long: torch.Tensor | None  # last-position logits of the long probe


def _run(
    path: str | Path, prompts: list[list[int]], new_tokens: int, long_probe: list[int] | None, progress: bool
) -> _Outputs:
    model, _ = load_model(path, dtype=torch.float32, progress=progress, dequantize=True)
    outputs = _Outputs([], None)
    with torch.inference_mode():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            logits = model(ids)[0]  # (T, V)
            tokens = [int(logits[-1].argmax())]
            # Recompute without a cache: the cache is not what is being checked here.
            for _ in range(new_tokens - 1):
                ids = torch.tensor([prompt + tokens])
                tokens.append(int(model(ids)[0, -1].argmax()))
            outputs.prompts.append((logits, tokens))
        if long_probe is not None:
            alphas = [model.ntk_alpha(len(long_probe))]
            outputs.long = model(torch.tensor([long_probe]), ntk_alphas=alphas)[0, -1]
    del model
    gc.collect()
    return outputs


def _prompt_ids(out: Path, vocab_size: int, max_len: int) -> list[list[int]]:
    """The fixed prompts, tokenized by the converted tokenizer; random ids where that does not fit the
    model (no tokenizer, or a small test vocabulary)."""
    prompts: list[list[int]] = []
    tokenizer_file = out / "tokenizer.json"
    if tokenizer_file.is_file():
        import tokenizers

        tok = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        prompts = [tok.encode(text, add_special_tokens=False).ids for text in PROMPTS]
    if not prompts or any(i >= vocab_size for p in prompts for i in p):
        g = torch.Generator().manual_seed(0)
        prompts = [torch.randint(0, vocab_size, (n,), generator=g).tolist() for n in (7, 12, 16)]
    return [p[: max(1, max_len)] for p in prompts]
