"""The token embedding of a tied model, served from its quantized ``lm_head``: one copy of the matrix.

With tied embeddings (Qwen2.5-0.5B: 136M of its 494M parameters) the same (vocab, hidden) matrix is the
input embedding and the output projection. Once ``lm_head`` is a :class:`QuantizedLinear`, a float
embedding beside it would keep the largest tensor twice. :class:`QuantizedEmbedding` instead reads the
rows for the ids straight out of the lm_head's packed codes and dequantizes just those rows, with the
same arithmetic as :meth:`QuantizedLinear.dequantize_packed`, so a lookup equals the dequantized row
exactly.

Row access per kernel layout: ``cpu_int8pack`` and ``dequant`` store (out, in) codes, so rows index
directly; ``cpu_int4pack`` keeps rows in blocks of 64 (see ``linear._unpack_cpu_int4``), so a row is one
nibble of a (in, 32) byte slab of its block. CUDA's int4 tile layout is opaque, so there the embedding
keeps its own nibble-packed copy of the codes (half a byte per weight) instead.
"""

from __future__ import annotations

import torch
from torch import nn

from qwenkit.quant.linear import QuantizedLinear, _affine


def _int4_rows(packed: torch.Tensor, ids: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(len(ids), k) uint8 codes of rows ``ids`` from aten's CPU int4 layout, without unpacking the rest.

    Byte (block, k, j) of the (n/64, k, 32) view holds row ``64*block + j`` in its low nibble and row
    ``64*block + 32 + j`` in its high one.
    """
    v = packed.view(n // 64, k, 32)
    block, j = ids // 64, ids % 64
    slabs = v[block, :, j % 32]  # (len(ids), k)
    shift = ((j >= 32).to(torch.uint8) * 4)[:, None]
    return (slabs >> shift) & 0xF


class QuantizedEmbedding(nn.Module):
    """``embed(ids)`` -> (..., hidden): rows of a quantized (vocab, hidden) QuantizedLinear, in ``dtype``."""

    def __init__(self, source: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        if source._kernel is None:
            source.pack()
        self.source = source  # shared with lm_head: named_modules()/parameters() count it once
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        self.register_buffer("codes_copy", None)
        if source._kernel == "cuda_int4pack":
            q = source.codes()  # (n, k) uint8, read back once through the kernel
            self.register_buffer("codes_copy", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        rows = self.rows(flat, self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(len(ids), hidden) dequantized rows, equal to ``source.dequantize_packed(dtype)[ids]``."""
        src, k, n = self.source, self.embedding_dim, self.num_embeddings
        kernel = src._kernel
        if src.perm is not None:
            raise NotImplementedError("an act-order lm_head cannot serve as an embedding")
        if kernel == "cpu_int8pack":
            shift = torch.zeros_like(src.kscales, dtype=torch.float32) if src.zfix is None else -src.zfix
            return _affine(src.qdata[ids], src.kscales.float()[ids][None], shift[ids][None], k, dtype)
        if kernel in ("cpu_int4pack", "cpu_int8_as_int4x2"):
            g = src._kernel_group
            parts = [(_int4_rows(src.qdata, ids, n, k), src.kscales)]
            if kernel == "cpu_int8_as_int4x2":
                parts.append((_int4_rows(src.qdata_lo, ids, n, k), src.kscales_lo))
            out = None
            for q, sz in parts:  # the kernel's own (q - 8) * scale + shift, as dequantize_packed does it
                scale, shift = sz[:, ids, 0].float(), sz[:, ids, 1].float()
                part = _affine(q, scale, shift - 8 * scale, g, dtype)
                out = part if out is None else out + part
            return out
        if kernel == "cuda_int4pack":
            packed = self.codes_copy[ids]
            q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(len(ids), k)
            return _affine(
                q,
                src.wscales[:, ids],
                -src.wzeros[:, ids].float() * src.wscales[:, ids],
                src.group_size,
                dtype,
            )
        # dequant kernel: plain (n, k) codes with contiguous groups
        s = src.wscales[:, ids]
        return _affine(src.qdata[ids], s, -src.wzeros[:, ids].float() * s, src.group_size, dtype)

    def extra_repr(self) -> str:
        n, k = self.num_embeddings, self.embedding_dim
        return f"{n}, {k}, rows of the quantized lm_head ({self.source.kernel})"
