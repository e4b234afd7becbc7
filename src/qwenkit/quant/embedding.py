"""The token embedding served from a quantized (vocab, hidden) matrix: one copy of the largest tensor.

With tied embeddings (Qwen2.5-0.5B: 136M of its 494M parameters) the same matrix is the input embedding
and the output projection. Once ``lm_head`` is a :class:`QuantizedLinear`, a float embedding beside it
would keep the largest tensor twice. :class:`QuantizedEmbedding` instead reads the rows for the ids
straight out of the layer's kernel (``LinearKernel.rows``), with the same arithmetic the kernel uses, so a
lookup equals the dequantized row exactly. A kernel whose layout is opaque (CUDA int4 tiles) cannot give
rows cheaply; the embedding then keeps its own nibble-packed copy of the codes (half a byte per weight).
"""

from __future__ import annotations

import torch
from torch import nn

from qwenkit.quant.affine import affine_dequantize
from qwenkit.quant.linear import QuantizedLinear


class QuantizedEmbedding(nn.Module):
    """``embed(ids)`` -> (..., hidden): rows of a quantized (vocab, hidden) QuantizedLinear, in ``dtype``."""

    def __init__(self, source: QuantizedLinear, dtype: torch.dtype) -> None:
        super().__init__()
        if source.impl is None:
            source.pack()
        if source.perm is not None:
            raise NotImplementedError("an act-order lm_head cannot serve as an embedding")
        self.source = source  # shared with lm_head: named_modules()/parameters() count it once
        self.dtype = dtype
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features
        self.register_buffer("codes_copy", None)
        if not source.impl.has_rows:
            q = source.codes()  # (n, k) uint8, read back once through the kernel
            self.register_buffer("codes_copy", (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.rows(ids.reshape(-1), self.dtype)
        return rows.reshape(*ids.shape, self.embedding_dim)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(len(ids), hidden) dequantized rows, equal to ``source.dequantize_packed(dtype)[ids]``."""
        impl = self.source.impl
        if self.codes_copy is None:
            return impl.rows(ids, dtype)
        packed = self.codes_copy[ids]
        q = torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(len(ids), self.embedding_dim)
        return affine_dequantize(q, impl.scale[:, ids], impl.shift[:, ids], impl.group_size, dtype)

    def extra_repr(self) -> str:
        n, k = self.num_embeddings, self.embedding_dim
        return f"{n}, {k}, rows of the quantized lm_head ({self.source.kernel})"
