"""LoRA adapters at inference: beside any base layer, several at once, chosen per token.

Training wraps a layer in ``finetune.lora.LoRALinear``, whose base keeps the checkpoint's plain (or
quantized) layer and name. Serving wants the opposite: the base packed for the CPU kernels, q/k/v and
gate/up fused, and many adapters on one copy of the base weights, each request running through the one
it names (vLLM's ``--lora-modules``). So here a projection keeps its fast base and gains a side path
``y += B_a (A_a x)`` for the adapter ``a`` of each token (the adapter's scaling folded into B). A fused
projection's update is its parts' pairs stacked, A's rows side by side and B block-diagonal, so each
part's outputs get exactly that part's own update.

Slot 0 is the base model; adapters take slots 1..n in the order they were given. Only projections of
the decoder layers that see every token of the step in order take a side path: attention's, a dense
FFN's and a MoE layer's shared expert. A MoE layer's routed experts and router (each expert sees only
the tokens routed to it) and the output head (only the tokens whose logits are asked for) do not.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit import kernels
from qwenkit.errors import CheckpointError
from qwenkit.model.attention import Attention
from qwenkit.model.mlp import MLP

BASE_SLOT = 0


class AdapterNotServable(CheckpointError):
    """The adapter adapts a module the per-token side path does not serve (a routed expert, a router,
    the output head or the embedding)."""


@dataclass(frozen=True)
class LoRAPair:
    """One module's update in one adapter: ``delta = scaling * B @ A`` (peft's lora_A, lora_B)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float


class AdapterBank:
    """The adapters a model serves, by name, and which of them each token of the running forward uses."""

    def __init__(self, names: Sequence[str], default: str | None = None) -> None:
        self.names = list(names)
        self.default = BASE_SLOT if default is None else self.slot(default)
        # The running forward's selection, per thread: a forward outside the engine's thread (router
        # statistics, a test) never sees the engine's.
        self._running = threading.local()

    @property
    def slots(self) -> torch.Tensor | None:
        """Each token's slot in the running forward ((tokens,) int64), or None where all are the base's."""
        return getattr(self._running, "slots", None)

    @property
    def used(self) -> frozenset[int]:
        """The adapter slots the running forward's tokens use (empty: all are the base model's)."""
        return getattr(self._running, "used", frozenset())

    @property
    def groups(self) -> list[tuple[int, torch.Tensor | None]]:
        """The running forward's tokens of each adapter in use: (slot, their indices, or None for every
        token). Made on first use, once a forward: only torch's path (not the kernels') indexes by them."""
        running = self._running
        if getattr(running, "groups", None) is None:
            slots = running.slots
            if len(running.used) == 1 and bool((slots == next(iter(running.used))).all()):
                running.groups = [(next(iter(running.used)), None)]
            else:
                running.groups = [(s, (slots == s).nonzero()[:, 0]) for s in sorted(running.used)]
        return running.groups

    def slot(self, name: str | None) -> int:
        """The slot of adapter ``name`` (None: the default); KeyError for a name not served."""
        if name is None:
            return self.default
        try:
            return self.names.index(name) + 1
        except ValueError:
            raise KeyError(name) from None

    def name(self, slot: int) -> str | None:
        return None if slot == BASE_SLOT else self.names[slot - 1]

    @contextlib.contextmanager
    def selected(self, slots: Sequence[int] | None, tokens: int, device: torch.device) -> Iterator[bool]:
        """Within: token i of the forward runs through adapter ``slots[i]`` (every token through the
        default when None). Yields whether any token has an adapter."""
        if slots is None:
            slots = [self.default] * tokens
        if len(slots) != tokens:
            raise ValueError(f"{len(slots)} adapter slots for {tokens} tokens")
        running = self._running
        running.used = frozenset(slots) - {BASE_SLOT}
        running.slots = torch.tensor(slots, dtype=torch.long, device=device) if running.used else None
        running.groups = None
        try:
            yield bool(running.used)
        finally:
            running.used, running.slots, running.groups = frozenset(), None, None


