"""Quantized-linear kernels, one class each, and the choice of the fastest one that runs a layer.

``KERNELS`` is tried in order; the first whose ``supports(spec, device)`` holds builds the layer.
``DequantKernel`` (plain PyTorch) runs everything, so the choice never fails. qwenkit's AVX-512 kernels
come first where they are built (``qwenkit.kernels.available()``); PyTorch's own packed kernels follow.
"""

from __future__ import annotations

import torch

from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.gptq_format import QuantizationError
from qwenkit.quant.kernels.aten import (
    CpuInt4PackKernel,
    CpuInt8AsInt4x2Kernel,
    CpuInt8PackKernel,
    CudaInt4PackKernel,
)
from qwenkit.quant.kernels.avx512 import (
    Avx512Int4Kernel,
    Avx512Int5Kernel,
    Avx512Int8Kernel,
    Avx512Iq4Kernel,
    Avx512Q6KKernel,
)
from qwenkit.quant.kernels.base import LinearKernel, WeightSpec
from qwenkit.quant.kernels.dequant import DequantKernel
from qwenkit.quant.kernels.triton_affine import CudaTritonInt8Kernel

KERNELS: list[type[LinearKernel]] = [
    Avx512Iq4Kernel,
    Avx512Int5Kernel,
    Avx512Q6KKernel,
    Avx512Int8Kernel,
    Avx512Int4Kernel,
    CpuInt8PackKernel,
    CpuInt4PackKernel,
    CpuInt8AsInt4x2Kernel,
    CudaInt4PackKernel,
    CudaTritonInt8Kernel,
    DequantKernel,
]


def kernel_class(key: str) -> type[LinearKernel]:
    for cls in KERNELS:
        if cls.key == key:
            return cls
    raise QuantizationError(f"unknown kernel {key!r}; choose one of {', '.join(c.key for c in KERNELS)}")


def choose_kernel(
    bits: int,
    group_size: int,
    in_features: int,
    out_features: int,
    device: torch.device,
    *,
    iq4: bool = False,
    q5: bool = False,
    q6_k: bool = False,
) -> str:
    """Key of the first kernel in ``KERNELS`` that can run this layer on ``device`` (``iq4``: the codes
    are IQ4 table values, ``AffineWeight.iq4``; ``q5``: they fit 5 bits, ``AffineWeight.q5_base``;
    ``q6_k``: GGUF Q6_K, ``AffineWeight.superscale``)."""
    spec = WeightSpec(bits, group_size, in_features, out_features, iq4, q5, q6_k)
    return _first_kernel(spec, device)


def _first_kernel(spec: WeightSpec, device: torch.device) -> str:
    return next(cls.key for cls in KERNELS if cls.supports(spec, device))


def build_kernel(w: AffineWeight, device: torch.device, key: str | None = None) -> LinearKernel:
    """The kernel ``key`` (default: the fastest that fits) built from ``w`` on ``device``."""
    spec = WeightSpec.of(w)
    if not key:  # the fastest that fits
        key = _first_kernel(spec, device)
    cls = kernel_class(key)
    if not cls.supports(spec, device):
        needs = getattr(cls, "bits_needed", None)
        if needs is not None and needs != w.bits:
            raise QuantizationError(f"kernel {cls.key!r} runs {needs}-bit weights, not {w.bits}-bit")
        raise QuantizationError(
            f"kernel {cls.key!r} cannot run a {w.bits}-bit {w.out_features}x{w.in_features} layer "
            f"with group {w.group_size} on {device}"
        )
    return cls(w.to(device))


__all__ = [
    "KERNELS",
    "CudaTritonInt8Kernel",
    "DequantKernel",
    "LinearKernel",
    "WeightSpec",
    "build_kernel",
    "choose_kernel",
    "kernel_class",
]
