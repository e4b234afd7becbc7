"""Qwen v1 adapter names: qwenkit runs v1 in the Qwen2 layout, but v1 adapters name v1's own modules.

v1 has one fused ``attn.c_attn`` (q, k, v stacked) where qwenkit has q/k/v_proj, and calls the MLP
``w1`` (up), ``w2`` (gate) and ``c_proj`` (down); ``attn.c_proj`` is o_proj. Separate q/k/v adapters fuse
exactly into one c_attn adapter of rank 3r: A = [A_q; A_k; A_v] (3r, in) and B = blockdiag(B_q, B_k, B_v)
(3h, 3r), since B @ A then stacks B_q A_q, B_k A_k, B_v A_v. Its alpha is scaled so that alpha'/3r (or
alpha'/sqrt(3r) with rsLoRA) equals the per-projection scaling. Reading splits c_attn's B back into
three row blocks that share A.
"""

from __future__ import annotations

import math
import re

import torch

from qwenkit.errors import CheckpointError

OURS_TO_V1 = {
    "self_attn.o_proj": "attn.c_proj",
    "mlp.up_proj": "mlp.w1",
    "mlp.gate_proj": "mlp.w2",
    "mlp.down_proj": "mlp.c_proj",
}
V1_TO_OURS = {v: k for k, v in OURS_TO_V1.items()}
QKV = ("q_proj", "k_proj", "v_proj")
_OURS = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_V1 = re.compile(r"^transformer\.h\.(\d+)\.(.+)$")


def is_v1(names) -> bool:
    return any(_V1.match(n) for n in names)


def to_v1(
    modules: dict[str, dict[str, torch.Tensor]], r: int, alpha: float, rslora: bool
) -> tuple[dict[str, dict[str, torch.Tensor]], float | None]:
    """Our per-module (A, B) -> v1 names with q/k/v fused; also c_attn's alpha (None without c_attn)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    layers: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for name, pair in modules.items():
        m = _OURS.match(name)
        if m is None:
            raise CheckpointError(f"cannot name {name} in Qwen v1 terms")
        layer, rest = m.groups()
        proj = rest.removeprefix("self_attn.")
        if proj in QKV:
            layers.setdefault(layer, {})[proj] = pair
        elif rest in OURS_TO_V1:
            out[f"transformer.h.{layer}.{OURS_TO_V1[rest]}"] = pair
        else:
            raise CheckpointError(f"cannot name {name} in Qwen v1 terms")
    c_attn_alpha = None
    for layer, parts in layers.items():
        some = next(iter(parts.values()))
        in_f = some["lora_A"].shape[1]
        blocks_a, blocks_b, outs = [], [], []
        for proj in QKV:
            if proj not in parts:
                raise CheckpointError(
                    "a Qwen v1 adapter needs q_proj, k_proj and v_proj together (fused c_attn)"
                )
            blocks_a.append(parts[proj]["lora_A"])
            blocks_b.append(parts[proj]["lora_B"])
            outs.append(parts[proj]["lora_B"].shape[0])
        a = torch.cat(blocks_a)  # (3r, in)
        b = torch.block_diag(*blocks_b)  # (3h, 3r)
        assert a.shape == (3 * r, in_f)
        out[f"transformer.h.{layer}.attn.c_attn"] = {"lora_A": a, "lora_B": b}
        c_attn_alpha = alpha * math.sqrt(3) if rslora else alpha * 3
    return out, c_attn_alpha


def from_v1(
    modules: dict[str, dict[str, torch.Tensor]], scaling_of
) -> dict[str, tuple[dict[str, torch.Tensor], float]]:
    """v1-named (A, B) -> our names, each with its scaling (``scaling_of(v1 name, rank)``)."""
    out: dict[str, tuple[dict[str, torch.Tensor], float]] = {}
    for name, pair in modules.items():
        m = _V1.match(name)
        if m is None:
            raise CheckpointError(f"unexpected module {name} in a Qwen v1 adapter")
        layer, rest = m.groups()
        scaling = scaling_of(name, pair["lora_A"].shape[0])
        if rest == "attn.c_attn":
            b = pair["lora_B"]
            if b.shape[0] % 3:
                raise CheckpointError(f"{name}: lora_B has {b.shape[0]} rows, not three equal q/k/v blocks")
            for proj, block in zip(QKV, b.chunk(3), strict=True):
                out[f"model.layers.{layer}.self_attn.{proj}"] = (
                    {"lora_A": pair["lora_A"], "lora_B": block},
                    scaling,
                )
        elif rest in V1_TO_OURS:
            out[f"model.layers.{layer}.{V1_TO_OURS[rest]}"] = (pair, scaling)
        else:
            raise CheckpointError(f"unexpected module {name} in a Qwen v1 adapter")
    return out
