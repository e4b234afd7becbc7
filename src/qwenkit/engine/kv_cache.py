"""KV cache storage owned by the engine: one slot per running sequence, each at its own length.

Layout per layer: K and V of shape (num_slots, Hkv, capacity, D). A step writes its new k/v for each
row's slot at that row's offset and attends over the first S positions, with a mask that hides what a
row has not reached. Capacity grows on demand (doubling, up to ``max_len``), so short chats do not pay
for the longest context. The model only sees the small ``KVCache`` protocol through ``CacheView``.
"""

from __future__ import annotations

import torch


class SlotKVCache:
    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        num_kv_heads: int,
        head_dim: int,
        max_len: int,
        dtype: torch.dtype,
        device: str | torch.device,
        initial_len: int = 256,
    ) -> None:
        self.num_layers, self.num_slots, self.max_len = num_layers, num_slots, max_len
        self.shape_tail = (num_kv_heads, head_dim)
        self.dtype, self.device = dtype, torch.device(device)
        self.capacity = 0
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self._free = list(range(num_slots))
        self.ensure_capacity(min(initial_len, max_len))

    # ---- slots -------------------------------------------------------------------------------------

    def allocate(self) -> int | None:
        """The lowest free slot (keeps running slots contiguous, so attention can use views)."""
        if not self._free:
            return None
        self._free.sort()
        return self._free.pop(0)

    def free(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def free_slots(self) -> int:
        return len(self._free)

    # ---- storage -----------------------------------------------------------------------------------

    def ensure_capacity(self, length: int) -> None:
        """Grow every layer's storage to hold ``length`` positions per slot."""
        if length <= self.capacity:
            return
        if length > self.max_len:
            raise ValueError(f"KV cache length {length} exceeds the maximum {self.max_len}")
        new_cap = min(self.max_len, max(length, 2 * self.capacity, 16))
        shape = (self.num_slots, self.shape_tail[0], new_cap, self.shape_tail[1])
        for store in (self.k, self.v):
            for i in range(self.num_layers):
                grown = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if i < len(store):
                    grown[:, :, : self.capacity] = store[i]
                    store[i] = grown
                else:
                    store.append(grown)
        self.capacity = new_cap

    def view(self, slots: list[int], starts: list[int], num_new: int) -> CacheView:
        """The cache as the model sees it for one step: rows in ``slots`` at offsets ``starts``."""
        self.ensure_capacity(max(starts) + num_new)
        return CacheView(self, slots, starts, num_new)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class CacheView:
    """Implements ``qwenkit.model.KVCache`` for one step of a batch."""

    def __init__(self, cache: SlotKVCache, slots: list[int], starts: list[int], num_new: int) -> None:
        self.cache = cache
        dev = cache.device
        B, T = len(slots), num_new
        self.span = max(starts) + T  # S: keys visible to this step
        self._slots = torch.tensor(slots, device=dev)
        contiguous = slots == list(range(slots[0], slots[0] + B))
        self._slice = slice(slots[0], slots[0] + B) if contiguous else None
        starts_t = torch.tensor(starts, device=dev)
        self._write_pos = starts_t[:, None] + torch.arange(T, device=dev)  # (B, T)
        self._write_slot = self._slots[:, None].expand(B, T)
        key_pos = torch.arange(self.span, device=dev)
        mask = key_pos[None, None, :] <= self._write_pos[:, :, None]  # (B, T, S): causal at each offset
        self._mask = None if (T > 1 and B == 1 and starts[0] == 0) else mask[:, None]  # (B, 1, T, S)

    @property
    def mask(self) -> torch.Tensor | None:
        return self._mask

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        kc, vc = self.cache.k[layer], self.cache.v[layer]
        # (B, Hkv, T, D) -> written at [slot, :, pos]; advanced indexing puts (B, T) first.
        kc[self._write_slot, :, self._write_pos] = k.transpose(1, 2).to(kc.dtype)
        vc[self._write_slot, :, self._write_pos] = v.transpose(1, 2).to(vc.dtype)
        if self._slice is not None:
            return kc[self._slice, :, : self.span], vc[self._slice, :, : self.span]
        return kc[self._slots, :, : self.span], vc[self._slots, :, : self.span]
