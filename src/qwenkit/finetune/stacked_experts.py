"""Adapters that peft writes for transformers 5's stacked experts, read as one adapter pair per expert.

transformers 5 holds a mixture-of-experts layer's routed experts as two 3-D parameters:
``mlp.experts.gate_up_proj`` (E, 2I, h: each expert's gate rows, then its up rows) and
``mlp.experts.down_proj`` (E, h, I). peft (0.17 and later) adapts them through ``target_parameters``, one
wrapper per parameter nested on the ``mlp.experts`` module, so its file names ``mlp.experts.lora_A/B`` and
``mlp.experts.base_layer.lora_A/B``. A is (E*r, in) and B is (out, r*E); expert e's pair is
``A.view(E, r, in)[e]`` and ``B.view(out, r, E)[:, :, e]`` (peft's ``ParamWrapper.get_delta_weight``).

qwenkit keeps each expert a separate MLP under the checkpoint's own names (as transformers 4 and vLLM do),
so each expert gets its own pairs: gate_proj and up_proj share the expert's A and take the two row halves
of its B, which is exactly the stacked update. Which wrapper adapts which parameter is read from the shapes
(gate_up's A has h columns and its B 2I rows), because peft's nesting order follows the order it wrapped
them in, not the names.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch
from torch import nn

from qwenkit.errors import CheckpointError

_STACKED = re.compile(r"^(.+\.mlp\.experts)(?:\.base_layer)*$")

Pair = dict[str, torch.Tensor]


def is_stacked(names) -> bool:
    """Whether an adapter's module names include peft's wrappers of stacked expert parameters."""
    return any(_STACKED.match(n) for n in names)


def from_stacked(
    modules: dict[str, Pair],
    model: nn.Module,
    scaling_of: Callable[[str, int], float],
    rank_of: Callable[[str], int],
) -> dict[str, tuple[Pair, float]]:
    """Module pairs with the stacked ones split per expert; each with its scaling (``scaling_of(name, r)``)
    and checked against its rank in the adapter's config (``rank_of(name)``): a stacked pair of another
    expert count has rows that divide all the same. Names are ``...mlp.experts.gate_up_proj`` or
    ``...down_proj``, as peft's rank and alpha patterns see them."""
    out: dict[str, tuple[Pair, float]] = {}
    for name, pair in modules.items():
        m = _STACKED.match(name)
        if m is None:
            out[name] = (pair, scaling_of(name, pair["lora_A"].shape[0]))
        else:
            out.update(_split(m.group(1), pair, _experts(model, m.group(1)), scaling_of, rank_of))
    return out


def _experts(model: nn.Module, name: str) -> nn.ModuleList:
    try:
        experts = model.get_submodule(name)
    except AttributeError:
        experts = None
    if not isinstance(experts, nn.ModuleList) or not len(experts):
        raise CheckpointError(f"adapter targets the experts {name}, which this model does not have")
    return experts


def _split(
    name: str,
    pair: Pair,
    experts: nn.ModuleList,
    scaling_of: Callable[[str, int], float],
    rank_of: Callable[[str], int],
) -> dict[str, tuple[Pair, float]]:
    a, b = pair["lora_A"], pair["lora_B"]
    n = len(experts)
    hidden, inter = experts[0].gate_proj.in_features, experts[0].gate_proj.out_features
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] % n or b.shape[1] != a.shape[0]:
        raise CheckpointError(
            f"{name}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} are not a stacked adapter of "
            f"this model's {n} experts"
        )
    if a.shape[1] == hidden and b.shape[0] == 2 * inter:
        parameter, parts = "gate_up_proj", {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter)}
    elif a.shape[1] == inter and b.shape[0] == hidden:
        parameter, parts = "down_proj", {"down_proj": slice(0, hidden)}
    else:
        raise CheckpointError(
            f"{name}: adapter for another model shape: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} "
            f"fit neither gate_up_proj ({2 * inter} x {hidden}) nor down_proj ({hidden} x {inter}) "
            f"of {n} experts"
        )
    r = rank_of(f"{name}.{parameter}")
    if a.shape[0] != n * r:
        raise CheckpointError(
            f"{name}: adapter for another model: its {parameter} pair has {a.shape[0]} rank rows, "
            f"{a.shape[0] / r:g} experts of rank {r}, but this model has {n} experts"
        )
    scaling = scaling_of(f"{name}.{parameter}", r)
    a_each = a.reshape(n, r, a.shape[1])  # (E, r, in)
    b_each = b.reshape(b.shape[0], r, n)  # (out, r, E)
    out = {}
    for e in range(n):
        a_e, b_e = a_each[e].contiguous(), b_each[:, :, e].contiguous()
        for proj, rows in parts.items():
            out[f"{name}.{e}.{proj}"] = ({"lora_A": a_e, "lora_B": b_e[rows].contiguous()}, scaling)
    return out
