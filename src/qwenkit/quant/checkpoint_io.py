"""GPTQ checkpoints in and out: the loader's hook and the AutoGPTQ-format writer.

Reading (vLLM-style): the loader builds the float model on the meta device, then calls
:func:`prepare_quantized_model`, which asks :func:`get_quant_method` for each Linear by its full name
and swaps in an empty :class:`QuantizedLinear` in checkpoint state. Each one then expects exactly these
tensors (Hugging Face Qwen2 names, e.g. ``model.layers.0.self_attn.q_proj.qweight``)::

    <prefix>.qweight  int32   (in * bits / 32, out)
    <prefix>.qzeros   int32   (G, out * bits / 32)       G = ceil(in / group_size), 1 if group_size == -1
    <prefix>.scales   float16 (G, out)
    <prefix>.g_idx    int32   (in,)                      optional without act-order: see with_default_g_idx
    <prefix>.bias     (out,)  only where the float layer has a bias; all-zero extras may be dropped

A MoE router (``mlp.gate``, ``mlp.shared_expert_gate``) stays float in qwenkit; a file whose writer
quantized it (AutoRound, some GPTQModel versions) gives its dequantized weight (see :func:`_float_routers`).

After the tensors are assigned, :func:`finalize_quantized_model` packs every layer for its kernel (the
first forward does it too, layer by layer, if the loader does not).

Writing: :func:`save_gptq` streams a quantized model into ``model.safetensors`` (sharded past
``shard_bytes``), ``quantize_config.json`` and ``config.json`` with ``quantization_config``
(``quant_method: gptq``): the AutoGPTQ layout. tests/quant/test_quant_interop.py loads it with
transformers + optimum + GPTQModel; which outputs vLLM takes (``desc_act: false``, groups that tile every
layer) is in the README's reader table.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from qwenkit.checkpoint.files import WeightFiles, iter_tensors, tensor_names
from qwenkit.model.modules import replace_module
from qwenkit.quant.gptq_format import GPTQConfig, QuantizationError, default_g_idx, pack_gptq, unpack_gptq
from qwenkit.quant.linear import QuantizedLinear

NOT_QUANTIZED = ("lm_head",)  # GPTQ checkpoints keep lm_head (and embeddings, norms) in float
# A MoE router's GPTQ tensors, where a writer quantized it: (layer prefix, kind).
_ROUTER = re.compile(r"^(.+\.mlp\.(?:gate|shared_expert_gate))\.(qweight|qzeros|scales|g_idx)$")


def get_quant_method(layer_name: str, linear: nn.Linear, config: GPTQConfig) -> QuantizedLinear | None:
    """The quantized replacement for the Linear named ``layer_name``, or None to keep it float."""
    if layer_name.split(".")[-1] in NOT_QUANTIZED:
        return None
    layer_config = config.for_layer(layer_name)  # float or other bits where the checkpoint says so
    if layer_config is None:
        return None
    device = linear.weight.device
    return QuantizedLinear.for_checkpoint(
        linear.in_features, linear.out_features, linear.bias is not None, layer_config, device=device
    )


def with_default_g_idx(hf_config: dict[str, Any], weights: WeightFiles) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, with each GPTQ layer's missing ``g_idx`` given right after its qweight.

    Some writers omit ``g_idx`` without act-order (``desc_act`` false); vLLM then uses the default
    ``i // group_size`` (built before loading), and so does this. transformers 5.25 + GPTQModel 7.6 do
    not: they leave the buffer uninitialized, so qwenkit writes g_idx in every file it makes. With
    ``desc_act`` true the groups are a permutation only the file knows: refused, naming a layer.
    ``desc_act`` is each layer's own (GPTQModel's ``dynamic`` may set it per layer). Which layers lack
    one is read from the names up front, so each layer still packs as soon as its own tensors are in.
    """
    quantization = hf_config.get("quantization_config")
    if not quantization or quantization.get("quant_method", "gptq") != "gptq":
        return iter_tensors(weights)
    names = tensor_names(weights)
    lacking = sorted(
        prefix
        for prefix in (n.removesuffix(".qweight") for n in names if n.endswith(".qweight"))
        if f"{prefix}.g_idx" not in names
    )
    routers = any(_ROUTER.match(n) for n in names)
    if not lacking and not routers:
        return iter_tensors(weights)
    config = GPTQConfig.from_dict(quantization)
    permuted = [prefix for prefix in lacking if (config.for_layer(prefix) or config).desc_act]
    if permuted:
        more = f" and {len(permuted) - 1} more" if len(permuted) > 1 else ""
        where = "" if config.desc_act else f" for {permuted[0]} (its dynamic entry)"
        raise QuantizationError(
            f"{weights.directory}: the quantization config says desc_act=true (act-order){where}, but "
            f"{permuted[0]}.g_idx{more} is missing; its column groups cannot be rebuilt without it"
        )
    tensors = _add_g_idx(config, weights, set(lacking)) if lacking else iter_tensors(weights)
    return _float_routers(config, weights, tensors) if routers else tensors


