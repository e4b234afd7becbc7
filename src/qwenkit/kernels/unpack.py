"""Packed weights read back and stacked: the (N, K) codes, the float weights or some rows of them (an
embedding lookup in a tied, quantized head), and several parts' tiles as one (q/k/v or gate/up fused at
load). PyTorch over ``ops``' layouts, but ``dequantize_rows``, one kernel call."""

from __future__ import annotations

import torch

from qwenkit.kernels.ops import (
    TILE,
    KernelInputError,
    PackedBf16,
    PackedInt,
    iq4_codes,
    is_iq4_table,
    op,
    q6_k_sub_scales,
)


def unpack_codes(p: PackedInt) -> torch.Tensor:
    """The (N, K) uint8 codes back from a PackedInt (IQ4 table codes: the indices)."""
    tiles, k = p.codes.shape[0], p.in_features
    if p.bits == 8:
        c = p.codes.view(tiles, k // 4, TILE, 4).transpose(1, 2)
    elif p.bits == 6:  # per 32 inputs, per sub-block: 3 x 64 bytes (quads 0-2, quad 3 two bits in each)
        runs = p.codes.view(tiles, k // 32, 416)[:, :, :384].reshape(tiles, k // 32, 2, 3, TILE, 4)
        shifts = (2 * torch.arange(3, dtype=torch.uint8)).view(1, 1, 1, 3, 1, 1)
        fourth = ((runs >> 6) << shifts).sum(dim=3, keepdim=True, dtype=torch.uint8)
        c = torch.cat((runs & 0x3F, fourth), dim=3).reshape(tiles, k // 32, 8, TILE, 4).permute(0, 3, 1, 2, 4)
    elif p.bits == 5:  # per 32 inputs: (4 x 64 nibble bytes, 64 bytes of fifth bits)
        blocks = p.codes.view(tiles, k // 32, 5, TILE, 4)
        nibbles = blocks[:, :, :4].unsqueeze(4)  # (tiles, blocks, 4 byte quads, TILE, 1, 4)
        low = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=4).transpose(3, 4)
        low = low.reshape(tiles, k // 32, 8, TILE, 4)
        bit = torch.arange(8, dtype=torch.uint8).view(1, 1, 8, 1, 1)
        high = (blocks[:, :, 4:5] >> bit) & 1  # (tiles, blocks, 8 quads, TILE, 4)
        c = (low | (high << 4)).permute(0, 3, 1, 2, 4)
    else:
        c = p.codes.view(tiles, k // 8, TILE, 1, 4)
        c = torch.cat((c & 0x0F, c >> 4), dim=3).transpose(1, 2)
    return c.reshape(tiles * TILE, k)[: p.out_features]


def _untiled(t: torch.Tensor, n: int) -> torch.Tensor:
    """(N/16, G, 16) -> (N, G)."""
    return t.transpose(1, 2).reshape(-1, t.shape[1])[:n]


def dequantize(
    p: PackedInt, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The float weights (N, K), or only `rows` of them (an embedding lookup), from a PackedInt."""
    codes = unpack_codes(p)
    if is_iq4_table(p):  # the indices' int8 codes (value + 128), on the same zero point
        codes = iq4_codes(codes)
    if p.bits == 6:  # Q6_K: (q - 32) x its sub-block's int8 scale, exact, then x d (one rounding)
        sub = q6_k_sub_scales(p)
        codes = (codes.to(torch.int32) - p.zero_point) * sub.to(torch.int32).repeat_interleave(16, dim=1)
        p = PackedInt(p.bits, p.codes, p.scale, p.shift, p.group_size, p.in_features, p.out_features, 0)
    scale = _untiled(p.scale, p.out_features)
    shift = None if p.shift is None else _untiled(p.shift, p.out_features)
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        shift = None if shift is None else shift[rows]
    work = torch.float64 if dtype == torch.float64 else torch.float32
    w = (codes.to(work) - p.zero_point) * scale.to(work).repeat_interleave(p.group_size, dim=1)
    if shift is not None:
        w += shift.to(work).repeat_interleave(p.group_size, dim=1)
    return w.to(dtype)


def dequantize_rows(p: PackedInt, rows: torch.Tensor) -> torch.Tensor:
    """``dequantize(p, torch.float32, rows)`` bit for bit, in one kernel call reading only those rows'
    bytes: an embedding lookup in packed weights (a tied, quantized head)."""
    return op("dequantize_rows")(
        p.codes, p.scale, p.shift, rows, p.bits, p.group_size, p.in_features, p.out_features, p.zero_point
    )


def concat_bf16(parts: list[PackedBf16]) -> PackedBf16:
    """One PackedBf16 whose outputs are those of ``parts`` in order (q/k/v or gate/up fused at load).

    Tiles are independent streams, so stacking them is exact: the fused product gives every output
    bit for bit as its part alone. Every part but the last must fill whole tiles (N % 16 == 0)."""
    _check_concat([(p.in_features, p.out_features) for p in parts], "concat_bf16")
    weight = torch.cat([p.weight for p in parts])
    return PackedBf16(weight, parts[0].in_features, sum(p.out_features for p in parts))


def concat_int(parts: list[PackedInt]) -> PackedInt:
    """As concat_bf16 for integer weights; the parts must agree on bits, group size, zero point, scale
    dtype and whether they have a shift."""
    _check_concat([(p.in_features, p.out_features) for p in parts], "concat_int")
    first = parts[0]
    for p in parts[1:]:
        if (p.bits, p.group_size, p.zero_point, p.scale.dtype, p.shift is None) != (
            first.bits,
            first.group_size,
            first.zero_point,
            first.scale.dtype,
            first.shift is None,
        ):
            raise KernelInputError("concat_int: parts differ in bits, group size, zero point or scales")
    return PackedInt(
        first.bits,
        torch.cat([p.codes for p in parts]),
        torch.cat([p.scale for p in parts]),
        None if first.shift is None else torch.cat([p.shift for p in parts]),
        first.group_size,
        first.in_features,
        sum(p.out_features for p in parts),
        first.zero_point,
    )


def _check_concat(shapes: list[tuple[int, int]], what: str) -> None:
    if not shapes:
        raise KernelInputError(f"{what}: nothing to concatenate")
    if len({k for k, _ in shapes}) != 1:
        raise KernelInputError(f"{what}: parts have different input sizes {[k for k, _ in shapes]}")
    if any(n % TILE for _, n in shapes[:-1]):
        raise KernelInputError(f"{what}: every part but the last needs a multiple of {TILE} outputs")
