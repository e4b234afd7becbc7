"""The plain-PyTorch kernel: dequantize the weight and multiply. Runs every shape on every device."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwenkit.quant.affine import AffineWeight, affine_dequantize
from qwenkit.quant.kernels.base import LinearKernel, WeightSpec


class DequantKernel(LinearKernel):
    key = "dequant"
    description = "dequantize + matmul per call (fallback)"

    def __init__(self, w: AffineWeight) -> None:
        super().__init__(w)
        self.register_buffer("qdata", w.codes.contiguous())
        self.register_buffer("scale", w.scale.float().contiguous())  # (G, N)
        self.register_buffer("shift", w.shift.float().contiguous())

    @classmethod
    def supports(cls, spec: WeightSpec, device: torch.device) -> bool:
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.dequantize(x.dtype))

    def codes(self) -> torch.Tensor:
        return self.qdata

    def dequantize(self, dtype: torch.dtype) -> torch.Tensor:
        return affine_dequantize(self.qdata, self.scale, self.shift, self.group_size, dtype)

    def rows(self, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return affine_dequantize(
            self.qdata[ids], self.scale[:, ids], self.shift[:, ids], self.group_size, dtype
        )
