"""Which LoRA adapter each token of a forward runs through: the adapters a model serves, by slot.

Slot 0 is the base model; adapters take slots 1..n in the order they were given, and one loaded while
serving takes a freed slot or a new one (``AdapterBank.take``). The bank only keeps the books: the side
paths that apply an adapter's weights are ``served_adapters``' (``LoRAProjection``), and every module that
has them reads the running forward's selection here (``slots``, ``used``, ``groups``).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass

import torch

from qwenkit.errors import QwenkitError

BASE_SLOT = 0


class AdapterSlotsFull(QwenkitError, ValueError):
    """Every slot reserved for adapters (``reserve_adapters``, vLLM's ``--max-loras``) is taken."""


@dataclass(frozen=True)
class LoRAPair:
    """One module's update in one adapter: ``delta = scaling * B @ A`` (peft's lora_A, lora_B)."""

    a: torch.Tensor  # (r, in)
    b: torch.Tensor  # (out, r)
    scaling: float


class AdapterBank:
    """The adapters a model serves, by slot, and which of them each token of the running forward uses.

    Adapters come and go while serving: one unloaded frees its slot (its weights stay until a new
    adapter takes it, so requests already running on it finish on them), and a new one takes a free
    slot that no request uses, or a new slot."""

    def __init__(self) -> None:
        self.names: list[str | None] = []  # slot - 1 -> its adapter's name; None: a free slot
        # slot - 1 -> what caches know this load of the slot by: a name loaded again (other weights) is
        # another key, so no cached K/V of the old weights is ever reused for the new ones
        self.keys: list[str] = []
        self.default = BASE_SLOT
        # reserve_adapters: at most this many slots, of at most this rank (None: grown as adapters come)
        self.capacity: int | None = None
        self.max_rank: int | None = None
        self.ranks: dict[str, int] = {}  # the rank of each adapter served from the start (serve_adapters)
        self._loads = 0
        # The running forward's selection, per thread: a forward outside the engine's thread (router
        # statistics, a test) never sees the engine's.
        self._running = threading.local()

    @property
    def served(self) -> list[str]:
        """The names of the adapters served, in slot order."""
        return [name for name in self.names if name is not None]

    def take(self, name: str, busy: Collection[int] = ()) -> int:
        """A slot for adapter ``name``: the first free one no request in ``busy`` still runs on, else
        a new one."""
        free = [s for s, n in enumerate(self.names, 1) if n is None and s not in busy]
        if free:
            slot = free[0]
        elif self.capacity is not None and len(self.names) >= self.capacity:
            raise AdapterSlotsFull(
                f"no free slot for adapter {name!r}: the {self.capacity} reserved (--max-loras "
                f"{self.capacity}) each hold an adapter served, or the old weights of one replaced that "
                "running requests still use; unload an adapter first"
            )
        else:
            self.names.append(None)
            self.keys.append("")
            slot = len(self.names)
        self._loads += 1
        self.names[slot - 1], self.keys[slot - 1] = name, f"{name}#{self._loads}"
        return slot

    def key(self, slot: int) -> str:
        return self.keys[slot - 1]

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
        if name in self.names:
            return self.names.index(name) + 1
        raise KeyError(name)

    @contextlib.contextmanager
    def narrowed(self, slots: torch.Tensor, used: frozenset[int]) -> Iterator[None]:
        """Within: the running forward's tokens are these (a routed expert's), of these ``slots``
        (``used``: their set, known on the host)."""
        running = self._running
        saved = running.slots, running.used, running.groups
        running.slots, running.used, running.groups = slots, used - {BASE_SLOT}, None
        try:
            yield
        finally:
            running.slots, running.used, running.groups = saved

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
