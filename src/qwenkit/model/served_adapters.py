"""LoRA adapters at inference: beside any base layer, several at once, chosen per token.

Training wraps a layer in ``finetune.lora.LoRALinear``, whose base keeps the checkpoint's plain (or
quantized) layer and name. Serving wants the opposite: the base packed for the CPU kernels, q/k/v and
gate/up fused, and many adapters on one copy of the base weights, each request running through the one
it names (vLLM's ``--lora-modules``). So here a projection keeps its fast base and gains a side path
``y += B_a (A_a x)`` for the adapter ``a`` of each token (the adapter's scaling folded into B). A fused
projection's update is its parts' pairs stacked, A's rows side by side and B block-diagonal, so each
part's outputs get exactly that part's own update.

Which slot each adapter holds and which slot each token of a forward uses is kept by ``adapter_bank``;
an adapter loaded while serving (``add_adapter``) takes a freed slot or a new one. The decoder layers'
projections take side paths: attention's, a dense FFN's, a MoE layer's shared expert and its routed
experts (each expert's side paths see the slots of the tokens routed to it: ``AdapterBank.narrowed``).
A router and the output head (only the tokens whose logits are asked for) do not. Every change of the
pairs plans the whole-layer decode calls again (``transformer.refresh_decode_layers``): they hold the
tensors, not the modules.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit import kernels
from qwenkit.errors import CheckpointError, QwenkitError
from qwenkit.model.adapter_bank import BASE_SLOT, AdapterBank, AdapterSlotsFull, LoRAPair
from qwenkit.model.attention import Attention
from qwenkit.model.mlp import MLP
from qwenkit.model.modules import replace_module
from qwenkit.model.moe import MoEMLP
from qwenkit.model.transformer import refresh_decode_layers


class AdapterNotServable(CheckpointError):
    """The adapter adapts a module the per-token side path does not serve (a router, the output head or
    the embedding)."""


class AdapterNameError(QwenkitError, ValueError):
    """An adapter name that cannot be served: not a non-empty string, served already (to add), not served
    (to replace), or the default of every request."""


class AdapterNotServed(QwenkitError, KeyError):
    """Removing an adapter that is not served (a KeyError, as a lookup by name)."""

    def __str__(self) -> str:  # a KeyError prints its argument quoted; this is a sentence
        return str(self.args[0])


class AdapterRankTooHigh(QwenkitError, ValueError):
    """The adapter's rank is above the rank reserved for adapters (vLLM's ``--max-lora-rank``)."""


class InLayerAdapter(nn.Module):
    """A layer that computes its adapter's update inside itself (finetune's ``LoRALinear`` is one): a
    model holding one runs that adapter for every token and serves no others beside it."""


def runs_adapter_inside(model: nn.Module) -> bool:
    """Whether a layer of ``model`` computes an adapter inside itself (:class:`InLayerAdapter`)."""
    return any(isinstance(m, InLayerAdapter) for m in model.modules())


class LoRAProjection(nn.Module):
    """A base projection plus, per adapter slot, a low-rank update ``y += B (A x)``, the scaling in B,
    each adapter's rank zero-padded to R, a multiple of 16 (``kernels.lora_add_``'s vectors). One copy of
    the pairs, in the form the projection computes with: on the CPU kernels (a bf16 model) the kernel's
    bf16 tiles (``kernels.pack_lora``; the products run in float32), one ``kernels.lora_add_`` call
    adding every token's update; elsewhere float32 ``lora_at`` (adapters, in, R), A transposed, and
    ``lora_bt`` (adapters, R, out), B transposed, for torch's products (as ``LoRALinear`` computes).
    Every projection of a model holds a pair for each of the bank's slots (zeros where its adapter leaves
    it alone): the kernel indexes the pairs by slot."""

    def __init__(self, base: nn.Module, bank: AdapterBank, on_kernels: bool) -> None:
        super().__init__()
        self.base, self.bank = base, bank
        self.in_features, self.out_features = base.in_features, base.out_features
        self.device = next(t.device for t in [*base.parameters(), *base.buffers()])
        self.on_kernels = on_kernels  # _pairs_on_kernels: a bf16 model on the CPU kernels
        self.adapted: frozenset[int] = frozenset()  # the slots whose update is not zero
        self.lora_at: torch.Tensor | None = None
        self.lora_bt: torch.Tensor | None = None
        self.tiles: tuple[torch.Tensor, torch.Tensor] | None = None
        k, n = self.in_features, self.out_features
        self._hold(torch.zeros(0, k, 16, device=self.device), torch.zeros(0, 16, n, device=self.device))

    @property
    def held(self) -> tuple[int, int]:
        """(slots, R) of the pairs held."""
        if self.tiles is not None:
            return self.tiles[0].shape[0], self.tiles[1].shape[2]
        return self.lora_at.shape[0], self.lora_at.shape[2]

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(at, bt) of every slot as torch's products take them: the tiles unpacked where those are what
        is held (a copy: the kernels' path never needs it, only a forward off it and a rebuild)."""
        if self.tiles is None:
            return self.lora_at, self.lora_bt
        at_tiles, bt_tiles = self.tiles
        slots, vectors, k, _ = at_tiles.shape
        at = at_tiles.permute(0, 2, 1, 3).reshape(slots, k, vectors * 16).float()
        blocks, rank = bt_tiles.shape[1], bt_tiles.shape[2]
        bt = bt_tiles.permute(0, 2, 1, 3).reshape(slots, rank, blocks * 16)
        return at, bt[:, :, : self.out_features].float()

    def _hold(self, at: torch.Tensor, bt: torch.Tensor) -> None:
        if self.on_kernels and not len(at):  # none yet: pack_lora's shapes, empty
            _, k, rank = at.shape
            blocks = -(-self.out_features // 16)
            empty = at.new_zeros(0, dtype=torch.bfloat16)
            self.tiles = empty.reshape(0, rank // 16, k, 16), empty.reshape(0, blocks, rank, 16)
        elif self.on_kernels:
            self.tiles = kernels.pack_lora(at, bt)
        else:
            self.lora_at, self.lora_bt = at, bt

    def reserve(self, slots: int, rank: int) -> None:
        """Hold pairs for at least ``slots`` adapters of at least ``rank`` (a multiple of 16), so that
        adapters up to those are written in place (:meth:`write`) without a rebuild."""
        held, held_rank = self.held
        if slots > held or rank > held_rank:
            self._grow(max(slots, held), max(rank, held_rank))

    def _grow(self, slots: int, rank: int) -> None:
        """Rebuild every slot's pairs, larger: the held ones copied, the new ones zero."""
        held, held_rank = self.held
        old_at, old_bt = self.pairs()
        at = torch.zeros(slots, self.in_features, rank, device=self.device)
        bt = torch.zeros(slots, rank, self.out_features, device=self.device)
        at[:held, :, :held_rank], bt[:held, :held_rank] = old_at, old_bt
        self._hold(at, bt)

    def write(self, slots: int, pairs: dict[int, tuple[torch.Tensor, torch.Tensor] | None]) -> None:
        """Hold ``slots`` adapters (at least as many as now) and set these slots' (at, bt), A and B
        transposed with the scaling in bt, float32 (None: no update). The other slots keep theirs. In
        place where the slots and the rank suffice (one slot's pairs, not every slot's: an adapter loaded
        while serving holds up the running requests for less)."""
        held, rank = self.held
        ranks = [at.shape[1] for at, _ in filter(None, pairs.values())]
        new_rank = max([rank, *(-(-r // 16) * 16 for r in ranks)])  # whole vectors of 16 (zeros add nothing)
        if slots > held or new_rank > rank:
            self._grow(max(slots, held), new_rank)
        adapted = set(self.adapted)
        for slot, pair in pairs.items():
            at = torch.zeros(self.in_features, new_rank, device=self.device)
            bt = torch.zeros(new_rank, self.out_features, device=self.device)
            adapted.discard(slot)
            if pair is not None:
                r = pair[0].shape[1]
                at[:, :r], bt[:r] = pair
                adapted.add(slot)
            if self.tiles is None:
                self.lora_at[slot - 1], self.lora_bt[slot - 1] = at, bt
            else:
                for held_tiles, new in zip(self.tiles, kernels.pack_lora(at[None], bt[None]), strict=True):
                    held_tiles[slot - 1] = new[0]
        self.adapted = frozenset(adapted)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.adapted & self.bank.used:
            return y
        if self.tiles is not None and y.dtype == x.dtype == torch.bfloat16 and y.is_contiguous():
            kernels.lora_add_(
                y.view(-1, y.shape[-1]),
                x.reshape(-1, x.shape[-1]),
                *self.tiles,
                self.bank.slots,
            )
            return y
        at, bt = self.pairs()
        groups = [(s, rows) for s, rows in self.bank.groups if s in self.adapted]
        if groups[0][1] is None:  # every token through one adapter
            return y + _update(x, at[groups[0][0] - 1], bt[groups[0][0] - 1]).to(y.dtype)
        flat_x, flat_y = x.reshape(-1, x.shape[-1]), y.view(-1, y.shape[-1])
        for s, rows in groups:
            flat_y.index_add_(0, rows, _update(flat_x[rows], at[s - 1], bt[s - 1]).to(y.dtype))
        return y


def _update(x: torch.Tensor, at: torch.Tensor, bt: torch.Tensor) -> torch.Tensor:
    """``B (A x)`` in float32, as ``LoRALinear`` computes it."""
    return (x.float() @ at) @ bt


def stack_lora(parts: list[nn.Module]) -> tuple[torch.Tensor, torch.Tensor]:
    """(at, bt) of the parts' outputs side by side, from those that are :class:`LoRAProjection` (the
    others add nothing): the ranks stacked, bt block-diagonal. Each output's update is then its own
    part's, bit for bit (the other parts' ranks add exact zeros)."""
    pairs = [p.pairs() if isinstance(p, LoRAProjection) else None for p in parts]
    adapters = next(pair[0].shape[0] for pair in pairs if pair is not None)
    ranks = [0 if pair is None else pair[0].shape[2] for pair in pairs]
    at = torch.zeros(adapters, parts[0].in_features, sum(ranks))
    bt = torch.zeros(adapters, sum(ranks), sum(p.out_features for p in parts))
    row = col = 0
    for p, pair, r in zip(parts, pairs, ranks, strict=True):
        if r:
            at[:, :, row : row + r] = pair[0]
            bt[:, row : row + r, col : col + p.out_features] = pair[1]
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
    for name in adapters:
        _check_name(name)
    updates = _updates(model, adapters)
    bank = AdapterBank()
    bank.ranks = {
        name: max((p.a.shape[0] for p in pairs.values()), default=0) for name, pairs in adapters.items()
    }
    _install(model, bank, {name: bank.take(name) for name in adapters}, updates)
    bank.default = BASE_SLOT if default is None else bank.slot(default)
    model.adapters = bank
    refresh_decode_layers(model)  # the whole-layer decode calls, now with the adapters' updates
    return bank


def add_adapter(
    model: nn.Module,
    name: str,
    pairs: dict[str, LoRAPair],
    busy: Collection[int] = (),
    replace: bool = False,
) -> int:
    """Serve one more adapter on ``model`` (which may serve none yet); returns its slot. ``busy``: the
    slots requests still run on, which it must not take. ``replace``: ``name`` is served already and
    its new weights take a slot no request runs on (its own where none does), so requests running on
    the old ones finish on them. Nothing changes where the adapter is refused (the errors of
    :func:`serve_adapters`; ValueError for a name served already or, with ``replace``, not served;
    :class:`AdapterSlotsFull` and :class:`AdapterRankTooHigh` past what :func:`reserve_adapters` set)."""
    _check_name(name)
    bank: AdapterBank = getattr(model, "adapters", None) or AdapterBank()
    served = name in bank.served
    if served != replace:
        raise AdapterNameError(f"adapter {name!r} is {'already' if served else 'not'} served")
    if replace and bank.slot(name) == bank.default:
        raise AdapterNameError(f"adapter {name!r} is the default of every request and cannot be replaced")
    updates = _updates(model, {name: pairs})
    old = bank.slot(name) if replace else None
    if old is not None:  # its slot is free to take again unless a request still runs on it (busy)
        bank.names[old - 1] = None
    try:
        slot = bank.take(name, busy)
    except AdapterSlotsFull:
        if old is not None:
            bank.names[old - 1] = name
        raise
    _install(model, bank, {name: slot}, updates)
    model.adapters = bank
    refresh_decode_layers(model)  # the whole-layer decode calls hold the old side paths' tiles
    return slot


def _check_name(name: object) -> None:
    """A name requests can ask for: None names a free slot (an adapter loaded under it is never served)
    and '' would be served as a model called ''."""
    if not isinstance(name, str) or not name:
        raise AdapterNameError(f"an adapter's name must be a non-empty string, got {name!r}")


def write_slot(model: nn.Module, slot: int, name: str, pairs: dict[str, LoRAPair]) -> None:
    """Write adapter ``name`` into ``slot`` of ``model``'s pairs, the slot another rank's
    :func:`add_adapter` chose (a tensor-parallel follower, which has no requests of its own to keep
    slots for: the leader decides, and has checked the adapter)."""
    bank: AdapterBank = model.adapters
    while len(bank.names) < slot:
        bank.names.append(None)
        bank.keys.append("")
    bank.names[slot - 1], bank.keys[slot - 1] = name, name
    _install(model, bank, {name: slot}, _updates(model, {name: pairs}))
    refresh_decode_layers(model)


def reserved_paths(model: nn.Module, name: str, pairs: dict[str, LoRAPair]) -> dict[str, str | None]:
    """Each module adapter ``name`` adapts -> the projection holding its pairs already, or None where
    serving it would wrap a projection first."""
    paths: dict[str, str | None] = {}
    for module, target in ((m, _resolve(model, m, name)) for m in pairs):
        held = isinstance(model.get_submodule(target.path), LoRAProjection)
        paths[module] = target.path if held else None
    return paths


def added_bytes(model: nn.Module, name: str, pairs: dict[str, LoRAPair]) -> int:
    """At most how much more memory serving adapter ``name`` takes, the moment it is added included:
    a new slot in every projection's pairs (bf16 tiles or float32, each rank padded to 16, raised where
    this adapter's is higher), and the old copies of the largest projection while it is rebuilt.
    Checks the pairs as :func:`add_adapter` does."""
    bank: AdapterBank = getattr(model, "adapters", None) or AdapterBank()
    updates = _updates(model, {name: pairs})
    slots = len(bank.names) + 1  # a free slot may be taken instead: an upper bound
    if bank.capacity is not None:
        slots = min(slots, bank.capacity)  # beyond it the adapter is refused, not grown into
    held_bytes = 2 if _pairs_on_kernels(model) else 4  # bf16 tiles, or float32 pairs
    growth = largest = 0
    for path in {*served_projections(model), *updates}:
        m = model.get_submodule(path)
        held, held_rank = m.held if isinstance(m, LoRAProjection) else (0, 0)
        per_rank = m.in_features + -(-m.out_features // 16) * 16  # N padded to the tiles' 16
        rank = held_rank
        if path in updates:
            rank = max(rank, -(-sum(p.a.shape[0] for _, p in updates[path][name]) // 16) * 16)
        new_slots = max(slots, held)
        if new_slots == held and rank == held_rank:
            continue  # written in place
        old = held * held_rank * per_rank * held_bytes
        new = new_slots * rank * per_rank * held_bytes
        # a rebuild holds the old pairs, a float32 copy of them and of the new pairs at once
        growth = growth + new - old
        largest = max(largest, (held * held_rank + new_slots * rank) * per_rank * 4 + old)
    return growth + largest


def remove_adapter(model: nn.Module, name: str) -> None:
    """Stop serving adapter ``name``: requests that name it are refused from now on; those running on
    it finish on its weights, which stay until a new adapter takes the slot. KeyError if not served."""
    bank: AdapterBank | None = getattr(model, "adapters", None)
    if bank is None or name is None or name not in bank.served:
        served = ", ".join(bank.served) if bank is not None and bank.served else "none"
        raise AdapterNotServed(f"adapter {name!r} is not served (served: {served})")
    slot = bank.slot(name)
    if slot == bank.default:
        raise AdapterNameError(f"adapter {name!r} is the default of every request and cannot be unloaded")
    bank.names[slot - 1] = None


def reserve_adapters(model: nn.Module, slots: int, rank: int) -> AdapterBank:
    """Hold pairs for ``slots`` adapters of rank up to ``rank`` in every projection a served adapter
    may adapt (attention's, a dense FFN's, a MoE layer's shared expert; a MoE layer's routed experts
    get theirs when an adapter for them comes, as they are many), zeros until adapters come (vLLM's
    ``--max-loras`` and ``--max-lora-rank``). Adapters loaded later up to those are then written in
    place, holding up the running requests for one slot's pairs rather than a rebuild of all, and the
    memory is taken (and checked) once, at start; more or larger ones are refused. Adapters served
    already count: ValueError where they are more or of a higher rank."""
    if slots < 1 or rank < 1:
        raise ValueError(f"adapter slots and rank must be at least 1, got {slots} and {rank}")
    bank: AdapterBank = getattr(model, "adapters", None) or AdapterBank()
    served = sum(name is not None for name in bank.names)
    if served > slots:
        raise ValueError(
            f"{served} adapters are served, more than --max-loras {slots} holds: "
            f"give --max-loras {served} or more"
        )
    for name, own in bank.ranks.items():
        if name in bank.served and own > rank:
            raise ValueError(
                f"adapter {name!r} has rank {own}, above --max-lora-rank {rank}: give --max-lora-rank {own} "
                "or more"
            )
    parts = reservable_parts(model)
    for path, count in parts.items():
        module = model.get_submodule(path)
        if isinstance(module, LoRAProjection) and module.held[1] > -(-count * rank // 16) * 16:
            raise ValueError(f"an adapter served holds more rank in {path} than --max-lora-rank {rank} gives")
    _install(model, bank, {}, {path: {} for path in parts})
    for path, count in parts.items():
        model.get_submodule(path).reserve(slots, -(-count * rank // 16) * 16)
    bank.capacity, bank.max_rank = slots, rank
    model.adapters = bank
    refresh_decode_layers(model)  # the whole-layer decode calls, with the side paths' tiles
    return bank


def reservable_parts(model: nn.Module) -> dict[str, int]:
    """Every projection :func:`reserve_adapters` holds pairs in -> how many checkpoint modules it
    computes (a fused q/k/v three, gate/up two): its rank is theirs side by side."""
    names = []
    for i, layer in enumerate(model.model.layers):
        prefix = f"model.layers.{i}"
        names += [f"{prefix}.self_attn.{p}_proj" for p in ("q", "k", "v", "o")]
        mlp = layer.mlp
        if isinstance(mlp, MoEMLP):
            if getattr(mlp, "shared_expert", None) is None:
                continue
            prefix += ".mlp.shared_expert"
        else:
            prefix += ".mlp"
        names += [f"{prefix}.{p}_proj" for p in ("gate", "up", "down")]
    parts: dict[str, int] = {}
    for name in names:
        path = _resolve(model, name, "reserved").path
        parts[path] = parts.get(path, 0) + 1
    return parts


def reserved_bytes(model: nn.Module, slots: int, rank: int) -> int:
    """At most how much memory :func:`reserve_adapters` takes: the pairs (bf16 tiles or float32) and,
    while the largest is built, its float32 copies."""
    held_bytes = 2 if _pairs_on_kernels(model) else 4
    total = largest = 0
    for path, count in reservable_parts(model).items():
        m = model.get_submodule(path)
        per_rank = m.in_features + -(-m.out_features // 16) * 16
        size = slots * -(-count * rank // 16) * 16 * per_rank
        total, largest = total + size * held_bytes, max(largest, size * 4 * 2)
    return total + largest


_Updates = dict[str, dict[str, list[tuple[slice, LoRAPair]]]]  # module path -> adapter -> (rows, pair)


def _updates(model: nn.Module, adapters: dict[str, dict[str, LoRAPair]]) -> _Updates:
    """Where each adapter's pairs go in this model, every one checked before anything changes."""
    updates: _Updates = {}
    bank: AdapterBank | None = getattr(model, "adapters", None)
    max_rank = bank.max_rank if isinstance(bank, AdapterBank) else None
    for adapter, pairs in adapters.items():
        for name, pair in pairs.items():
            target = _resolve(model, name, adapter)
            if max_rank is not None and pair.a.shape[0] > max_rank:
                raise AdapterRankTooHigh(
                    f"adapter {adapter!r} has rank {pair.a.shape[0]} ({name}), above the {max_rank} "
                    "reserved for adapters (--max-lora-rank)"
                )
            _check_shape(model.get_submodule(target.path), target, name, pair, adapter)
            updates.setdefault(target.path, {}).setdefault(adapter, []).append((target.rows, pair))
    return updates


def _install(model: nn.Module, bank: AdapterBank, slots: dict[str, int], updates: _Updates) -> None:
    """Write the adapters ``slots`` names (name -> slot) into every projection, wrapping the ones they
    are the first to adapt; the other projections get zeros in those slots."""
    on_kernels = _pairs_on_kernels(model)
    for path in updates:
        module = model.get_submodule(path)
        if not isinstance(module, LoRAProjection):
            replace_module(model, path, LoRAProjection(module, bank, on_kernels))
    for path, projection in served_projections(model).items():
        by_adapter = updates.get(path, {})
        projection.write(
            len(bank.names),
            {slot: _pair(projection, by_adapter.get(name)) for name, slot in slots.items()},
        )
    for block in model.modules():
        if isinstance(block, MoEMLP):
            experts = [p.adapted for p in block.experts.modules() if isinstance(p, LoRAProjection)]
            block.adapters = bank if experts else None
            block.expert_adapters = tuple(sorted(frozenset().union(*experts)))


def _pairs_on_kernels(model: nn.Module) -> bool:
    """Whether the side paths hold the kernels' tiles: where the model computes in bf16 on the CPU
    kernels (their activations), else torch's float32 pairs."""
    norm = model.model.norm.weight
    return norm.dtype == torch.bfloat16 and norm.device.type == "cpu" and kernels.available()


def _pair(
    projection: LoRAProjection, parts: list[tuple[slice, LoRAPair]] | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One adapter's (at, bt) for ``projection`` from its parts' pairs (several where it is fused):
    their ranks side by side, each B in its part's rows."""
    if not parts:
        return None
    rank = sum(pair.a.shape[0] for _, pair in parts)
    at = torch.zeros(projection.in_features, rank)
    bt = torch.zeros(rank, projection.out_features)
    col = 0
    for rows, pair in parts:
        r = pair.a.shape[0]
        at[:, col : col + r] = pair.a.float().T
        bt[col : col + r, rows] = pair.b.float().T * pair.scaling
        col += r
    return at.to(projection.device), bt.to(projection.device)


def check_servable(name: str, adapter: str) -> None:
    """Raise :class:`AdapterNotServable` unless module ``name`` (the checkpoint's) sees every token."""
    if not name.startswith("model.layers.") or name.endswith(("mlp.gate", "_gate")):
        raise AdapterNotServable(
            f"adapter {adapter!r} adapts {name}; served adapters may adapt the decoder layers' attention "
            "and FFN projections (a MoE layer's experts and shared expert included), not its routers, "
            "the output head or the embedding"
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
