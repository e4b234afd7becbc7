"""GPTQ (Frantar et al., 2022): quantize each Linear so that its *outputs* on calibration data change least.

For one Linear with inputs X, GPTQ minimizes ``||X W^T - X Q^T||`` column by column: after rounding input
column i, the rounding error is spread over the columns not yet rounded, weighted by the inverse
Hessian ``H = 2 X^T X`` (computed once, damped, through a Cholesky factor). Columns go in blocks so the
update is one matmul per block. This follows AutoGPTQ's ``GPTQ.fasterquant`` so results match its files.
Column order (``act_order``):

* ``none``: file order; each group gets its scale/zero when its first column is reached.
* ``static`` (``qwenkit quantize``'s default): columns visited by decreasing ``diag(H)`` (the loudest
  inputs first, so later columns absorb their rounding error), but every group keeps its file-order
  columns and its grid is fixed up front from the original weights (AutoGPTQ's ``static_groups``). The
  stored ``g_idx`` is monotone, so readers see a plain ``desc_act: false`` checkpoint. Summed over 21
  Linears of SmolLM2, its output error ``tr(D H D^T)`` is within 0.3% of dynamic's; without act-order
  it is 34% higher (``benchmarks/bench_act_order_error.py``).
* ``dynamic``: the same visiting order with groups formed in it (``desc_act: true``): ``g_idx`` is a
  permutation, which readers must regroup (qwenkit does once at load; vLLM refuses such files).

The model is calibrated one decoder layer at a time: we record the inputs of layer 0, then for each
layer accumulate the Hessians of its Linears with forward hooks, quantize them in true-sequential order
(q/k/v, then o, then gate/up, then down, each seeing the already-quantized ones before it), and run the
finished layer to make the next layer's inputs. Memory stays near one layer's activations.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from qwenkit.model.modules import replace_module
from qwenkit.model.transformer import Transformer
from qwenkit.quant.gptq_format import (
    ACT_ORDERS,
    ActOrder,
    GPTQConfig,
    IntWeight,
    QuantizationError,
    default_g_idx,
)
from qwenkit.quant.linear import QuantizedLinear
from qwenkit.quant.quantizer import find_params, quantize_codes, round_scale
from qwenkit.quant.rtn import quantize_weight_rtn

# True-sequential order inside a Qwen2 decoder layer; any other Linear found goes in a last group.
SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


class HessianAccumulator:
    """Running ``H = 2/N * sum_t x_t x_t^T`` over every token a Linear sees (float32)."""

    def __init__(self, in_features: int, device: torch.device) -> None:
        self.sum = torch.zeros(in_features, in_features, dtype=torch.float32, device=device)
        self.tokens = 0

    def add(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, x.shape[-1]).float()  # (tokens, in)
        self.sum.addmm_(x.T, x)
        self.tokens += x.shape[0]

    @property
    def hessian(self) -> torch.Tensor:
        if not self.tokens:
            raise QuantizationError("no calibration tokens reached this layer")
        return self.sum * (2.0 / self.tokens)


def _group_params(w: torch.Tensor, bits: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    scale, zero = find_params(w, bits, sym)
    return round_scale(scale), zero


@torch.no_grad()
def gptq_quantize_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    bits: int,
    group_size: int = 128,
    sym: bool = True,
    damp_percent: float = 0.01,
    act_order: ActOrder = "none",
    block_size: int = 128,
) -> IntWeight:
    """Quantize one (out, in) weight with GPTQ given its input Hessian (in, in).

    Works in float32, or float64 when the weight is float64 (tests compare against a float64 reference).
    """
    out_f, in_f = weight.shape
    if tuple(hessian.shape) != (in_f, in_f):
        raise QuantizationError(
            f"Hessian shape {tuple(hessian.shape)} does not match weight {tuple(weight.shape)}"
        )
    if act_order not in ACT_ORDERS:
        raise QuantizationError(f"act_order={act_order!r} is not supported; choose {', '.join(ACT_ORDERS)}")
    gs = in_f if group_size == -1 else group_size
    n_groups = math.ceil(in_f / gs)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    W = weight.detach().to(dtype).clone()
    H = hessian.to(dtype).clone()
    dead = torch.diag(H) == 0  # inputs that never fired: any value works, so pin them to 0
    H[dead, dead] = 1
    W[:, dead] = 0

    scales = torch.empty(n_groups, out_f, device=W.device)
    zeros = torch.empty(n_groups, out_f, device=W.device)
    fixed = group_size == -1 or act_order == "static"
    if fixed:  # grids chosen from the original weight, in the original column order
        for g in range(n_groups):
            scales[g], zeros[g] = _group_params(W[:, g * gs : (g + 1) * gs], bits, sym)

    perm = None
    if act_order != "none":
        perm = torch.argsort(torch.diag(H), descending=True)
        W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp_percent * torch.mean(torch.diag(H)))
    L = torch.linalg.cholesky(H)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)  # upper factor of H^-1

    codes = torch.zeros_like(W)
    scale = zero = None
    for i1 in range(0, in_f, block_size):
        i2 = min(i1 + block_size, in_f)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if fixed:
                g = (int(perm[col]) if perm is not None else col) // gs
                scale, zero = scales[g], zeros[g]
            elif col % gs == 0:
                # AutoGPTQ picks the grid from W as updated by earlier blocks (not this block's updates).
                scale, zero = _group_params(W[:, col : col + gs], bits, sym)
                scales[col // gs], zeros[col // gs] = scale, zero
            w = W1[:, i]
            q = quantize_codes(w, scale, zero, bits)
            codes[:, col] = q
            err = (w - scale * (q - zero)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]

    g_idx = default_g_idx(in_f, gs).to(W.device)
    if perm is not None:
        inv = torch.argsort(perm)
        codes = codes[:, inv]
        if not fixed:
            g_idx = g_idx[inv]  # permuted column j was in group j // gs
    return IntWeight(
        qweight=codes.to(torch.uint8),
        scales=scales,
        zeros=zeros.to(torch.int16),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
    )


# ---- layer-by-layer calibration -----------------------------------------------------------------------


class _StopForward(Exception):
    """Raised by the capture hook: nothing past layer 0 is needed while recording its inputs."""


def _as_samples(
    calibration: Sequence[Sequence[int]] | torch.Tensor, device: torch.device
) -> list[torch.Tensor]:
    if isinstance(calibration, torch.Tensor):
        rows = calibration.reshape(-1, calibration.shape[-1]) if calibration.dim() > 1 else calibration[None]
        samples = [r[None].to(device, torch.long) for r in rows]
    else:
        samples = [torch.tensor([list(s)], dtype=torch.long, device=device) for s in calibration]
    samples = [s for s in samples if s.numel()]
    if not samples:
        raise QuantizationError("GPTQ needs at least one non-empty calibration sequence")
    return samples


def _capture_layer_inputs(
    model: nn.Module, first: nn.Module, samples: list[torch.Tensor]
) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
    captured: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        captured.append((args, kwargs))
        raise _StopForward

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for ids in samples:
            # Qwen v1 dynamic NTK: a window past seq_length runs with the alpha its length fixes, as
            # inference (and modeling_qwen.py under AutoGPTQ) runs it; alpha 1 beside LogN's scaling
            # calibrated on activations no forward of the model produces
            alpha = model.ntk_alpha(ids.shape[1]) if isinstance(model, Transformer) else 1.0
            with contextlib.suppress(_StopForward):
                model(ids) if alpha == 1.0 else model(ids, ntk_alphas=[alpha])
    finally:
        handle.remove()
    return captured


def _run_layer(layer: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    out = layer(*args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _sequential_groups(layer: nn.Module, true_sequential: bool, skip: Sequence[str]) -> list[list[str]]:
    linears = [
        n for n, m in layer.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] not in skip
    ]
    if not true_sequential:
        return [linears] if linears else []
    groups = [[n for n in group if n in linears] for group in SEQUENTIAL_GROUPS]
    rest = [n for n in linears if not any(n in g for g in groups)]
    return [g for g in [*groups, rest] if g]


@torch.no_grad()
def gptq_quantize_model(
    model: nn.Module,
    calibration: Sequence[Sequence[int]] | torch.Tensor,
    config: GPTQConfig | None = None,
    *,
    progress: bool = True,
    skip: Sequence[str] = ("lm_head",),
) -> nn.Module:
    """Quantize every Linear inside ``model.model.layers`` with GPTQ; replaced in place, model returned.

    ``calibration``: token-id sequences (``list[list[int]]`` or a LongTensor (N, T)); see
    :func:`qwenkit.quant.calibration.calibration_token_ids`. Embeddings, norms and ``lm_head`` stay float.
    """
    config = config or GPTQConfig()
    layers = model.model.layers
    device = next(model.parameters()).device
    samples = _as_samples(calibration, device)
    inputs = _capture_layer_inputs(model, layers[0], samples)
    bar = tqdm(total=len(layers), desc="GPTQ", unit="layer", disable=not progress)
    for index, layer in enumerate(layers):
        for names in _sequential_groups(layer, config.true_sequential, skip):
            acc = {n: HessianAccumulator(layer.get_submodule(n).in_features, device) for n in names}
            handles = [
                layer.get_submodule(n).register_forward_hook(
                    lambda _m, args, _out, a=acc[n]: a.add(args[0].detach())
                )
                for n in names
            ]
            try:
                for args, kwargs in inputs:
                    _run_layer(layer, args, kwargs)
            finally:
                for h in handles:
                    h.remove()
            for n in names:
                linear = layer.get_submodule(n)
                if not acc[n].tokens:
                    # A MoE expert no calibration token was routed to: nothing to weigh the error by.
                    bias = None if linear.bias is None else linear.bias.detach()
                    w = quantize_weight_rtn(linear.weight, config.bits, config.group_size, config.sym)
                    replace_module(layer, n, QuantizedLinear.from_int(w, bias))
                    acc.pop(n)
                    continue
                tokens = acc[n].tokens
                try:
                    w = gptq_quantize_weight(
                        linear.weight,
                        acc.pop(n).hessian,
                        config.bits,
                        config.group_size,
                        config.sym,
                        config.damp_percent,
                        config.act_order,
                    )
                except torch.linalg.LinAlgError:  # too little damping for a rank-deficient Hessian
                    raise QuantizationError(
                        f"GPTQ cannot invert the Hessian of model.layers.{index}.{n} ({linear.in_features} "
                        f"inputs, {tokens} calibration tokens): raise --damp (now {config.damp_percent:g}) "
                        "or calibrate on more text"
                    ) from None
                bias = None if linear.bias is None else linear.bias.detach()
                replace_module(layer, n, QuantizedLinear.from_int(w, bias))
        # The quantized layer's outputs are the next layer's inputs (errors are not compounded blindly).
        inputs = [((_run_layer(layer, args, kwargs), *args[1:]), kwargs) for args, kwargs in inputs]
        bar.update(1)
    bar.close()
    return model
