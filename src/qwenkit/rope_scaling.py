"""RoPE scaling: the frozen dataclass of each ``rope_scaling`` type qwenkit runs, and the reading of
``rope_theta`` with ``rope_scaling`` (or transformers 5's ``rope_parameters``) from a ``config.json`` dict.

Part of the config layer: ``config.py`` calls :func:`read_rope` while it builds a ``ModelConfig``, and
nothing else reads these keys. Anything we cannot run faithfully is rejected here, naming the key.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

from qwenkit.errors import ConfigError

# rope_scaling: one frozen dataclass per transformers rope_type we run. model/rope.py computes each one's
# inverse frequencies as transformers' ROPE_INIT_FUNCTIONS do; ``cos_sin_scale`` is the attention factor
# transformers multiplies cos/sin by (1 for all but YaRN). transformers' "dynamic" is not among them: it
# recomputes the frequencies from a batch's longest sequence at every step, which a batched, cached engine
# cannot reproduce (Qwen v1's own dynamic NTK is ModelConfig.use_dynamic_ntk, configured differently).


@dataclass(frozen=True)
class LinearScaling:
    """Linear position interpolation (rope_type ``linear``): every inverse frequency divided by factor."""

    factor: float
    rope_type: ClassVar[str] = "linear"
    cos_sin_scale: ClassVar[float] = 1.0


@dataclass(frozen=True)
class Llama3Scaling:
    """Llama 3.1/3.2 RoPE scaling (rope_type ``llama3``): wavelengths longer than the original window over
    low_freq_factor are divided by factor, shorter than it over high_freq_factor kept, blended between."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: ClassVar[str] = "llama3"
    cos_sin_scale: ClassVar[float] = 1.0


@dataclass(frozen=True)
class YarnScaling:
    """Static YaRN RoPE scaling (Qwen2.5/Qwen3 long context), as transformers computes it."""

    rope_type: ClassVar[str] = "yarn"
    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    @property
    def cos_sin_scale(self) -> float:
        """The factor transformers multiplies cos/sin by (YaRN's attention temperature)."""
        if self.attention_factor is not None:
            return self.attention_factor

        def get_mscale(scale: float, m: float = 1.0) -> float:
            return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

        if self.mscale and self.mscale_all_dim:
            return get_mscale(self.factor, self.mscale) / get_mscale(self.factor, self.mscale_all_dim)
        return get_mscale(self.factor)


RopeScaling = LinearScaling | Llama3Scaling | YarnScaling
ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3", "yarn")