class LoRAProjection(nn.Module):
    """A base projection plus, per adapter slot, a low-rank update: ``lora_at`` (adapters, in, R), A
    transposed, and ``lora_bt`` (adapters, R, out), B transposed with the scaling in it; float32, each
    adapter's rank zero-padded to R, a multiple of 16 (``kernels.lora_add_``'s vectors). On the CPU
    kernels (bf16) one ``kernels.lora_add_`` call adds every token's update, from ``tiles``: the pair
    again in the kernel's layout (``kernels.pack_lora``), a second copy of what is, beside the base
    weights, a few percent of them."""

    def __init__(
        self, base: nn.Module, bank: AdapterBank, lora_at: torch.Tensor, lora_bt: torch.Tensor
    ) -> None:
        super().__init__()
        self.base, self.bank = base, bank
        self.register_buffer("lora_at", lora_at, persistent=False)
        self.register_buffer("lora_bt", lora_bt, persistent=False)
        self.in_features, self.out_features = lora_at.shape[1], lora_bt.shape[2]
        self.adapted = frozenset(i + 1 for i in range(lora_at.shape[0]) if lora_bt[i].any())
        self.on_kernels = lora_at.device.type == "cpu" and kernels.available()
        self.tiles = kernels.pack_lora(lora_at, lora_bt) if self.on_kernels else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapted & self.bank.used:
            return y
        if self.on_kernels and y.dtype == x.dtype == torch.bfloat16 and y.is_contiguous():
            kernels.lora_add_(
                y.view(-1, y.shape[-1]),
                x.reshape(-1, x.shape[-1]),
                *self.tiles,
                self.bank.slots,
            )
            return y
        groups = [(s, rows) for s, rows in self.bank.groups if s in self.adapted]
        if groups[0][1] is None:  # every token through one adapter
            return y + self._update(x, groups[0][0]).to(y.dtype)
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for s, rows in groups:
            flat_y.index_add_(0, rows, self._update(flat_x[rows], s).to(y.dtype))
        return y

    def _update(self, x: torch.Tensor, slot: int) -> torch.Tensor:
        """``B (A x)`` in float32, as ``LoRALinear`` computes it."""
        return (x.float() @ self.lora_at[slot - 1]) @ self.lora_bt[slot - 1]


