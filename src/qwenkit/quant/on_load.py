"""Quantized layers built while the loader assigns tensors, so the float model never exists whole.

The loader hands each tensor to :meth:`LayerBuilder.take` before assigning it. A linear weight is turned
into a :class:`QuantizedLinear` at once and swapped in for the (meta) ``nn.Linear``; the float copy is
dropped before the next tensor is read, so peak memory is the quantized model plus one float matrix.

* Integer codes from a GGUF file (:class:`AffineWeight`: codes, scale, shift) run in their own precision.
* With ``--quantize int8|int4``, float weights are rounded to nearest exactly as
  :func:`quantize_for_runtime` does after a float load (same function, same dtype in, same result):
  decoder projections at the asked precision, ``lm_head`` at int8.

A tied token embedding becomes a :class:`QuantizedEmbedding` reading the ``lm_head``'s codes (one copy).
An untied embedding stays float under ``--quantize`` (as before); quantized in a GGUF it is served from its
own codes.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from qwenkit.checkpoint.files import HeapTrimmer, release_pages
from qwenkit.model.modules import replace_module
from qwenkit.quant.affine import AffineWeight
from qwenkit.quant.embedding import QuantizedEmbedding
from qwenkit.quant.gptq_format import IntWeight, default_g_idx
from qwenkit.quant.linear import QuantizedLinear
from qwenkit.quant.rtn import DEFAULT_SYM, default_group_size, quantize_weight_rtn

EMBEDDING = "model.embed_tokens"
HEAD = "lm_head"


class LayerBuilder:
    """Installs quantized layers into a model on the meta device as their weights arrive."""

    def __init__(
        self, model: nn.Module, precision: str | None, dtype: torch.dtype, device: str, tied: bool
    ) -> None:
        self.model, self.dtype, self.device, self.tied = model, dtype, device, tied
        self.bits = {None: None, "int8": 8, "int4": 4}[precision]
        self._trimmer = HeapTrimmer()

    def take(
        self,
        name: str,
        tensor: torch.Tensor | AffineWeight,
        whole: torch.Tensor | None = None,
        columns: tuple[int, int] | None = None,
    ) -> bool:
        """Build the quantized layer ``name`` belongs to, if any; True when the tensor was consumed.

        ``tensor`` is this process's part of the weight; for a tensor-parallel rank's row-parallel layer,
        ``whole`` is the full weight and ``columns`` the (start, end) of the input columns the rank holds:
        it is rounded whole, as one process rounds it (int8's one scale a row spans all the columns), and
        the rank keeps its columns' codes (:func:`column_share`)."""
        module_name, _, attr = name.rpartition(".")
        if attr != "weight":
            return False
        module = self.model.get_submodule(module_name)
        if not isinstance(tensor, torch.Tensor):
            # A file's own codes, the output head's too: every layer on the fastest kernel that runs it
            # (docs/cpu-speed.md, "What changed on the Zen 4, 2026-12-02 11:52-13:05": the head on
            # int8 activations as llama.cpp runs it)
            layer = QuantizedLinear.from_affine(tensor, self._bias(module), device=self.device)
        elif self.bits is None:
            return False
        elif isinstance(module, nn.Linear):
            bits = 8 if module_name == HEAD else self.bits
            share = None
            if whole is not None and columns is not None:
                share = column_share(round_in_row_blocks(whole, bits, self.dtype, self.device), *columns)
            if share is not None:
                layer = QuantizedLinear.from_int(share, self._bias(module))
            else:  # also where groups straddle two ranks' columns: the rank's own, in groups of their own
                layer = self._round(tensor, bits, self._bias(module))
        elif module_name == EMBEDDING and self.tied:
            layer = self._round(tensor, 8, None)  # the tied lm_head, at the head's precision
        else:
            return False  # an untied embedding stays float under --quantize
        self._install(module_name, layer)
        shape = tensor.shape if isinstance(tensor, torch.Tensor) else tensor.codes.shape
        self._trimmer.built(math.prod(shape))
        return True

    def _round(self, tensor: torch.Tensor, bits: int, bias: torch.Tensor | None) -> QuantizedLinear:
        # each block cast as the float load would have held it, so RTN sees the same values; the source
        # block's pages (the file's, or a decoded copy's) are dropped as soon as it is rounded
        release = tensor.device.type == "cpu" and tensor.is_contiguous()  # its span is its own memory
        codes = round_in_row_blocks(tensor, bits, self.dtype, self.device, release=release)
        if release:
            release_pages(tensor.data_ptr(), tensor.nbytes)  # the pages the blocks' edges shared
        del tensor
        return QuantizedLinear.from_int(codes, bias)

    def _install(self, module_name: str, layer: QuantizedLinear) -> None:
        if module_name == EMBEDDING:
            replace_module(self.model, EMBEDDING, QuantizedEmbedding(layer, self.dtype))
            if self.tied:
                replace_module(self.model, HEAD, layer)
            return
        replace_module(self.model, module_name, layer)

    @staticmethod
    def _bias(module: nn.Module) -> torch.Tensor | None:
        """The bias if it arrived first; otherwise the loader sets it on the new layer when it comes."""
        bias = getattr(module, "bias", None)
        return None if bias is None or bias.is_meta else bias.detach()


def column_share(w: IntWeight, lo: int, hi: int) -> IntWeight | None:
    """Input columns lo .. hi - 1 of ``w`` with the scales and zeros of their groups (a tensor-parallel
    rank's share, as ``AffineWeight.input_columns`` for codes with float shifts): its dequantized weight
    is exactly those columns of ``w``'s. None where the run does not begin and end on group edges
    (``--quantize int4``'s groups of 128 over a 448-column run): every kernel needs whole groups."""
    in_f, groups = w.in_features, w.scales.shape[0]
    if groups == 1:  # one group a row (int8): every run keeps it
        return IntWeight(w.qweight[:, lo:hi].contiguous(), w.scales, w.zeros, w.g_idx[lo:hi].clone(), w.bits)
    size = in_f // groups
    if in_f % groups or lo % size or hi % size or not torch.equal(w.g_idx, default_g_idx(in_f, size)):
        return None
    return IntWeight(
        w.qweight[:, lo:hi].contiguous(),
        w.scales[lo // size : hi // size].contiguous(),
        w.zeros[lo // size : hi // size].contiguous(),
        default_g_idx(hi - lo, size),
        w.bits,
    )


ROW_BLOCK_ELEMENTS = 1 << 19  # RTN's float32 temporaries stay ~2 MiB each, even for a 151936-row head


def round_in_row_blocks(
    weight: torch.Tensor,
    bits: int,
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    release: bool = False,
) -> IntWeight:
    """``quantize_weight_rtn`` with the defaults of ``--quantize``, a block of rows at a time.

    Rows are rounded independently (groups run along the input), so the result is the same as one call
    on ``weight.to(device, dtype)``; only the temporaries (the cast block and several float32 copies of
    it) shrink to one block's worth, which for a tied embedding is the difference between ~2 GB and
    ~100 MB of peak memory. The codes, scales and zeros are written into their final tensors block by
    block. ``release``: drop each source block's pages once rounded (the caller is done with ``weight``).
    """
    out_f, in_f = weight.shape
    rows = max(1, ROW_BLOCK_ELEMENTS // in_f)
    result: IntWeight | None = None
    for i in range(0, out_f, rows):
        block = weight[i : i + rows]
        cast = block.to(device or block.device, dtype or block.dtype)
        part = quantize_weight_rtn(cast, bits, default_group_size(bits, in_f), DEFAULT_SYM[bits])
        del cast
        if release:
            release_pages(block.data_ptr(), block.nbytes)
        if rows >= out_f:
            return part
        if result is None:
            result = IntWeight(
                qweight=part.qweight.new_empty((out_f, in_f)),
                scales=part.scales.new_empty((part.scales.shape[0], out_f)),
                zeros=part.zeros.new_empty((part.zeros.shape[0], out_f)),
                g_idx=part.g_idx,
                bits=bits,
            )
        result.qweight[i : i + rows] = part.qweight
        result.scales[:, i : i + rows] = part.scales
        result.zeros[:, i : i + rows] = part.zeros
    assert result is not None  # out_f > 0: the loader checked the shape
    return result
