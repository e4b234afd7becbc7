"""Python face of the C++ CPU kernels: availability, weight packing, the linears and dequantization."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch

from qwenkit.errors import QwenkitError

ENV_SWITCH = "QWENKIT_KERNELS"  # "torch" forces the plain PyTorch path
_loaded: bool | None = None  # None: not tried yet in this process


class KernelInputError(QwenkitError, ValueError):
    """Weights handed to prepare_int8/prepare_int4 do not have the shapes or ranges the kernels need."""


def _note(text: str) -> None:
    print(f"qwenkit: {text}; using the plain PyTorch path", file=sys.stderr)


def available() -> bool:
    """True when the C++ kernels are loaded (building them on first use if needed).

    False, after one line on stderr, when the CPU lacks AVX-512 BF16/VNNI, there is no compiler or the
    build fails; False silently when QWENKIT_KERNELS=torch asks for the plain path.
    """
    global _loaded
    if os.environ.get(ENV_SWITCH, "").strip().lower() == "torch":
        return False
    if _loaded is None:
        from qwenkit.kernels import build  # not at import: `python -m qwenkit.kernels.build` runs it as main

        reason = build.missing_isa()
        if reason is None:
            try:
                build.load()
            except build.KernelBuildError as e:
                reason = f"CPU kernels unavailable: {e}"
        else:
            reason = f"CPU kernels unavailable: {reason}"
        if reason:
            _note(reason)
        _loaded = reason is None
    return _loaded


class KernelsUnavailableError(QwenkitError, RuntimeError):
    """A kernel op was called where available() is False (the caller should take the plain path)."""


def _require() -> None:
    if not (_loaded or available()):
        raise KernelsUnavailableError("the qwenkit CPU kernels are not available here; use the plain path")


def linear_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16 @ w (N, K) bf16 (+ bias) -> (..., N) bf16, fp32 accumulation. Best for M <= 16."""
    _require()
    y = torch.ops.qwenkit.linear_bf16(x.reshape(-1, x.shape[-1]), w, bias)
    return y.reshape(*x.shape[:-1], w.shape[0])


