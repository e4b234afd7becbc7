"""Round-to-nearest weight-only quantization: ``--quantize int8|int4`` at load time.

Each Linear is quantized on its own and swapped for a :class:`QuantizedLinear` before the next one is
touched, so at most one float weight is copied at a time (the model's own float weights are freed as
their modules are replaced). When ``lm_head`` is quantized and tied to the input embedding, the
embedding is replaced by a :class:`QuantizedEmbedding` reading the same packed codes, so the largest
matrix of a small model exists once, quantized.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from qwenkit.kernels import available as kernels_available
from qwenkit.kernels import ops as kernel_ops
from qwenkit.model.modules import replace_module
from qwenkit.quant.embedding import QuantizedEmbedding
from qwenkit.quant.gptq_format import IntWeight, QuantizationError, default_g_idx
from qwenkit.quant.linear import QuantizedLinear
from qwenkit.quant.quantizer import check_bits_group, find_params, quantize_codes, round_scale

DEFAULT_SKIP = ("lm_head",)
# int8 per channel runs the fastest CPU kernel (aten._weight_int8pack_mm); int4 needs groups for accuracy.
DEFAULT_GROUP = {8: -1, 4: 128}
DEFAULT_SYM = {8: True, 4: False}
# Weights the kernels' quantize_rtn reads (CPU tensors); others take the torch arithmetic.
KERNEL_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
# Smaller groups --quantize falls back to, largest first, for a layer the default does not tile.
SMALLER_GROUPS = (64, 32)


def default_group_size(bits: int, in_features: int) -> int:
    """``--quantize``'s group size for a layer with ``in_features`` inputs: the default (int4: 128) where
    it tiles the layer, else the largest of :data:`SMALLER_GROUPS` that does (SmolLM2's 576 inputs: 64).
    A short last group runs on no fast CPU kernel (the AVX-512 ones need whole groups), and a smaller
    group only costs one scale and zero per group, never quality. With no file written, no reader needs
    one size for the whole model (``qwenkit quantize`` picks one: :mod:`qwenkit.quant.group_size`)."""
    group = DEFAULT_GROUP[bits]
    if group == -1 or in_features % group == 0:
        return group
    return next((g for g in SMALLER_GROUPS if in_features % g == 0), group)


def quantize_weight_rtn(weight: torch.Tensor, bits: int, group_size: int = -1, sym: bool = True) -> IntWeight:
    """(out, in) float weight -> IntWeight on the same device, each group rounded to its own grid.

    Every element is within half a step of the original: ``|w - deq(w)| <= scale / 2``. A group size
    that does not divide the row leaves a shorter last group, as AutoGPTQ does (e.g. 576 = 4 x 128 + 64).
    """
    out_f, in_f = weight.shape
    gs = check_bits_group(bits, group_size, in_f)
    if weight.device.type == "cpu" and weight.dtype in KERNEL_DTYPES and kernels_available():
        # one C++ pass a row, the same codes, scales and zeros as the torch arithmetic below
        codes, scales, zeros = kernel_ops.run_pass(
            "quantize_rtn", weight.numel(), weight.detach(), bits, gs, sym
        )
        return IntWeight(qweight=codes, scales=scales, zeros=zeros, g_idx=default_g_idx(in_f, gs), bits=bits)
    n_groups = -(-in_f // gs)
    w = weight.detach().float()
    if n_groups * gs != in_f:  # zero padding never changes a group's range: it always includes 0
        w = torch.nn.functional.pad(w, (0, n_groups * gs - in_f))
    groups = w.reshape(out_f, n_groups, gs)  # (out, G, gs)
    scale, zero = find_params(groups.reshape(-1, gs), bits, sym)  # (out*G,)
    scale = round_scale(scale).view(out_f, -1, 1)
    zero = zero.view(out_f, -1, 1)
    q = quantize_codes(groups, scale, zero, bits).reshape(out_f, n_groups * gs)[:, :in_f]
    return IntWeight(
        qweight=q.to(torch.uint8).contiguous(),
        scales=scale.squeeze(-1).T.contiguous(),  # (G, out)
        zeros=zero.squeeze(-1).T.to(torch.int16).contiguous(),
        g_idx=default_g_idx(in_f, gs).to(weight.device),
        bits=bits,
    )


def _targets(model: nn.Module, skip: Iterable[str]) -> list[tuple[str, nn.Linear]]:
    skip = tuple(skip)
    return [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip)
    ]


@torch.no_grad()
def quantize_model_rtn(
    model: nn.Module,
    bits: int,
    group_size: int | None = None,
    sym: bool | None = None,
    skip: Iterable[str] = DEFAULT_SKIP,
) -> nn.Module:
    """Replace every ``nn.Linear`` except ``skip`` (``lm_head`` by default) with an RTN-quantized one.

    Defaults: int8 per channel symmetric, int4 groups of 128 asymmetric (64 or 32 for a layer that 128
    does not tile: :func:`default_group_size`). An untied ``nn.Embedding`` stays
    float; one whose weight is tied to a quantized Linear becomes a :class:`QuantizedEmbedding` of it
    (the loader's ``--quantize`` passes ``skip=()``, so a tied model keeps one quantized copy). Returns
    the same model, modified in place.
    """
    check_bits_group(bits, -1)
    sym = DEFAULT_SYM[bits] if sym is None else sym
    tied: dict[int, list[tuple[str, nn.Embedding]]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Embedding):
            tied.setdefault(id(m.weight), []).append((name, m))
    for name, linear in _targets(model, skip):
        group = default_group_size(bits, linear.in_features) if group_size is None else group_size
        w = quantize_weight_rtn(linear.weight, bits, group, sym)
        bias = None if linear.bias is None else linear.bias.detach()
        new = QuantizedLinear.from_int(w, bias)
        replace_module(model, name, new)
        for emb_name, emb in tied.pop(id(linear.weight), []):
            replace_module(model, emb_name, QuantizedEmbedding(new, emb.weight.dtype))
    return model


def quantize_for_runtime(model: nn.Module, precision: str) -> nn.Module:
    """``--quantize int8|int4``: decoder layers at that precision, the output head (and a tied
    embedding, kept once) at int8.

    llama.cpp likewise keeps its output tensor at 6+ bits: an int4 head costs far more quality than it
    saves (SmolLM2 int4 perplexity 16.7 with an int8 head, 19.6 with an int4 one).
    """
    if precision not in ("int8", "int4"):
        raise QuantizationError(f"unknown quantization {precision!r}; choose int8 or int4")
    quantize_model_rtn(model, bits=8 if precision == "int8" else 4)
    return quantize_model_rtn(model, bits=8, skip=())  # only lm_head is still an nn.Linear
