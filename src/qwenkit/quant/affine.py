"""Affine-quantized weights, the one form every kernel is built from.

``w[n, k] = codes[n, k] * scale[g, n] + shift[g, n]`` with ``g = k // group_size`` (contiguous groups,
the last one possibly shorter). GPTQ/RTN integers are the case ``shift = -zero * scale``; GGUF blocks
with a float minimum (Q4_1, Q4_K) are the case GPTQ cannot express, which is why kernels take a float
shift rather than integer zero points.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qwenkit.quant.gptq_format import IntWeight, QuantizationError


@dataclass
class AffineWeight:
    codes: torch.Tensor  # (out, in) uint8: 0..15 for bits=4, 0..255 for bits=8
    scale: torch.Tensor  # (G, out) float32
    shift: torch.Tensor  # (G, out) float32
    group_size: int
    bits: int
    # 8-bit codes that are IQ4_NL/IQ4_XS values + 128 (16 distinct values): a kernel may hold them as
    # 4-bit indices into that table (``kernels.IQ4_VALUES``) and compute the same weights
    iq4: bool = False
    # 8-bit codes that all lie in q5_base .. q5_base + 31 (GGUF Q5_0 as q + 112, Q5_1 and Q5_K as q): a
    # kernel may hold them at 5 bits (code - q5_base) and compute the same weights
    q5_base: int | None = None
    # GGUF Q6_K's d (K/256, out) where ``scale`` (groups of 16) is d x an int8 sub-block scale and the
    # codes 0..63 sit on zero point 32: a kernel may hold the int8 scales and d, as the file does
    superscale: torch.Tensor | None = None

    def __post_init__(self) -> None:
        n, k = self.codes.shape
        groups = -(-k // self.group_size)
        if self.codes.dtype != torch.uint8:
            raise QuantizationError(f"affine codes must be uint8, not {self.codes.dtype}")
        if self.bits not in (4, 8):
            raise QuantizationError(f"{self.bits}-bit codes are not supported; use 4 or 8")
        for name in ("scale", "shift"):
            t = getattr(self, name)
            if tuple(t.shape) != (groups, n):
                raise QuantizationError(f"affine {name} has shape {tuple(t.shape)}, expected {(groups, n)}")

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def in_features(self) -> int:
        return self.codes.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) float weight."""
        return affine_dequantize(self.codes, self.scale, self.shift, self.group_size, dtype)

    def output_rows(self, lo: int, hi: int) -> AffineWeight:
        """Outputs lo .. hi - 1 (a tensor-parallel rank's share of a layer split by its outputs)."""
        sup = self.superscale
        return replace(
            self,
            codes=self.codes[lo:hi].contiguous(),
            scale=self.scale[:, lo:hi].contiguous(),
            shift=self.shift[:, lo:hi].contiguous(),
            superscale=None if sup is None else sup[:, lo:hi].contiguous(),
        )

    def input_columns(self, lo: int, hi: int) -> AffineWeight | None:
        """Inputs lo .. hi - 1 with their groups' scales (a rank's share of a layer split by its inputs),
        or None where the run does not begin and end on group edges (nor on Q6_K's 256-input blocks)."""
        k, g, sup = self.in_features, self.group_size, self.superscale
        ends_whole = hi % g == 0 or hi == k
        if lo % g or not ends_whole or (sup is not None and (lo % 256 or hi % 256)):
            return None
        return replace(
            self,
            codes=self.codes[:, lo:hi].contiguous(),
            scale=self.scale[lo // g : -(-hi // g)].contiguous(),
            shift=self.shift[lo // g : -(-hi // g)].contiguous(),
            superscale=None if sup is None else sup[lo // 256 : hi // 256].contiguous(),
        )

    def to(self, device: torch.device | str) -> AffineWeight:
        return replace(
            self,
            codes=self.codes.to(device),
            scale=self.scale.to(device, torch.float32),
            shift=self.shift.to(device, torch.float32),
            superscale=None if self.superscale is None else self.superscale.to(device, torch.float32),
        )


def from_int_weight(w: IntWeight) -> tuple[AffineWeight, torch.Tensor | None]:
    """GPTQ/RTN integers -> (affine weight in group-contiguous column order, column permutation or None).

    act-order checkpoints (``g_idx`` not monotone) are sorted by group once here, so kernels only ever see
    contiguous groups; the layer then gathers ``x[..., perm]`` before the kernel.
    """
    gs, perm = contiguous_groups(w.g_idx, w.in_features)
    q = w.qweight if perm is None else w.qweight[:, perm.to(w.qweight.device)]
    scale = w.scales.to(torch.float32)
    shift = -w.zeros.to(torch.float32) * scale
    return AffineWeight(q.to(torch.uint8).contiguous(), scale, shift, gs, w.bits), perm


def contiguous_groups(g_idx: torch.Tensor, in_features: int) -> tuple[int, torch.Tensor | None]:
    """(group size, column permutation or None) that makes every group one contiguous run.

    Without act-order ``g_idx = i // group_size`` already; with act-order the columns are sorted by group
    (stable), which works when every group but the last has the same size, as AutoGPTQ writes them.
    """
    g_idx = g_idx.to(torch.int64).cpu()
    counts = torch.bincount(g_idx)
    gs = int(counts[0]) if counts.numel() else in_features
    expected = torch.arange(in_features) // gs
    if not bool((counts[:-1] == gs).all()) or int(counts[-1]) > gs:
        raise QuantizationError(f"g_idx groups have unequal sizes {counts.tolist()[:8]}...; cannot run them")
    if torch.equal(g_idx, expected):
        return gs, None
    return gs, torch.argsort(g_idx, stable=True)


def affine_dequantize(
    q: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """(rows, in) ``q * scale + shift`` with per-group (G, rows) scale and shift, in ``dtype``.

    One fused op over a reshaped view: dequantizing is memory bound, so every extra full-size temporary
    costs about as much as a prompt's matmul.
    """
    n, k = q.shape
    s, b = scale.to(dtype).T, shift.to(dtype).T  # (rows, G)
    if k % group_size:  # a short last group: gather per column
        gi = torch.arange(k, device=q.device) // group_size
        return torch.addcmul(b[:, gi], q.to(dtype), s[:, gi])
    w = q.view(n, k // group_size, group_size).to(dtype)
    return torch.addcmul(b[..., None], w, s[..., None]).reshape(n, k)
