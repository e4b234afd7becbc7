"""q/k/v and gate/up projections fused into one product each, for inference.

Batch-1 decode is a chain of small calls: each linear call pays for the dispatch (on a GPU, a kernel
launch; on the CPU kernels, a thread-team start and, for int8/int4, rounding its activations to int8),
all for a few hundred microseconds of weight reading or less. q, k and v read the same input, as do gate
and up; so at load time, for inference (``load_model(fast_kernels=True)``), each attention's three
projections become one ``qkv_proj`` and each MLP's gate and up one product whose output goes through
one ``silu(gate) * up`` call (``gate_up_silu``); RoPE then rotates q and k in one pass.

On qwenkit's CPU kernels the packed weights are the parts' tiles stacked (``kernels.concat_bf16``/
``concat_int``), and tiles are computed independently, so every output is bit for bit what its part
gave alone; there the RMSNorms become one kernel call each as well, and whole decoder layers one call
(:func:`plan_decode_layers`). Elsewhere (CUDA, or the plain PyTorch path on the CPU) plain float layers
are fused by stacking their weights into one ``nn.Linear``: each output is the same dot product, though
the library may sum it in another order (float rounding, not a different result). Training, adapters,
tensor parallelism and anything that saves load without ``fast_kernels`` and keep the separate modules
(and the checkpoint's names).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import kernels
from qwenkit.checkpoint.files import HeapTrimmer, release_pages, trim_heap
from qwenkit.model.attention import Attention
from qwenkit.model.mlp import MLP
from qwenkit.model.modules import replace_module
from qwenkit.model.moe import MoEMLP
from qwenkit.model.norm import RMSNorm
from qwenkit.model.served_adapters import LoRAProjection, stack_lora
from qwenkit.model.transformer import DecoderLayer, set_decode_planner
from qwenkit.quant.dense import PackedBf16Linear
from qwenkit.quant.kernels.avx512 import (
    Avx512Int4Kernel,
    Avx512Int5Kernel,
    Avx512Int8Kernel,
    Avx512Iq4Kernel,
    Avx512Q6KKernel,
)
from qwenkit.quant.kernels.triton_affine import CudaTritonInt8Kernel
from qwenkit.quant.linear import QuantizedLinear

# their weights are a PackedInt
QWENKIT_INT_KERNELS = (Avx512Int8Kernel, Avx512Int4Kernel, Avx512Iq4Kernel, Avx512Int5Kernel, Avx512Q6KKernel)
ATTENTION_PARTS = ("q_proj", "k_proj", "v_proj")
MLP_PARTS = ("gate_proj", "up_proj")


def fuse_linears(parts: list[nn.Module]) -> nn.Module | None:
    """One layer computing ``cat([p(x) for p in parts], -1)``, or None when the parts are not alike: not
    all on one of qwenkit's kernels (CPU tiles, or CUDA's Triton int8 with equal groups; not another
    kernel, act-order, uneven tiles) nor all plain float ``nn.Linear`` layers of one dtype and device, or
    with and without biases mixed."""
    biases = [getattr(p, "bias", None) for p in parts]
    if any(b is None for b in biases):
        if not all(b is None for b in biases):
            return None
        bias = None
    elif len({b.dtype for b in biases}) != 1:
        return None
    else:
        bias = torch.cat(biases)
    if all(type(p) is nn.Linear for p in parts):
        return _stacked_linear(parts, bias)
    try:
        if all(type(p) is PackedBf16Linear for p in parts):
            return PackedBf16Linear(kernels.concat_bf16([p.packed for p in parts]), bias)
        kernel = type(getattr(parts[0], "impl", None))
        if not all(type(p) is QuantizedLinear and type(p.impl) is kernel and p.perm is None for p in parts):
            return None
        if kernel in QWENKIT_INT_KERNELS:
            packed = kernels.concat_int([p.impl.packed for p in parts])
            return QuantizedLinear.from_kernel(kernel(packed), bias)
        if kernel is CudaTritonInt8Kernel:
            stacked = kernel.stacked([p.impl for p in parts])
            return None if stacked is None else QuantizedLinear.from_kernel(stacked, bias)
    except kernels.KernelInputError:  # uneven tiles, or packings that differ
        return None
    return None


def _stacked_linear(parts: list[nn.Linear], bias: torch.Tensor | None) -> nn.Linear | None:
    """One ``nn.Linear`` whose weight is the parts' weights stacked (outputs in the parts' order)."""
    weights = [p.weight.detach() for p in parts]
    first = weights[0]
    if first.device.type == "meta" or any(
        w.dtype != first.dtype or w.device != first.device or w.shape[1] != first.shape[1] for w in weights
    ):
        return None
    fused = nn.Linear(first.shape[1], sum(w.shape[0] for w in weights), bias=bias is not None, device="meta")
    fused.weight = nn.Parameter(torch.cat(weights), requires_grad=False)
    if bias is not None:
        fused.bias = nn.Parameter(bias.to(first.dtype), requires_grad=False)
    return fused


class GateUpSilu(nn.Module):
    """``silu(gate(x)) * up(x)`` from one fused product ``[gate | up]`` and one activation call."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.linear = linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.linear(x)
        if y.dtype == torch.bfloat16 and y.device.type == "cpu" and kernels.available():
            return kernels.silu_mul(y)
        gate, up = y.chunk(2, dim=-1)
        return F.silu(gate) * up


