"""The collectives that make a rank's shard compute the whole model: one all-reduce after each block's
attention output and MLP output (row-parallel layers), a vocabulary-parallel embedding lookup, and the
output head's logits gathered so every rank holds the full (.., V) logits."""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist
from torch import nn

from qwenkit.distributed.group import TensorParallel, collective
from qwenkit.distributed.plan import ROW_MODULES


class VocabParallelEmbedding(nn.Module):
    """An embedding holding rows [start, start + rows) of the vocabulary (``local``: a float
    ``nn.Embedding``, or a ``QuantizedEmbedding`` under ``--quantize``): ids outside look up zeros, and
    the all-reduce fills in every row from the rank that holds it (exactly: one term is non-zero)."""

    def __init__(self, local: nn.Module, tp: TensorParallel) -> None:
        super().__init__()
        self.local = local
        self.rows = local.num_embeddings
        self.start = tp.rank * self.rows
        self.group = tp.group

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = self.local(local.masked_fill(outside, 0))  # (B, T, hidden)
        out = out.masked_fill(outside.unsqueeze(-1), 0)
        with collective("all-reduce"):
            dist.all_reduce(out, group=self.group)
        return out


def _all_reduce_output(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    with collective("all-reduce"):
        dist.all_reduce(output, group=module._tp_group)
    return output


def _gather_logits(module: nn.Module, args: object, output: torch.Tensor) -> torch.Tensor:
    parts = [torch.empty_like(output) for _ in range(dist.get_world_size(module._tp_group))]
    with collective("all-gather"):
        dist.all_gather(parts, output.contiguous(), group=module._tp_group)
    return torch.cat(parts, dim=-1)  # (.., V): vocabulary slices in rank order


def parallelize(model: nn.Module, tp: TensorParallel) -> nn.Module:
    """Add the collectives to a model built from ``plan.local_config`` and loaded with its slices."""
    if tp.world == 1:
        return model
    # each dense row-parallel layer's output, and a mixture-of-experts block's once (its experts' and
    # shared expert's down_proj partial sums, weighted by a routing every rank computes alike)
    moe_blocks = [m for name, m in model.named_modules() if name.endswith(".mlp") and hasattr(m, "experts")]
    row_parallel = [m for name, m in model.named_modules() if name.endswith(ROW_MODULES)] + moe_blocks
    for module in row_parallel:
        module._tp_group = tp.group
        module.register_forward_hook(_all_reduce_output)
    model.model.embed_tokens = VocabParallelEmbedding(model.model.embed_tokens, tp)
    model.lm_head._tp_group = tp.group
    model.lm_head.register_forward_hook(_gather_logits)
    # What the model now computes, as an engine sees it: this rank's heads (its KV-cache share), and
    # logits over the whole vocabulary.
    model.config = dataclasses.replace(model.config, vocab_size=model.config.vocab_size * tp.world)
    return model
