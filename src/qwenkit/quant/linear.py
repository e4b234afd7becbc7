"""Weight-only int8/int4 Linear layers: integer codes run by a kernel object chosen per layer and device.

A :class:`QuantizedLinear` replaces an ``nn.Linear`` one for one. It has two states:

* *checkpoint* state, built by :meth:`QuantizedLinear.for_checkpoint` (usually on the meta device): it
  holds empty AutoGPTQ buffers ``qweight``, ``qzeros``, ``scales``, ``g_idx`` (and ``bias``) for the loader
  to fill by name; :meth:`pack` (called by ``finalize_quantized_model`` or on the first forward) turns
  them into the runtime form and frees them.
* *runtime* state, built by :meth:`from_int` (GPTQ/RTN integers), :meth:`from_affine` (any
  ``codes * scale + shift``, e.g. GGUF blocks) or :meth:`pack`: a :class:`~qwenkit.quant.kernels.LinearKernel`
  in ``self.impl`` owns the repacked weight; ``self.kernel`` names it (``qwenkit profile`` prints it).

act-order checkpoints (``g_idx`` not monotone) are handled once at pack time: input columns are sorted
by group so groups are contiguous, and ``forward`` gathers ``x[..., perm]``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.quant.affine import AffineWeight, from_int_weight
from qwenkit.quant.gptq_format import (
    GPTQConfig,
    IntWeight,
    QuantizationError,
    default_g_idx,
    gptq_shapes,
    unpack_gptq,
)
from qwenkit.quant.kernels import LinearKernel, build_kernel, choose_kernel

__all__ = ["QuantizedLinear", "choose_kernel"]


class QuantizedLinear(nn.Module):
    """``y = x @ W.T + b`` with ``W = codes * scale + shift`` per group, run by ``self.impl``."""

    impl: LinearKernel | None

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int) -> None:
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size == -1 else group_size  # effective, contiguous
        self.checkpoint_format = "gptq"
        self.impl = None

    @property
    def kernel(self) -> str:
        """What runs this layer (``qwenkit profile`` prints it)."""
        return "unpacked" if self.impl is None else self.impl.running()

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
        kernel: str | None = None,
    ) -> QuantizedLinear:
        """A runtime layer from integer codes (RTN, GPTQ, or an unpacked checkpoint)."""
        device = torch.device(device) if device is not None else w.qweight.device
        m = cls(w.in_features, w.out_features, w.bits, -1)
        m._pack_from_int(w, bias, device, kernel)
        return m

    @classmethod
    def from_affine(
        cls,
        w: AffineWeight,
        bias: torch.Tensor | None = None,
        *,
        device: str | torch.device | None = None,
        kernel: str | None = None,
    ) -> QuantizedLinear:
        """A runtime layer from ``codes * scale + shift`` (e.g. GGUF blocks with float minimums).

        Such a layer has no GPTQ zero points, so :meth:`to_int` refuses it unless every shift is an
        integer multiple of its scale."""
        device = torch.device(device) if device is not None else w.codes.device
        m = cls(w.in_features, w.out_features, w.bits, w.group_size)
        m._install(w, None, bias, device, kernel)
        return m

    @classmethod
    def from_kernel(cls, impl: LinearKernel, bias: torch.Tensor | None = None) -> QuantizedLinear:
        """A runtime layer around a kernel already built (fused projections: ``quant.fused``). It has no
        GPTQ scales of its own, so it is for running, not for writing checkpoints."""
        m = cls(impl.in_features, impl.out_features, impl.bits, impl.group_size)
        m.register_buffer("bias", bias)
        m.register_buffer("perm", None)
        m.impl = impl
        return m

    def pack(self, kernel: str | None = None) -> None:
        """Checkpoint state -> runtime state (after the loader has filled the AutoGPTQ buffers)."""
        if self.impl is not None:
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
        self, w: IntWeight, bias: torch.Tensor | None, device: torch.device, kernel: str | None
    ) -> None:
        affine, perm = from_int_weight(w)
        # The exact GPTQ scales and zero points, for writing checkpoints back (kernels may round scales).
        self.register_buffer("wscales", affine.scale.to(device).contiguous())  # (G, N) float32
        self.register_buffer("wzeros", w.zeros.to(device, torch.uint8).contiguous())  # (G, N)
        self._install(affine, perm, bias, device, kernel)

    def _install(
        self,
        w: AffineWeight,
        perm: torch.Tensor | None,
        bias: torch.Tensor | None,
        device: torch.device,
        kernel: str | None,
    ) -> None:
        self.group_size = w.group_size
        self._buffers.pop("bias", None)
        self.register_buffer("bias", None if bias is None else bias.to(device))
        self.register_buffer("perm", None if perm is None else perm.to(device))
        self.impl = build_kernel(w, device, kernel)

    # ---- running -------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl is None:
            self.pack()
        shape = x.shape
        x2 = x.reshape(-1, self.in_features)  # (rows, in)
        if self.perm is not None:
            x2 = x2.index_select(1, self.perm)
        impl = self.impl
        if impl.max_rows is not None and x2.shape[0] > impl.max_rows:
            y = F.linear(x2, impl.dequantize(x.dtype))
        else:
            y = impl(x2)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def codes(self) -> torch.Tensor:
        """(out, in) uint8 codes in the packed (group-contiguous) column order."""
        if self.impl is None:
            raise QuantizationError("layer is not packed yet")
        return self.impl.codes()

    def dequantize_packed(self, dtype: torch.dtype) -> torch.Tensor:
        """(out, in) weight in packed column order, as the layer's kernel sees it (bfloat16 scales on CPU)."""
        return self.impl.dequantize(dtype)

    def to_int(self) -> IntWeight:
        """The exact integer codes, scales and zeros in the checkpoint's column order (for the writer)."""
        if self.impl is None:
            self.pack()
        if getattr(self, "wscales", None) is None:
            raise QuantizationError(
                "this layer was built from float scales and minimums (e.g. a GGUF file), not GPTQ zero "
                "points; it cannot be written as a GPTQ checkpoint"
            )
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
        """(out, in) float weight in the original column order: from the exact GPTQ codes and scales where
        the layer has them, else as the kernel computes with it."""
        if getattr(self, "wscales", None) is not None:
            return self.to_int().dequantize(dtype)
        w = self.dequantize_packed(dtype)
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w  # packed column j is input column perm[j]
        return out

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}"
        )