@dataclass(frozen=True)
class PackedInt:
    """Integer weights in the kernels' layout: w[n, k] = (code - zero_point) * scale[g, n] + shift[g, n].

    codes: (N, Kp) uint8 for 8 bits, (N, Kp / 2) for 4 bits (Kp = K rounded up to 64; per 64 inputs,
    byte j holds input j in its low nibble and input j + 32 in its high one). scale: (N, K / group_size)
    when group_size % 64 == 0, else (N, Kp / 32) with each group's scale repeated per block of 32.
    shift: (N, K / group_size) or None. scale and shift are float32, or float16 for small groups.
    """

    bits: int
    codes: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor | None
    group_size: int
    in_features: int
    zero_point: int = 0

    @property
    def out_features(self) -> int:
        return self.codes.shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes a matrix-vector product reads."""
        return sum(t.nbytes for t in (self.codes, self.scale, self.shift) if t is not None)


def _pick_scale_dtype(scale: torch.Tensor, shift: torch.Tensor | None) -> torch.dtype:
    """float16 when it holds every value exactly (GGUF and GPTQ scales are float16), else float32:
    packing never changes the weights unless the caller asks for float16."""
    for t in (scale, shift):
        if t is not None and not torch.equal(t.to(torch.float16).to(t.dtype), t):
            return torch.float32
    return torch.float16


def _prepare(
    bits: int,
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int,
    scale_dtype: torch.dtype | None,
) -> PackedInt:
    what = f"prepare_int{bits}"
    if not 0 <= zero_point < 2**bits:
        raise KernelInputError(f"{what}: zero_point must lie in 0..{2**bits - 1}, got {zero_point}")
    if codes.dim() != 2:
        raise KernelInputError(f"{what}: codes must be (N, K), got shape {tuple(codes.shape)}")
    n, k = codes.shape
    if group_size <= 0 or group_size % 32 or k % group_size:
        raise KernelInputError(
            f"{what}: group_size must be a multiple of 32 dividing K={k}, got {group_size}"
        )
    groups = k // group_size
    for name, t in (("scale", scale), ("shift", shift)):
        if t is not None and tuple(t.shape) != (groups, n):
            raise KernelInputError(
                f"{what}: {name} must be (K/group_size, N) = {(groups, n)}, got {tuple(t.shape)}"
            )
    if codes.dtype != torch.uint8:
        raise KernelInputError(f"{what}: codes must be uint8, got {codes.dtype}")
    if bits == 4 and codes.numel() and int(codes.max()) > 15:
        raise KernelInputError(f"{what}: 4-bit codes must lie in 0..15, got {int(codes.max())}")
    sdt = scale_dtype or _pick_scale_dtype(scale, shift)
    kp = -(-k // 64) * 64
    c = torch.zeros(n, kp, dtype=torch.uint8)
    c[:, :k] = codes
    if bits == 4:
        c = c.view(n, kp // 64, 2, 32)
        c = (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, kp // 2)
    s = scale.t().to(sdt)  # (N, groups)
    if group_size % 64:
        s = s.repeat_interleave(group_size // 32, dim=1)  # one per block of 32
        s = torch.nn.functional.pad(s, (0, kp // 32 - s.shape[1]))
    h = None if shift is None else shift.t().to(sdt).contiguous()
    return PackedInt(bits, c.contiguous(), s.contiguous(), h, group_size, k, zero_point)


def prepare_int8(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int = 0,
    scale_dtype: torch.dtype | None = None,
) -> PackedInt:
    """Pack uint8 codes (N, K) with per-group scale/shift (K/group_size, N) for linear_int8.

    w = (code - zero_point) * scale + shift: Q8_0 is codes = q + 128, zero_point=128, shift None.
    scale_dtype None keeps the values exact (float16 if that holds them, else float32).
    """
    return _prepare(8, codes, scale, shift, group_size, zero_point, scale_dtype)


def prepare_int4(
    codes: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor | None,
    group_size: int,
    zero_point: int = 0,
    scale_dtype: torch.dtype | None = None,
) -> PackedInt:
    """Pack 4-bit codes (N, K) as uint8 in 0..15 with per-group scale/shift (K/group_size, N).

    Q4_0 is zero_point=8, shift None; Q4_1 is zero_point=0, shift = m; GPTQ asymmetric is
    shift = -zero * scale.
    """
    return _prepare(4, codes, scale, shift, group_size, zero_point, scale_dtype)


def _linear_int(
    op_name: str, bits: int, x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None
) -> torch.Tensor:
    if p.bits != bits:
        raise KernelInputError(f"linear_int{bits} got weights packed for {p.bits} bits")
    _require()
    y = getattr(torch.ops.qwenkit, op_name)(
        x.reshape(-1, x.shape[-1]), p.codes, p.scale, p.shift, bias, p.group_size, p.in_features, p.zero_point
    )
    return y.reshape(*x.shape[:-1], p.out_features)


def linear_int8(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (..., K) bf16/fp32 @ dequantized weights.T (+ bias) -> (..., N) in x's dtype. Best for M <= 16.

    x is rounded per row in blocks of 32 to int8 (as llama.cpp's q8 activations); the result is
    dot(w, x_rounded) computed exactly in float.
    """
    return _linear_int("linear_int8", 8, x, p, bias)


def linear_int4(x: torch.Tensor, p: PackedInt, bias: torch.Tensor | None = None) -> torch.Tensor:
    """As linear_int8, for weights packed by prepare_int4."""
    return _linear_int("linear_int4", 4, x, p, bias)


def unpack_codes(p: PackedInt) -> torch.Tensor:
    """The (N, K) uint8 codes back from a PackedInt."""
    c = p.codes
    if p.bits == 4:
        n = c.shape[0]
        c = c.view(n, -1, 32)
        c = torch.stack((c & 0x0F, c >> 4), dim=2).reshape(n, -1)
    return c[:, : p.in_features]


def dequantize(
    p: PackedInt, dtype: torch.dtype = torch.float32, rows: torch.Tensor | None = None
) -> torch.Tensor:
    """The float weights (N, K), or only `rows` of them (an embedding lookup), from a PackedInt."""
    codes = unpack_codes(p)
    scale, shift = p.scale, p.shift
    if rows is not None:
        codes, scale = codes[rows], scale[rows]
        shift = None if shift is None else shift[rows]
    k = codes.shape[1]
    per = p.group_size if p.group_size % 64 == 0 else 32  # inputs covered by one stored scale
    work = torch.float64 if dtype == torch.float64 else torch.float32
    s = scale.to(work)[:, : k // per].repeat_interleave(per, dim=1)
    w = (codes.to(work) - p.zero_point) * s
    if shift is not None:
        w += shift.to(work).repeat_interleave(p.group_size, dim=1)
    return w.to(dtype)
