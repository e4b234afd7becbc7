"""The integer grid: per-group scale and zero point, and rounding onto it (shared by RTN and GPTQ).

The rules are AutoGPTQ's ``Quantizer.find_params`` so that RTN and GPTQ checkpoints look alike: the range
always includes 0; asymmetric grids put ``zero = round(-min / scale)``; symmetric grids use
``max(|min|, max)`` on both sides and the mid code ``zero = 2**(bits-1)`` (8 for 4-bit, 128 for 8-bit).
"""

from __future__ import annotations

import torch

from qwenkit.quant.gptq_format import SUPPORTED_BITS, QuantizationError


def check_bits_group(bits: int, group_size: int, in_features: int | None = None) -> int:
    """Validate (bits, group_size) and return the effective group size (-1 -> the whole row).

    A size that does not divide ``in_features`` is allowed: the last group is shorter (AutoGPTQ's rule).
    """
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits={bits} is not supported; choose 4 or 8")
    if group_size != -1 and group_size <= 0:
        raise QuantizationError(f"group_size={group_size} must be -1 (per channel) or positive")
    if in_features is None:
        return group_size
    if group_size == -1:
        return in_features
    return min(group_size, in_features)  # a group larger than the row is the whole row


def find_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero for each row of ``w`` (rows, cols): the grid covers ``[min(w, 0), max(w, 0)]``.

    Returns float32 ``scale`` (rows,) and integer-valued float32 ``zero`` (rows,).
    """
    maxq = 2**bits - 1
    w = w.float()
    xmin = w.min(dim=1).values.clamp(max=0)
    xmax = w.max(dim=1).values.clamp(min=0)
    if sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = torch.where(xmin < 0, -xmax, xmin)
    # An all-zero row would give scale 0; AutoGPTQ widens it to [-1, 1].
    empty = (xmin == 0) & (xmax == 0)
    xmin = torch.where(empty, -1.0, xmin)
    xmax = torch.where(empty, 1.0, xmax)
    scale = (xmax - xmin) / maxq
    zero = torch.full_like(scale, (maxq + 1) // 2) if sym else torch.round(-xmin / scale)
    return scale, zero


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Round ``w`` onto the grid: ``clamp(round(w / scale) + zero, 0, maxq)``; scale/zero broadcast to w."""
    return torch.clamp(torch.round(w.float() / scale) + zero, 0, 2**bits - 1)


def round_scale(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored as float16: round each one *up* to a float16 value before choosing codes.

    Rounding up keeps the group's whole range on the grid, so ``|w - deq(w)| <= scale / 2`` still holds
    with the stored scale (rounding down could push the extreme weight half a step past the last code).
    """
    tiny = torch.finfo(torch.float16).tiny
    s16 = scale.clamp(min=tiny).to(torch.float16)
    up = torch.nextafter(s16, torch.full_like(s16, torch.inf))
    return torch.where(s16.float() < scale, up, s16).float()
