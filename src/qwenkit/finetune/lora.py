"""LoRA layers: ``y = base(x) + B(A(dropout(x))) * scaling`` on a frozen float or quantized base.

``scaling = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), A (r, in) Kaiming-uniform, B (out, r) zeros, so a
new adapter changes nothing: the math and initialization of peft's ``LoraLayer``, so adapters move between
the two unchanged. A quantized base (qwenkit's int4/int8 ``QuantizedLinear``) is QLoRA: while training,
the weight is dequantized inside autograd, once for the forward and again for the backward, so no float
copy of any weight outlives its layer's use.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit.errors import ConfigError
from qwenkit.model.modules import replace_module
from qwenkit.model.moe import RouterLinear
from qwenkit.model.served_adapters import InLayerAdapter
from qwenkit.quant import QuantizedLinear

DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
VLLM_DEFAULT_MAX_RANK = 16


@dataclass
class LoRAConfig:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = DEFAULT_TARGETS
    layers_to_transform: tuple[int, ...] | None = None
    use_rslora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"LoRA rank must be at least 1, got {self.r}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if not self.target_modules:
            raise ConfigError("LoRA needs at least one target module")

    def scaling(self, r: int, alpha: float) -> float:
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def for_module(self, name: str) -> tuple[int, float]:
        """(r, alpha) of one module: peft's rank_pattern/alpha_pattern keys match a name's suffix."""
        r = next((v for k, v in self.rank_pattern.items() if _suffix_match(k, name)), self.r)
        alpha = next((v for k, v in self.alpha_pattern.items() if _suffix_match(k, name)), self.alpha)
        return r, alpha


def _suffix_match(pattern: str, name: str) -> bool:
    # peft's get_pattern_key: the key in a group, so an alternation (``q_proj|v_proj``) ends at the name's end
    return re.match(rf"(.*\.)?({pattern})$", name) is not None


class _DequantizedMatmul(torch.autograd.Function):
    """x @ W.T for a quantized W, dequantizing in forward and again in backward (nothing float is saved)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantizedLinear) -> torch.Tensor:  # type: ignore[override]
        ctx.layer = layer
        return F.linear(x, dequantized_weight(layer, x.dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        return grad @ dequantized_weight(ctx.layer, grad.dtype), None


def dequantized_weight(layer: QuantizedLinear, dtype: torch.dtype) -> torch.Tensor:
    """(out, in) weight in the original column order, exactly what the layer's packed codes mean."""
    w = layer.dequantize_packed(dtype)
    if layer.perm is None:
        return w
    out = torch.empty_like(w)
    out[:, layer.perm] = w  # the layer reads input column perm[j] against packed column j
    return out


_TRAINING_BASE = contextvars.ContextVar("qwenkit_training_base", default=False)


@contextlib.contextmanager
def training_base() -> Iterator[None]:
    """Within: a quantized base under an adapter computes as the training forward does (its dequantized
    weight in a float matmul), also without gradients, instead of through the inference kernel (whose
    integer products, on 8-bit activations, differ from it in the last digits). DPO scores its reference
    and held-out pairs so, or the policy at its first step would not be exactly its reference."""
    token = _TRAINING_BASE.set(True)
    try:
        yield
    finally:
        _TRAINING_BASE.reset(token)


def frozen_base_forward(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The base layer's output, differentiable in x even when the base is quantized."""
    if isinstance(base, QuantizedLinear) and (
        torch.is_grad_enabled() or base.training or _TRAINING_BASE.get()
    ):
        if x.numel() == 0:  # an idle expert while training (its adapter still runs): nothing to dequantize
            return x.new_zeros(*x.shape[:-1], base.out_features)
        y = _DequantizedMatmul.apply(x, base)
        return y if base.bias is None else y + base.bias.to(y.dtype)
    return base(x)


class LoRALinear(InLayerAdapter):
    """A frozen ``base_layer`` plus a trainable low-rank update (peft's module layout and names)."""

    def __init__(self, base_layer: nn.Module, r: int, alpha: float, dropout: float, scaling: float) -> None:
        super().__init__()
        self.base_layer = base_layer
        in_f, out_f = base_layer.in_features, base_layer.out_features
        device = _device_of(base_layer)
        self.lora_A = nn.Linear(in_f, r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(r, out_f, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha, self.scaling = r, alpha, scaling
        self.in_features, self.out_features = in_f, out_f
        self.disabled = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = frozen_base_forward(self.base_layer, x)
        if self.disabled:
            return y
        update = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        # added in float32 and rounded once, as peft does: rounding the update to a bfloat16 base's dtype
        # before adding rounded twice, and put twice peft's error on the logits
        return (y + update * self.scaling).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """(out, in) float32 ``B @ A * scaling``: what merging adds to the base weight."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scaling


def _device_of(module: nn.Module) -> torch.device:
    for t in [*module.parameters(), *module.buffers()]:
        return t.device
    return torch.device("cpu")


def layer_index(name: str) -> int | None:
    m = re.search(r"\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def target_names(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Linear (or quantized linear) modules whose name ends with a target, in the chosen layers. A MoE
    router (``mlp.gate``, ``mlp.shared_expert_gate``) is one too, when named: peft adapts it on
    transformers 5 as ``gate.weight``."""
    names = []
    for name, module in model.named_modules():
        linear = isinstance(module, nn.Linear | QuantizedLinear | RouterLinear)
        if not linear or name.endswith("lora_A") or "lora_" in name:
            continue
        if not any(name == t or name.endswith("." + t) for t in config.target_modules):
            continue
        if config.layers_to_transform is not None and layer_index(name) not in config.layers_to_transform:
            continue
        names.append(name)
    return names


def check_targets(model: nn.Module, config: LoRAConfig) -> None:
    """Every target the user named must adapt some layer: peft, like the matching above, skips a name that
    matches nothing, so a misspelt ``--target-modules q_proj,v_prj`` trained q_proj alone, silently."""
    found = target_names(model, config)
    missing = [t for t in config.target_modules if not any(n == t or n.endswith("." + t) for n in found)]
    if missing:
        kinds = {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear | QuantizedLinear | RouterLinear)
        }
        where = f" in layers {list(config.layers_to_transform)}" if config.layers_to_transform else ""
        raise ConfigError(
            f"--target-modules: no layer matches {', '.join(missing)}{where}; "
            f"this model's linear layers: {', '.join(sorted(kinds))}"
        )


def apply_lora(model: nn.Module, config: LoRAConfig) -> list[str]:
    """Wrap every targeted layer in a ``LoRALinear``; freeze everything else. Returns the wrapped names."""
    names = target_names(model, config)
    if not names:
        raise ConfigError(
            f"no layer matches LoRA targets {', '.join(config.target_modules)}"
            + (f" in layers {list(config.layers_to_transform)}" if config.layers_to_transform else "")
        )
    model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        r, alpha = config.for_module(name)
        replace_module(model, name, LoRALinear(base, r, alpha, config.dropout, config.scaling(r, alpha)))
    return names


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for m in lora_modules(model).values() for p in (m.lora_A.weight, m.lora_B.weight)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[None]:
    """The base model's function, e.g. DPO's frozen reference without a second copy of the weights."""
    modules = list(lora_modules(model).values())
    for m in modules:
        m.disabled = True
    try:
        yield
    finally:
        for m in modules:
            m.disabled = False


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight (float32 arithmetic, then the base dtype) and unwrap it.

    A quantized base is refused: merging into int4 codes loses the update; merge into the float model.
    """
    for name, m in lora_modules(model).items():
        base = m.base_layer
        if isinstance(base, QuantizedLinear):
            raise ConfigError(
                f"cannot merge into the quantized layer {name}; merge the adapter into the float model"
            )
        merged = base.weight.float() + m.delta_weight().to(base.weight.device)
        # a new parameter, not new data in the old: a tied output head shares it with the embedding,
        # which the head's update must leave as it is (the two are untied from here on)
        base.weight = nn.Parameter(merged.to(base.weight.dtype), requires_grad=False)
        replace_module(model, name, base)
    return model


def set_dropout(model: nn.Module, p: float) -> None:
    """Dropout ``p`` on every adapter's input (as ``apply_lora`` with that dropout would have built)."""
    for m in lora_modules(model).values():
        m.lora_dropout = nn.Dropout(p) if p > 0 else nn.Identity()


@contextlib.contextmanager
def dropout_off(model: nn.Module) -> Iterator[None]:
    """The adapters without their dropout whatever the model's mode: DPO's reference when it is the
    starting adapter (base + adapter), scored exactly as the policy starts."""
    saved = {m: m.lora_dropout for m in lora_modules(model).values()}
    for m in saved:
        m.lora_dropout = nn.Identity()
    try:
        yield
    finally:
        for m, dropout in saved.items():
            m.lora_dropout = dropout
