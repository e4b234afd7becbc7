"""Fold a LoRA adapter into its base model and write a plain checkpoint (no adapter needed to load it).

The sum ``W + B @ A * scaling`` is done in float32 whatever the output dtype, then cast once (merging in
bf16 drifts), and the merged model's logits are compared with the adapter-applied model's on a probe:
in float32, and as stored in a narrower dtype (the rounding of every weight, base and update alike, as
the base alone would have in that dtype), beside how far the adapter moves the logits at all. The output
dtype is the base model's (config.json's ``torch_dtype``/``dtype``, as peft's ``merge_and_unload`` and
``save_pretrained`` keep it) unless one is asked for.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.loader import DTYPES, open_checkpoint
from qwenkit.checkpoint.output_dir import atomic_output_dir, check_out_dir
from qwenkit.errors import ConfigError
from qwenkit.finetune.adapter_io import load_adapter
from qwenkit.finetune.export import check_exportable, write_model_dir
from qwenkit.finetune.lora import adapters_disabled, merge_lora
from qwenkit.model.transformer import is_headless

PROBE = torch.tensor([[1, 2, 3, 5, 8, 13, 21, 34]])


@dataclass
class MergeReport:
    """Max |logit difference| on the probe: the adapter against the base (its effect), and the merged
    model against the adapter-applied one in float32 and as stored (equal to float32 for a float32 out)."""

    effect: float
    float32: float
    stored: float
    dtype: str = "float32"  # the stored dtype
    outputs: str = "logits"  # what was compared: a headless embedding model's final-norm hidden states


def base_dtype(hf_config: dict[str, Any]) -> str:
    """The dtype config.json names for the weights (transformers 5's ``dtype`` first, as it reads them),
    where it is one we write; else float32 (a GGUF file's blocks, or no dtype named)."""
    for key in ("dtype", "torch_dtype"):
        name = str(hf_config.get(key) or "").removeprefix("torch.")
        if name in DTYPES:
            return name
    return "float32"


def probe_outputs(model: torch.nn.Module, probe: torch.Tensor) -> torch.Tensor:
    """The probe's logits; a headless embedding model's final-norm hidden states (it has no head: its
    embeddings are what the adapter changes)."""
    if not is_headless(model):
        return model(probe)
    every = torch.arange(probe.numel())
    return model(probe, logits_index=every[:0], hidden_index=every)[1]


def merge(
    model_path: str | Path,
    adapter: str | Path,
    out: str | Path,
    dtype: str | None = None,
    overwrite: bool = False,
) -> MergeReport:
    """Write the merged model to ``out`` in ``dtype`` (None: the base model's); report how closely it
    reproduces the adapter-applied model."""
    if dtype is not None and dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose {', '.join(DTYPES)}")
    out = Path(out)
    check_out_dir(out, overwrite, Path(model_path))
    check_out_dir(out, overwrite, Path(adapter))  # --overwrite into the adapter's own directory lost it
    check_exportable(model_path)
    dtype = dtype or base_dtype(open_checkpoint(model_path).hf_config)
    model, config = load_model(model_path, "float32", progress=False, dequantize=True)
    load_adapter(model, adapter)  # LoRALinear layers, which merge_lora folds in
    probe = PROBE.clamp(max=config.vocab_size - 1)
    with torch.no_grad():
        before = probe_outputs(model, probe)
        with adapters_disabled(model):
            effect = float((probe_outputs(model, probe) - before).abs().max())
        merge_lora(model)
        diff = float((probe_outputs(model, probe) - before).abs().max())
    with atomic_output_dir(out, overwrite) as tmp:
        # an adapter of a tied output head unties it: the merged head is no longer the embedding
        tied = config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
        write_model_dir(model_path, model.state_dict(), tmp, DTYPES[dtype], tied, "`qwenkit merge`")
    stored = diff
    if DTYPES[dtype] != torch.float32:  # the weights as written, one tensor at a time (no second copy)
        with torch.no_grad():
            for p in model.parameters():
                p.data = p.data.to(DTYPES[dtype]).float()
            stored = float((probe_outputs(model, probe) - before).abs().max())
    return MergeReport(effect, diff, stored, dtype, "hidden states" if is_headless(model) else "logits")