def _add_g_idx(
    config: GPTQConfig, weights: WeightFiles, lacking: set[str]
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in iter_tensors(weights):
        yield name, tensor
        prefix = name.removesuffix(".qweight")
        if name.endswith(".qweight") and prefix in lacking:
            layer = config.for_layer(prefix) or config
            yield f"{prefix}.g_idx", default_g_idx(tensor.shape[0] * 32 // layer.bits, layer.group_size)


def _float_routers(
    config: GPTQConfig, weights: WeightFiles, tensors: Iterator[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors, with each quantized MoE router's four GPTQ tensors replaced by its float ``weight``.

    qwenkit keeps routers float (``RouterLinear``: a small error in a router logit changes which experts
    run); the file's dequantized values are the function its writer meant. A router's tensors are held only
    until its four are in; an incomplete set passes through for the loader to name.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors:
        match = _ROUTER.match(name)
        if match is None:
            yield name, tensor
            continue
        prefix, kind = match.groups()
        parts = pending.setdefault(prefix, {})
        parts[kind] = tensor
        if len(parts) < 4:
            continue
        del pending[prefix]
        layer = config.for_layer(prefix) or config
        try:
            codes = unpack_gptq(
                *(parts[k] for k in ("qweight", "qzeros", "scales", "g_idx")),
                layer.bits,
                layer.checkpoint_format,
            )
        except QuantizationError as e:
            raise QuantizationError(f"{weights.directory}: the quantized router {prefix}: {e}") from None
        yield f"{prefix}.weight", codes.dequantize()
    for prefix, parts in pending.items():
        for kind, tensor in parts.items():
            yield f"{prefix}.{kind}", tensor


def prepare_quantized_model(
    model: nn.Module, quantization: dict[str, Any] | GPTQConfig, dtype: torch.dtype | None = None
) -> GPTQConfig:
    """Swap the model's Linears for empty GPTQ layers named by the checkpoint's quantization config.

    ``dtype`` is accepted for the loader's convenience; scales keep float16 until the loader casts them.
    """
    del dtype
    config = quantization if isinstance(quantization, GPTQConfig) else GPTQConfig.from_dict(quantization)
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear):
            new = get_quant_method(name, module, config)
            if new is not None:
                replace_module(model, name, new)
    return config


def finalize_quantized_model(model: nn.Module) -> dict[str, int]:
    """Pack every loaded GPTQ layer for its kernel; returns how many layers run each kernel."""
    counts: dict[str, int] = {}
    for module in model.modules():
        if isinstance(module, QuantizedLinear):
            module.pack()
            counts[module.kernel] = counts.get(module.kernel, 0) + 1
    return counts


def quantized_state_dict(
    model: nn.Module, config: GPTQConfig, float_dtype: torch.dtype = torch.float16
) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` in AutoGPTQ layout, one module at a time (never the whole model at once).

    Quantized layers give qweight/qzeros/scales/g_idx(/bias); every other parameter is cast to
    ``float_dtype``. Tied weights appear once (under the embedding's name), as Hugging Face saves them.
    """
    quantized = {n for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    for name, module in model.named_modules():
        if name in quantized:
            w = module.to_int()
            if w.bits != config.bits:
                raise QuantizationError(f"{name} is {w.bits}-bit but the config says {config.bits}")
            for key, t in pack_gptq(w, config.checkpoint_format).items():
                yield f"{name}.{key}", t.cpu()
            if module.bias is not None:
                yield f"{name}.bias", module.bias.to(torch.float16).cpu()
            continue
        if any(name.startswith(q + ".") for q in quantized):
            continue
        for pname, p in module.named_parameters(recurse=False):
            yield (f"{name}.{pname}" if name else pname), p.detach().to(float_dtype).cpu()


def save_gptq(
    model: nn.Module,
    out_dir: str | Path,
    config: GPTQConfig,
    hf_config: dict[str, Any],
    shard_bytes: int = 5 * 10**9,
) -> Path:
    """Write a quantized model as an AutoGPTQ checkpoint directory (tokenizer files are the caller's)."""
    from qwenkit.checkpoint.saver import save_sharded

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seen: set[int] = set()

    def once() -> Iterator[tuple[str, torch.Tensor]]:
        # Shared parameters (tied lm_head) come once: named_modules visits the embedding first.
        for name, t in quantized_state_dict(model, config):
            key = id(model.get_parameter(name)) if _is_parameter(model, name) else None
            if key is not None and key in seen:
                continue
            if key is not None:
                seen.add(key)
            yield name, t

    save_sharded(once(), out, shard_bytes)
    qcfg = config.to_dict()
    (out / "quantize_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
    cfg = {**hf_config, "quantization_config": qcfg, "torch_dtype": "float16"}
    if "dtype" in cfg:  # transformers 5's name for it, read before torch_dtype: the source's would stay
        cfg["dtype"] = "float16"
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True