class FastRMSNorm(RMSNorm):
    """:class:`RMSNorm` as one kernel call for bf16 rows on the CPU, a decode step's and a prompt's alike,
    so a token's norm is the same whichever way it is computed (torch's vectorized kernel sums in another
    order for some widths and row counts). On the Xeon, 512 rows of 896: 57 us against torch's 257."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (
            x.dtype == self.weight.dtype == torch.bfloat16
            and x.device.type == "cpu"
            and not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad))
        ):
            return kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x)


def fuse_for_inference(model: nn.Module, release_parts: bool = False) -> int:
    """Fuse q/k/v and gate/up where :func:`fuse_linears` can; returns how many projections were fused.
    On a CPU model with qwenkit's kernels, also run the norms as one kernel call each and give every
    layer that runs wholly on the kernels its decode-step weights (:func:`plan_decode_layers`).
    ``release_parts``: see :func:`fuse_projections` (the loader's own model only)."""
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    if not (on_cpu and kernels.available()):
        return fuse_projections(model, release_parts)
    use_fast_norms(model)
    count = fuse_projections(model, release_parts)  # float32 layers (not repacked) stack as on the plain path
    trim_heap()  # the parts, freed in the middle of the heap
    plan_moe_experts(model)  # first: a MoE layer's decode weights hold its experts'
    plan_decode_layers(model)
    return count


def plan_moe_experts(model: nn.Module) -> int:
    """Set ``expert_weights`` on every MoE block whose routed experts all run on qwenkit's kernels with
    gate/up fused (then its experts run in one ``kernels.moe_experts`` call); returns how many."""
    return _set_on_each(model, MoEMLP, "expert_weights", expert_weights)


def expert_weights(block: MoEMLP) -> kernels.ExpertWeights | None:
    """The block's routed experts as ``kernels.moe_experts`` arguments (the same tensors, not copies),
    or None where one of them does not run on qwenkit's kernels."""
    experts = [_ffn_args(expert) for expert in block.experts]
    if any(args is None for args in experts):
        return None
    return kernels.ExpertWeights([args[0] for args in experts], [args[1] for args in experts])


def plan_decode_layers(model: nn.Module) -> int:
    """Set ``decode_weights`` on every decoder layer whose parts all run on qwenkit's kernels (then a
    decode step runs the layer inside one ``kernels.decode_layers`` call); returns how many."""
    return _set_on_each(model, DecoderLayer, "decode_weights", decode_layer_weights)


set_decode_planner(plan_decode_layers)  # the model asks again after served adapters change the tensors


def _set_on_each(
    model: nn.Module, kind: type[nn.Module], attribute: str, make: Callable[[Any], object | None]
) -> int:
    """``module.attribute = make(module)`` on every module of ``kind``; how many got something."""
    count = 0
    for m in model.modules():
        if isinstance(m, kind):
            setattr(m, attribute, make(m))
            count += getattr(m, attribute) is not None
    return count


_ABSENT = torch.empty(0)


def decode_layer_weights(layer: DecoderLayer) -> kernels.DecodeLayerWeights | None:
    """The layer's weights as ``kernels.decode_layers`` arguments (the same tensors, not copies), or None
    where a part does not run on qwenkit's kernels: an unfused gate/up, act-order, a MoE layer's experts
    or shared expert off the kernels."""
    attn, mlp = layer.self_attn, layer.mlp
    norms = (layer.input_layernorm, layer.post_attention_layernorm)
    head_norms = () if attn.q_norm is None else (attn.q_norm, attn.k_norm)
    moe = type(mlp) is MoEMLP
    shared = mlp.shared_expert if moe else None  # Qwen2-MoE's, in the dense FFN's slots
    if moe:
        runs = mlp.expert_weights is not None and mlp.gate.packed is not None
        runs = runs and (shared is None or mlp.shared_expert_gate.packed is not None)
    else:
        runs = type(mlp) is MLP
    if not runs or any(
        type(n) is not FastRMSNorm or n.weight.dtype != torch.bfloat16 for n in norms + head_norms
    ):
        return None
    # q/k/v as one product, or as three where they did not fuse (weights of different kinds)
    qkv = [attn.qkv_proj] if attn.qkv_proj is not None else [getattr(attn, n) for n in ATTENTION_PARTS]
    tensors = [n.weight.detach() for n in norms]
    ints = [attn.n_heads, attn.n_kv, attn.head_dim]
    extra_tensors: list[torch.Tensor] = [_ABSENT] * 8
    extra_ints = [0] * 10
    for linear in (qkv[0], attn.o_proj):
        args = _linear_args(linear)
        if args is None:
            return None
        tensors += args[0]
        ints += args[1]
    dense = shared if moe else mlp  # a MoE layer without a shared expert has no gate/up and down
    ffn = ([_ABSENT] * 8, [0] * 10) if dense is None else _ffn_args(dense)
    if ffn is None:
        return None
    tensors += ffn[0]
    ints += ffn[1]
    if len(qkv) == 3:
        parts = [_linear_args(linear) for linear in qkv[1:]]
        if any(a is None for a in parts):
            return None
        extra_tensors = [t for a in parts for t in a[0]]
        extra_ints = [i for a in parts for i in a[1]]
    floats = [norms[0].eps, norms[1].eps, attn.head_dim**-0.5]
    if head_norms:  # Qwen3's q and k norms
        tensors += [n.weight.detach() for n in head_norms]
        floats += [n.eps for n in head_norms]
    else:
        tensors += [_ABSENT, _ABSENT]
        floats += [0.0, 0.0]
    if moe:  # the router (and the shared expert's gate) on the bf16 kernel, and how it picks
        shared_gate = _ABSENT if shared is None else mlp.shared_expert_gate.packed.weight
        router, routing = (
            [mlp.gate.packed.weight, shared_gate],
            [mlp.num_experts, mlp.top_k, int(mlp.norm_topk_prob)],
        )
    else:
        router, routing = [_ABSENT, _ABSENT], [0, 0, 0]
    experts = mlp.expert_weights if moe else None
    products = [qkv, [attn.o_proj]]
    if dense is not None:
        products += [[dense.gate_up_silu.linear], [dense.down_proj]]
    lora = [t for parts in products for t in _lora_args(parts)] + [_ABSENT] * 4 * (dense is None)
    return kernels.DecodeLayerWeights(
        tensors + extra_tensors + router + lora, ints + extra_ints + routing, floats, experts
    )


def _lora_args(parts: list[nn.Module]) -> list[torch.Tensor]:
    """The served adapters' tiles of one product of the layer (``kernels.lora_add_``): q/k/v's, when
    they are three products, stacked over their outputs side by side; two empty tensors where none of
    the parts has a side path."""
    if not any(type(p) is LoRAProjection for p in parts):
        return [_ABSENT, _ABSENT]
    if len(parts) == 1:
        return list(parts[0].tiles)
    return list(kernels.pack_lora(*stack_lora(parts)))


def _ffn_args(mlp: MLP) -> tuple[list[torch.Tensor], list[int]] | None:
    """A SwiGLU FFN's fused gate/up then down as :func:`_linear_args` gives them (8 tensors, 10 ints), or
    None where gate/up did not fuse or a part does not run on qwenkit's kernels."""
    if mlp.gate_up_silu is None:
        return None
    parts = [_linear_args(mlp.gate_up_silu.linear), _linear_args(mlp.down_proj)]
    if any(args is None for args in parts):
        return None
    return [t for args in parts for t in args[0]], [i for args in parts for i in args[1]]


def _linear_args(m: nn.Module) -> tuple[list[torch.Tensor], list[int]] | None:
    """(weight, scale, shift, bias) and (bits, group size, outputs, zero point, bias mode) of one linear
    as ``kernels.decode_layers`` reads them, or None when it does not run on qwenkit's kernels. A
    projection with served adapters gives its base's (:func:`decode_layer_weights` adds the rest)."""
    if type(m) is LoRAProjection:
        m = m.base
    if type(m) is PackedBf16Linear:
        bias = _ABSENT if m.bias is None else m.bias
        mode = 0 if m.bias is None else 1  # the bf16 kernel adds it in fp32, before rounding
        return [m.packed.weight, _ABSENT, _ABSENT, bias], [16, 0, m.out_features, 0, mode]
    impl = getattr(m, "impl", None)
    if type(m) is not QuantizedLinear or type(impl) not in QWENKIT_INT_KERNELS:
        return None
    if m.perm is not None or impl.max_rows is not None:
        return None
    p = impl.packed
    bias = None if m.bias is None else m.bias.detach().to(torch.bfloat16)  # QuantizedLinear's y + bias
    shift = _ABSENT if p.shift is None else p.shift
    tensors = [p.codes, p.scale, shift, _ABSENT if bias is None else bias]
    return tensors, [p.bits, p.group_size, p.out_features, p.zero_point, 0 if bias is None else 2]


def use_fast_norms(model: nn.Module) -> None:
    """Every :class:`RMSNorm` of ``model`` becomes a :class:`FastRMSNorm` on the same weight."""
    for name, m in list(model.named_modules()):
        if type(m) is RMSNorm:
            fast = FastRMSNorm(m.weight.shape[0], m.eps)
            fast.weight = m.weight  # the same parameter
            replace_module(model, name, fast)


def fuse_projections(model: nn.Module, release_parts: bool = False) -> int:
    """Fuse q/k/v and gate/up in every layer where :func:`fuse_linears` can; returns how many fused.

    ``release_parts``: drop the pages of plain CPU parts' weights once fused (``checkpoint.files.
    release_pages``). A memory-mapped checkpoint stays open for the other tensors, so the parts' pages,
    read to stack them, would otherwise count beside the stacked copy until the process ends (a
    Qwen2.5-0.5B-shape bf16 load on the plain path peaked 0.45 GB higher). Only for a model nobody
    else holds parts of: pages of memory that is not a file's read back as zeros."""
    count = 0
    trimmer = HeapTrimmer()
    # Only the blocks: a list of every module would keep each part (and its weight) alive until the end,
    # and a bf16 Qwen2.5-0.5B load peaked 0.44 GB higher for it.
    for m in [m for m in model.modules() if isinstance(m, (Attention, MLP))]:
        if isinstance(m, Attention) and m.qkv_proj is None:
            names = ATTENTION_PARTS
        elif isinstance(m, MLP) and m.gate_up_silu is None:
            names = MLP_PARTS
        else:
            continue
        fused = fuse_linears([getattr(m, n) for n in names])
        if fused is None:
            continue
        fused.fused_from = names  # ``qwenkit profile`` counts the checkpoint's layers, not the products
        if isinstance(m, Attention):
            m.qkv_proj = fused
        else:
            m.gate_up_silu = GateUpSilu(fused)
        if release_parts and type(fused) is nn.Linear and fused.weight.device.type == "cpu":
            for n in names:
                weight = getattr(m, n).weight
                release_pages(weight.data_ptr(), weight.nbytes)
        for n in names:
            delattr(m, n)
        trimmer.built(fused.in_features * fused.out_features)  # the parts freed mid-heap: given back
        count += 1
    return count