def stack_lora(parts: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """(at, bt) of the parts' outputs side by side, from those that are :class:`LoRAProjection` (the
    others add nothing): the ranks stacked, bt block-diagonal. Each output's update is then its own
    part's, bit for bit (the other parts' ranks add exact zeros)."""
    adapters = next(p.lora_at.shape[0] for p in parts if isinstance(p, LoRAProjection))
    ranks = [p.lora_at.shape[2] if isinstance(p, LoRAProjection) else 0 for p in parts]
    at = torch.zeros(adapters, parts[0].in_features, sum(ranks))
    bt = torch.zeros(adapters, sum(ranks), sum(p.out_features for p in parts))
    row = col = 0
    for p, r in zip(parts, ranks, strict=True):
        if r:
            at[:, :, row : row + r] = p.lora_at
            bt[:, row : row + r, col : col + p.out_features] = p.lora_bt
        row, col = row + r, col + p.out_features
    return at, bt


def served_projections(model: nn.Module) -> dict[str, LoRAProjection]:
    """The projections with side paths, by their names in this model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRAProjection)}


@dataclass(frozen=True)
class _Target:
    path: str  # the module that computes it now (a fused projection, or the layer itself)
    rows: slice  # its outputs among that module's


def serve_adapters(
    model: nn.Module, adapters: dict[str, dict[str, LoRAPair]], default: str | None = None
) -> AdapterBank:
    """Give ``model`` these adapters (name -> {checkpoint module name: pair}) as side paths and set
    ``model.adapters``; ``default``: the adapter of tokens that name none (None: the base model).
    Raises :class:`AdapterNotServable` naming a module the side path does not serve, and
    ``CheckpointError`` for a module this model lacks or a pair of the wrong shape."""
    bank = AdapterBank(list(adapters), default)
    updates: dict[str, dict[int, list[tuple[slice, LoRAPair]]]] = {}
    for slot, (adapter, pairs) in enumerate(adapters.items(), 1):
        for name, pair in pairs.items():
            target = _resolve(model, name, adapter)
            _check_shape(model.get_submodule(target.path), target, name, pair, adapter)
            updates.setdefault(target.path, {}).setdefault(slot, []).append((target.rows, pair))
    for path, by_slot in updates.items():
        base = model.get_submodule(path)
        device = next(t.device for t in [*base.parameters(), *base.buffers()])
        rank = max(sum(p.a.shape[0] for _, p in parts) for parts in by_slot.values())
        rank = -(-rank // 16) * 16  # whole vectors of 16 for the kernel (zeros add nothing)
        lora_at = torch.zeros(len(adapters), base.in_features, rank)
        lora_bt = torch.zeros(len(adapters), rank, base.out_features)
        for slot, parts in by_slot.items():
            col = 0
            for rows, pair in parts:
                r = pair.a.shape[0]
                lora_at[slot - 1, :, col : col + r] = pair.a.float().T
                lora_bt[slot - 1, col : col + r, rows] = pair.b.float().T * pair.scaling
                col += r
        parent, _, child = path.rpartition(".")
        setattr(
            model.get_submodule(parent),
            child,
            LoRAProjection(base, bank, lora_at.contiguous().to(device), lora_bt.to(device)),
        )
    model.adapters = bank
    return bank


def check_servable(name: str, adapter: str) -> None:
    """Raise :class:`AdapterNotServable` unless module ``name`` (the checkpoint's) sees every token."""
    if (
        not name.startswith("model.layers.")
        or ".mlp.experts." in name
        or name.endswith(("mlp.gate", "_gate"))
    ):
        raise AdapterNotServable(
            f"adapter {adapter!r} adapts {name}; served adapters may adapt the decoder layers' attention "
            "and dense or shared-expert FFN projections only (not routed experts, routers, the output "
            "head or the embedding)"
        )


def _resolve(model: nn.Module, name: str, adapter: str) -> _Target:
    """Where module ``name`` (the checkpoint's) is computed in this model, which may have fused it."""
    check_servable(name, adapter)
    parent_name, _, leaf = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name)
    except AttributeError:
        parent = None
    if parent is not None and hasattr(parent, leaf):
        layer = getattr(parent, leaf)
        if isinstance(layer, nn.Module) and hasattr(layer, "out_features"):
            return _Target(name, slice(0, layer.out_features))
    if (
        isinstance(parent, Attention)
        and parent.qkv_proj is not None
        and leaf in ("q_proj", "k_proj", "v_proj")
    ):
        q, kv = parent.n_heads * parent.head_dim, parent.n_kv * parent.head_dim
        start = {"q_proj": 0, "k_proj": q, "v_proj": q + kv}[leaf]
        return _Target(f"{parent_name}.qkv_proj", slice(start, start + (q if leaf == "q_proj" else kv)))
    if isinstance(parent, MLP) and parent.gate_up_silu is not None and leaf in ("gate_proj", "up_proj"):
        width = parent.down_proj.in_features
        start = 0 if leaf == "gate_proj" else width
        return _Target(f"{parent_name}.gate_up_silu.linear", slice(start, start + width))
    raise CheckpointError(f"adapter {adapter!r} adapts {name}, which this model does not have")


def _check_shape(module: nn.Module, target: _Target, name: str, pair: LoRAPair, adapter: str) -> None:
    r = pair.a.shape[0]
    out = target.rows.stop - target.rows.start
    if (
        pair.a.dim() != 2
        or pair.b.dim() != 2
        or tuple(pair.a.shape) != (r, module.in_features)
        or tuple(pair.b.shape) != (out, r)
    ):
        raise CheckpointError(
            f"adapter {adapter!r} is for another model shape: {name} has lora_A {tuple(pair.a.shape)} and "
            f"lora_B {tuple(pair.b.shape)}, but this model needs ({r}, {module.in_features}) and ({out}, {r})"
        )
