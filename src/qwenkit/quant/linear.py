"""Weight-only int8/int4 Linear layers and the packed kernels that run them, chosen by device.

A :class:`QuantizedLinear` keeps integer codes with per-group scales and zero points and replaces an
``nn.Linear`` one for one. It has two states:

* *checkpoint* state, built by :meth:`QuantizedLinear.for_checkpoint` (usually on the meta device): it
  holds empty AutoGPTQ buffers ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) for the loader
  to fill by name; :meth:`pack` (called by ``finalize_quantized_model`` or on the first forward) turns
  them into the runtime form and frees them.
* *runtime* state, built by :meth:`QuantizedLinear.from_int` or :meth:`pack`: codes repacked for one
  kernel. ``self.kernel`` names it (``qwenkit profile`` prints it).

Kernels (numbers from ``benchmarks/bench_quant_kernels.py`` on the 2-core AVX-512 CPU, Qwen2.5-0.5B
shapes, one token): PyTorch's CPU int8/int4 kernels are only fast with bfloat16 activations (float32 is
5-15x slower than a dense float32 matmul), so on CPU activations are cast to bfloat16 for the kernel and
the result cast back. Past ``PREFILL_ROWS`` rows the int kernels become compute bound and lose to
dequantize + dense matmul, so prompts take that path.

act-order checkpoints (``g_idx`` not monotone) are handled once at pack time: input columns are sorted
by group so groups are contiguous, and ``forward`` gathers ``x[..., perm]``.
"""

from __future__ import annotations

import functools
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant.gptq_format import (
    GPTQConfig,
    IntWeight,
    QuantizationError,
    default_g_idx,
    gptq_shapes,
    unpack_gptq,
)

Kernel = Literal["cpu_int8pack", "cpu_int4pack", "cpu_int8_as_int4x2", "cuda_int4pack", "dequant"]

KERNEL_NAMES: dict[str, str] = {
    "cpu_int8pack": "aten._weight_int8pack_mm (bf16 activations)",
    "cpu_int4pack": "aten._weight_int4pack_mm_for_cpu (bf16 activations)",
    "cpu_int8_as_int4x2": "aten._weight_int4pack_mm_for_cpu x2, int8 split in nibbles (bf16 activations)",
    "cuda_int4pack": "aten._weight_int4pack_mm (cuda, bf16 activations)",
    "dequant": "dequantize + matmul per call (fallback)",
}

# Above this many rows (tokens) per call, dequantize + dense matmul beats the CPU int kernels (measured
# at the 896x4864 shape: int8 kernel 3.9 ms vs 6.0 ms dequant+matmul at 64 rows; int4 dequantizing costs
# ~15 ms, so its kernel wins to a few hundred rows).
PREFILL_ROWS: dict[str, int] = {"cpu_int8pack": 128, "cpu_int4pack": 256, "cpu_int8_as_int4x2": 256}
_INT4_GROUPS = (256, 128, 64, 32)  # the group sizes aten's int4 kernels accept


def _kernel_group(group_size: int, in_features: int) -> int | None:
    """Largest group the int4 kernels accept that tiles both our groups and the row (scales repeat)."""
    for g in _INT4_GROUPS:
        if group_size % g == 0 and in_features % g == 0:
            return g
    return None


@functools.cache
def _cpu_int4_layout_ok() -> bool:
    """Check once that aten's CPU int4 packing is the layout :func:`_unpack_cpu_int4` undoes."""
    try:
        q = torch.randint(0, 16, (128, 64), dtype=torch.int32, generator=torch.Generator().manual_seed(0))
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        return torch.equal(_unpack_cpu_int4(packed, 128, 64), q.to(torch.uint8))
    except (RuntimeError, AttributeError):
        return False