def read_rope(cfg: dict[str, Any]) -> tuple[float, RopeScaling | None]:
    """Read rope_theta and rope_scaling (also transformers 5's ``rope_parameters``)."""
    params = rope_params(cfg)
    theta = float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return theta, None
    if rope_type == "dynamic":
        raise ConfigError(
            "unsupported rope_scaling type 'dynamic': transformers recomputes its frequencies from the "
            "batch's longest sequence at every step, which a cached, batched engine cannot reproduce"
        )
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"unsupported rope_scaling type {rope_type!r}; qwenkit supports {', '.join(ROPE_TYPES)}"
        )

    def number(key: str) -> float:
        value = params.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            given = "" if value is None else f", not {value!r}"
            raise ConfigError(f"rope_scaling type {rope_type} needs {key} (a number{given})")
        if key == "factor" and value <= 0:
            raise ConfigError(f"rope_scaling factor must be positive, not {value!r}")
        return float(value)

    if rope_type == "linear":
        return theta, LinearScaling(factor=number("factor"))
    # As transformers standardizes them: a top-level original_max_position_embeddings wins over
    # rope_scaling's, which defaults to max_position_embeddings
    original = cfg.get("original_max_position_embeddings") or params.get(
        "original_max_position_embeddings", cfg.get("max_position_embeddings")
    )
    # YaRN takes log(original) and may divide by it: 0 was a ZeroDivisionError or a math domain error
    whole = isinstance(original, int) or (isinstance(original, float) and original.is_integer())
    if isinstance(original, bool) or not whole or original < 1:
        raise ConfigError(
            f"rope_scaling type {rope_type} needs original_max_position_embeddings (the pretrained "
            f"context, a whole number of at least 1, not {original!r})"
        )
    if rope_type == "llama3":
        low, high = number("low_freq_factor"), number("high_freq_factor")
        if high <= low:
            raise ConfigError(
                f"rope_scaling type llama3 needs high_freq_factor ({high:g}) above low_freq_factor ({low:g})"
            )
        return theta, Llama3Scaling(
            factor=number("factor"),
            low_freq_factor=low,
            high_freq_factor=high,
            original_max_position_embeddings=int(original),
        )
    if params.get("factor") is None:  # as transformers: the context's growth over the pretrained one
        given = "original_max_position_embeddings" in params or cfg.get("original_max_position_embeddings")
        if not given or not cfg.get("max_position_embeddings"):
            raise ConfigError(
                "rope_scaling type yarn needs a factor (or original_max_position_embeddings beside "
                "max_position_embeddings, whose ratio it is)"
            )
        factor = cfg["max_position_embeddings"] / original
    else:
        factor = number("factor")  # a number above 0: log(factor) sets its attention factor

    # The optional keys, null where unset (as transformers reads them). Text or a bool loaded and then
    # failed in the model's build with a bare TypeError, or ran as another value ("false" truncated).
    def optional(key: str) -> float | None:
        value = params.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ConfigError(f"rope_scaling type yarn: {key} must be a number or null, not {value!r}")
        return None if value is None else float(value)

    # It multiplies cos and sin, so each attention score by its square: at 0 every score was 0 (attention
    # blind to content) and a negative one ran as its opposite. transformers warns and runs it.
    attention_factor = optional("attention_factor")
    if attention_factor is not None and attention_factor <= 0:
        raise ConfigError(
            "rope_scaling type yarn: attention_factor must be above 0 (it scales cos and sin), not "
            f"{params['attention_factor']!r}; give null to derive it from the factor"
        )
    truncate = params.get("truncate", True)
    if truncate is not None and not isinstance(truncate, bool):
        raise ConfigError(f"rope_scaling type yarn: truncate must be true or false or null, not {truncate!r}")
    return theta, YarnScaling(
        factor=float(factor),
        original_max_position_embeddings=int(original),
        beta_fast=optional("beta_fast") or 32.0,
        beta_slow=optional("beta_slow") or 1.0,
        attention_factor=attention_factor,
        mscale=optional("mscale"),
        mscale_all_dim=optional("mscale_all_dim"),
        truncate=bool(truncate),  # null is falsy to transformers: no truncation
    )


def rope_params(cfg: dict[str, Any]) -> dict[str, Any]:
    """rope_scaling and transformers 5's rope_parameters as one dict. Both given, they must agree:
    transformers then reads rope_scaling alone (and rope_theta only from the top level), so adding the
    documented YaRN rope_scaling to a config.json that transformers 5 wrote (rope_parameters of type
    default) ran YaRN there with the default base 10000 and here no YaRN at all."""
    scaling = dict(cfg.get("rope_scaling") or {})
    params = dict(cfg.get("rope_parameters") or {})
    if scaling and params:
        for d in (scaling, params):
            d.setdefault("rope_type", d.get("type", "default"))
        clash = sorted(k for k in scaling.keys() & params.keys() if k != "type" and scaling[k] != params[k])
        if clash:
            where = ", ".join(f"{k} {scaling[k]!r} against {params[k]!r}" for k in clash)
            raise ConfigError(
                f"config.json's rope_scaling and rope_parameters disagree ({where}); keep one of them "
                "(transformers 5 writes rope_parameters: put the scaling keys there, rope_theta beside them)"
            )
    return {**scaling, **params}
