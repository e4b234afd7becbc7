"""The interface every quantized-linear kernel implements: one class per way of running the layer.

A kernel is built once from an :class:`~qwenkit.quant.affine.AffineWeight` (it repacks the codes into
its own layout and frees nothing it does not own), then applied to (rows, in) activations. It can give
back exactly what it computes with: whole dequantized weights (prompts past ``max_rows``, LoRA), single
rows (the embedding lookup of a tied model) and the integer codes (checkpoint writers). A new kernel
(AVX-512, CUDA, a GGUF block format) is one new subclass registered in :mod:`qwenkit.quant.kernels`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from qwenkit.quant.affine import AffineWeight


@dataclass(frozen=True)
class WeightSpec:
    """What a kernel needs to know to say whether it can run a layer."""

    bits: int
    group_size: int
    in_features: int
    out_features: int
    iq4: bool = False  # AffineWeight.iq4: 8-bit codes a kernel may hold as IQ4 table indices
    q5: bool = False  # AffineWeight.q5_base set: 8-bit codes a kernel may hold at 5 bits
    q6_k: bool = False  # AffineWeight.superscale set: GGUF Q6_K, int8 scales per 16 times d per 256

    @classmethod
    def of(cls, w: AffineWeight) -> WeightSpec:
        q5, q6_k = w.q5_base is not None, w.superscale is not None
        return cls(w.bits, w.group_size, w.in_features, w.out_features, w.iq4, q5, q6_k)


class LinearKernel(nn.Module):
    """``forward(x)`` = ``x @ W.T`` for (rows, in) ``x``, in ``x``'s dtype, W in this kernel's layout.

    Tensors are registered buffers, so ``.to()``, ``state_dict`` and memory accounting see them.
    """

    key: ClassVar[str]  # stable short name (``--kernel`` style choices, tests)
    description: ClassVar[str]  # what ``qwenkit profile`` prints
    # Above this many rows the kernel is compute bound and dequantize + dense matmul wins (None: never).
    max_rows: ClassVar[int | None] = None
    has_rows: ClassVar[bool] = True  # rows() is cheap (no full dequantization)

    def __init__(self, w: AffineWeight) -> None:
        super().__init__()
        self.bits, self.group_size = w.bits, w.group_size
        self.in_features, self.out_features = w.in_features, w.out_features

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes, exactly those the kernel was built from."""
        raise NotImplementedError

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight as the kernel computes with it (its own scale precision)."""
        raise NotImplementedError

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """(len(ids), in) rows, equal to ``dequantize(dtype)[ids]``."""
        return self.dequantize(dtype)[ids]

    def running(self) -> str:
        """What runs this layer now: the description, unless the kernel has fallen back to another way."""
        return self.description

    def extra_repr(self) -> str:
        return f"{self.running()}, {self.bits}-bit, group {self.group_size}"