def _unpack_cpu_int4(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """aten's CPU int4 layout -> (n, k) uint8 codes.

    Byte (block, k, j) of the (n/64, k, 32) view holds row ``64*block + j`` in its low nibble and row
    ``64*block + 32 + j`` in its high nibble (checked by ``_cpu_int4_layout_ok``).
    """
    v = packed.view(n // 64, k, 32)
    rows = torch.cat([v & 0xF, v >> 4], dim=2)  # (n/64, k, 64)
    return rows.permute(0, 2, 1).reshape(n, k)


def choose_kernel(
    bits: int, group_size: int, in_features: int, out_features: int, device: torch.device
) -> Kernel:
    """The fastest kernel that can run this layer exactly on ``device`` (see the module docstring)."""
    if device.type == "cpu":
        g = _kernel_group(group_size, in_features)
        if bits == 8 and group_size == in_features and hasattr(torch, "_weight_int8pack_mm"):
            return "cpu_int8pack"
        if g is not None and out_features % 64 == 0 and _cpu_int4_layout_ok():
            return "cpu_int4pack" if bits == 4 else "cpu_int8_as_int4x2"
    if device.type == "cuda" and bits == 4:
        g = _kernel_group(group_size, in_features)
        if g is not None and out_features % 8 == 0 and torch.cuda.get_device_capability(device)[0] >= 8:
            return "cuda_int4pack"
    return "dequant"


def _scales_zeros(scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """(G, N, 2) bfloat16 ``qScaleAndZeros`` for aten int4 kernels, which compute ``(q - 8) * scale + shift``.

    GPTQ means ``s * (q - zero)``, so a plain int4 layer passes ``scale = s, shift = s * (8 - zero)``.
    """
    return torch.stack([scale, shift], dim=-1).to(torch.bfloat16).contiguous()


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W = scales * (q - zeros)`` stored as 4- or 8-bit integer codes."""

    kernel: str

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size == -1 else group_size  # effective, contiguous
        self.checkpoint_format = "gptq"
        self.kernel = "unpacked"
        self._kernel: Kernel | None = None
        self._kernel_group = 0

    # ---- construction --------------------------------------------------------------------------------

    @classmethod
    def for_checkpoint(
        cls,
        in_features: int,
        out_features: int,
        bias: bool,
        config: GPTQConfig,
        device: str | torch.device = "meta",
    ) -> QuantizedLinear:
        """An empty layer in checkpoint state, expecting AutoGPTQ tensors by these names::

        qweight int32 (in*bits/32, out)   qzeros int32 (G, out*bits/32)   scales float16 (G, out)
        g_idx int32 (in,)                 bias (out,) only if the float layer had one
        """
        m = cls(in_features, out_features, config.bits, config.group_size)
        m.checkpoint_format = config.checkpoint_format
        m._config_group = config.group_size
        for name, (shape, dtype) in gptq_shapes(in_features, out_features, config).items():
            m.register_buffer(name, torch.empty(shape, dtype=dtype, device=device))
        if bias:
            m.register_buffer("bias", torch.empty(out_features, dtype=torch.float16, device=device))
        else:
            m.register_buffer("bias", None)
        return m

    @classmethod
    def from_int(
        cls,
        w: IntWeight,
        bias: torch.Tensor | None = None,
        *,
        device: str | torch.device | None = None,
        kernel: Kernel | None = None,
    ) -> QuantizedLinear:
        """A runtime layer from integer codes (RTN, GPTQ, or an unpacked checkpoint)."""
        device = torch.device(device) if device is not None else w.qweight.device
        m = cls(w.in_features, w.out_features, w.bits, -1)
        m._pack_from_int(w, bias, device, kernel)
        return m

    def pack(self, kernel: Kernel | None = None) -> None:
        """Checkpoint state -> runtime state (after the loader has filled the AutoGPTQ buffers)."""
        if self._kernel is not None:
            return
        if self.qweight.is_meta:
            raise QuantizationError("QuantizedLinear.pack() before its qweight/qzeros/scales were loaded")
        w = unpack_gptq(
            self.qweight,
            self.qzeros,
            self.scales,
            self.g_idx,
            self.bits,
            self.checkpoint_format,
            group_size=getattr(self, "_config_group", None),
        )
        bias = self.bias
        for name in ("qweight", "qzeros", "scales", "g_idx", "bias"):
            self._buffers.pop(name, None)
        self._pack_from_int(w, bias, w.qweight.device, kernel)

    def _pack_from_int(
        self, w: IntWeight, bias: torch.Tensor | None, device: torch.device, kernel: Kernel | None
    ) -> None:
        k, n = w.in_features, w.out_features
        gs, perm = contiguous_groups(w.g_idx, k)
        q = w.qweight.to(device)
        if perm is not None:
            q = q[:, perm.to(device)]  # column j of the stored codes is input column perm[j]
        self.group_size = gs
        self._buffers.pop("bias", None)
        self.register_buffer("bias", None if bias is None else bias.to(device))
        self.register_buffer("perm", None if perm is None else perm.to(device))
        self.register_buffer("wscales", w.scales.to(device, torch.float32).contiguous())  # (G, N)
        self.register_buffer("wzeros", w.zeros.to(device, torch.uint8).contiguous())  # (G, N)
        kernel = kernel or choose_kernel(w.bits, gs, k, n, device)
        needs = {"cpu_int8pack": 8, "cpu_int4pack": 4, "cpu_int8_as_int4x2": 8, "cuda_int4pack": 4}
        if needs.get(kernel, w.bits) != w.bits:
            raise QuantizationError(f"kernel {kernel!r} runs {needs[kernel]}-bit weights, not {w.bits}-bit")
        s, z = self.wscales, self.wzeros.float()
        if kernel in ("cpu_int4pack", "cpu_int8_as_int4x2", "cuda_int4pack"):
            g = _kernel_group(gs, k)
            if g is None:
                raise QuantizationError(f"group size {gs} cannot run on the int4 kernels")
            self._kernel_group = g
            rep = torch.arange(k // g, device=device) * g // gs  # kernel group -> our group
            s, z = s[rep], z[rep]
        if kernel == "cpu_int8pack":
            if gs != k:
                raise QuantizationError("cpu_int8pack needs one group per output channel")
            self.register_buffer("qdata", (q.to(torch.int16) - 128).to(torch.int8).contiguous())
            self.register_buffer("kscales", s[0].to(torch.bfloat16).contiguous())
            fix = s[0] * (z[0] - 128)  # asymmetric zero points: subtract rowsum(x) * s * (zero - 128)
            self.register_buffer("zfix", fix if bool(fix.any()) else None)
        elif kernel == "cpu_int4pack":
            self.register_buffer(
                "qdata", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            )
            self.register_buffer("kscales", _scales_zeros(s, s * (8 - z)))
        elif kernel == "cpu_int8_as_int4x2":
            # q = 16*hi + lo, so s*(q - zero) = 16s*(hi - 8) + s*(lo - 8) + s*(136 - zero): two int4 matmuls.
            hi, lo = (q >> 4).to(torch.int32), (q & 0xF).to(torch.int32)
            self.register_buffer("qdata", torch.ops.aten._convert_weight_to_int4pack_for_cpu(hi, 2))
            self.register_buffer("qdata_lo", torch.ops.aten._convert_weight_to_int4pack_for_cpu(lo, 2))
            self.register_buffer("kscales", _scales_zeros(16 * s, s * (136 - z)))
            self.register_buffer("kscales_lo", _scales_zeros(s, torch.zeros_like(s)))
        elif kernel == "cuda_int4pack":
            qi = q.to(torch.int32)
            as_bytes = ((qi[:, ::2] << 4) | qi[:, 1::2]).to(torch.uint8)
            tiles = 8 if k % 128 == 0 else 4 if k % 64 == 0 else 2
            self.register_buffer("qdata", torch.ops.aten._convert_weight_to_int4pack(as_bytes, tiles))
            self.register_buffer("kscales", _scales_zeros(s, s * (8 - z)))
        elif kernel == "dequant":
            self.register_buffer("qdata", q.contiguous())
        else:
            raise QuantizationError(f"unknown kernel {kernel!r}; choose one of {', '.join(KERNEL_NAMES)}")
        self._kernel = kernel
        self.kernel = KERNEL_NAMES[kernel]

    # ---- running -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._kernel is None:
            self.pack()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        kernel = self._kernel
        if kernel == "dequant" or x2.shape[0] > PREFILL_ROWS.get(kernel, 1 << 30):
            y = F.linear(x2, self.dequantize_packed(x.dtype))
        else:
            y = self._kernel_mm(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def _kernel_mm(self, x: torch.Tensor) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        g = self._kernel_group
        if self._kernel == "cpu_int8pack":
            y = torch._weight_int8pack_mm(xb, self.qdata, self.kscales)
            if self.zfix is not None:
                y = (y.float() - xb.float().sum(1, keepdim=True) * self.zfix).to(torch.bfloat16)
        elif self._kernel == "cpu_int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qdata, g, self.kscales)
        elif self._kernel == "cpu_int8_as_int4x2":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qdata, g, self.kscales)
            y = y + torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.qdata_lo, g, self.kscales_lo)
        else:  # cuda_int4pack
            y = torch.ops.aten._weight_int4pack_mm(xb, self.qdata, g, self.kscales)
        return y.to(x.dtype)

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes in the packed (group-contiguous) column order."""
        n, k = self.out_features, self.in_features
        if self._kernel == "cpu_int8pack":
            return (self.qdata.to(torch.int16) + 128).to(torch.uint8)
        if self._kernel == "cpu_int4pack":
            return _unpack_cpu_int4(self.qdata, n, k)
        if self._kernel == "cpu_int8_as_int4x2":
            return _unpack_cpu_int4(self.qdata, n, k) * 16 + _unpack_cpu_int4(self.qdata_lo, n, k)
        if self._kernel == "cuda_int4pack":
            # The CUDA tile layout is opaque: read the weight back through the kernel itself.
            w = self.dequantize_packed(torch.float32)
            gi = torch.arange(k, device=w.device) // self.group_size
            return (
                torch.round(w / self.wscales[gi].T + self.wzeros[gi].T.float()).clamp(0, 255).to(torch.uint8)
            )
        if self._kernel == "dequant":
            return self.qdata
        raise QuantizationError("layer is not packed yet")

    def dequantize_packed(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight in packed column order, as the layer's kernel sees it (bfloat16 scales on CPU)."""
        k = self.in_features
        if self._kernel == "cuda_int4pack":
            eye = torch.eye(k, dtype=torch.bfloat16, device=self.qdata.device)
            wt = torch.ops.aten._weight_int4pack_mm(
                eye, self.qdata, self._kernel_group, self.kscales
            )  # (in, out)
            return wt.T.to(dtype)
        if self._kernel == "cpu_int8pack":
            shift = torch.zeros_like(self.kscales, dtype=torch.float32) if self.zfix is None else -self.zfix
            return _affine(self.qdata, self.kscales.float()[None], shift[None], k, dtype)
        if self._kernel in ("cpu_int4pack", "cpu_int8_as_int4x2"):
            g = self._kernel_group
            if self._kernel == "cpu_int4pack":
                parts = [(self.codes(), self.kscales)]
            else:
                n = self.out_features
                parts = [
                    (_unpack_cpu_int4(self.qdata, n, k), self.kscales),
                    (_unpack_cpu_int4(self.qdata_lo, n, k), self.kscales_lo),
                ]
            w = None
            for q, sz in parts:  # the kernel's own (q - 8) * scale + shift
                scale, shift = sz[..., 0].float(), sz[..., 1].float()
                part = _affine(q, scale, shift - 8 * scale, g, dtype)
                w = part if w is None else w + part
            return w
        return _dequantize_contiguous(self.qdata, self.wscales, self.wzeros, self.group_size, dtype)

    def to_int(self) -> IntWeight:
        """The exact integer codes, scales and zeros in the checkpoint's column order (for the writer)."""
        if self._kernel is None:
            self.pack()
        q = self.codes()
        g_idx = default_g_idx(self.in_features, self.group_size).to(q.device)
        if self.perm is not None:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.in_features, device=self.perm.device)
            q, g_idx = q[:, inv], g_idx[inv]
        return IntWeight(
            qweight=q, scales=self.wscales, zeros=self.wzeros.to(torch.int16), g_idx=g_idx, bits=self.bits
        )

    def weight_dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) float weight in the original column order, from the exact codes and scales."""
        return self.to_int().dequantize(dtype)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, kernel={self.kernel!r}"
        )


def _dequantize_contiguous(
    q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """(out, in) ``scales * (q - zeros)`` for contiguous groups, in ``dtype``."""
    return _affine(q, scales, -zeros.float() * scales.float(), group_size, dtype)


def _affine(
    q: torch.Tensor, scales: torch.Tensor, shift: torch.Tensor, group_size: int, dtype: torch.dtype
) -> torch.Tensor:
    """(out, in) ``q * scale + shift`` with per-group (G, out) scale and shift, in ``dtype``.

    One fused op over a reshaped view: dequantizing is memory bound, so every extra full-size
    temporary costs about as much as a prompt's matmul.
    """
    n, k = q.shape
    s, b = scales.to(dtype).T, shift.to(dtype).T  # (out, G)
    if k % group_size:  # a short last group: gather per column
        gi = torch.arange(k, device=q.device) // group_size
        return torch.addcmul(b[:, gi], q.to(dtype), s[:, gi])
    w = q.view(n, k // group_size, group_size).to(dtype)
    return torch.addcmul(b[..., None], w, s[..., None]).reshape(n, k)


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
    perm = torch.argsort(g_idx, stable=True)
    return gs, perm
