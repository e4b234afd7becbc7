"""Rotary position embeddings: plain, partial, Qwen v1 dynamic NTK, linear, Llama 3 and static YaRN; plus
LogN scaling.

All variants are rotate-half (NeoX) RoPE; they differ only in the inverse frequencies and in a scale on
cos/sin. cos/sin are computed from each token's absolute position on the fly, so every sequence in a
batch can sit at its own offset and (for v1 dynamic NTK) use its own base.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch

from qwenkit import kernels
from qwenkit.config import ModelConfig
from qwenkit.rope_scaling import LinearScaling, Llama3Scaling, YarnScaling


def ntk_alpha_for_length(length: int, trained_length: int) -> float:
    """Qwen v1's dynamic-NTK alpha: a step function of the prompt length (1 inside the trained window)."""
    context_value = math.log(length / trained_length, 2) + 1
    return max(2 ** math.ceil(context_value) - 1, 1)


def inv_freq(config: ModelConfig, ntk_alpha: float = 1.0) -> torch.Tensor:
    """Inverse frequencies (rotary_dim // 2,) in float32, computed the way the reference code does.

    Always computed on the CPU, whatever the default device: on the meta device (the loader's skeleton)
    this arithmetic would run through torch's Python decompositions, whose first use imports
    torch._dynamo (about as long as importing torch itself)."""
    dim = config.rotary_dim
    base = config.rope_theta
    if ntk_alpha != 1.0:
        base = base * ntk_alpha ** (dim / (dim - 2))
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    scaling = config.rope_scaling
    if isinstance(scaling, YarnScaling):
        return _yarn_inv_freq(scaling, dim, base, exponents)
    plain = 1.0 / (base**exponents)
    if isinstance(scaling, LinearScaling):
        return plain / scaling.factor
    if isinstance(scaling, Llama3Scaling):
        return _llama3_inv_freq(scaling, plain)
    return plain


def _llama3_inv_freq(llama3: Llama3Scaling, plain: torch.Tensor) -> torch.Tensor:
    """Llama 3.1's rule by wavelength: kept where shorter than original / high_freq_factor, divided by
    factor where longer than original / low_freq_factor, and in between a blend of the two that is linear
    in original / wavelength. The float32 operations are transformers', in its order."""
    original = llama3.original_max_position_embeddings
    low, high, factor = llama3.low_freq_factor, llama3.high_freq_factor, llama3.factor
    wavelen = 2 * math.pi / plain
    scaled = torch.where(wavelen > original / low, plain / factor, plain)
    smooth = (original / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= original / high) & (wavelen <= original / low)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(yarn: YarnScaling, dim: int, base: float, exponents: torch.Tensor) -> torch.Tensor:
    """Blend interpolated and extrapolated frequencies with YaRN's linear ramp over dimensions."""

    def correction_dim(rotations: float) -> float:
        return (
            dim
            * math.log(yarn.original_max_position_embeddings / (rotations * 2 * math.pi))
            / (2 * math.log(base))
        )

    low, high = correction_dim(yarn.beta_fast), correction_dim(yarn.beta_slow)
    if yarn.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32, device="cpu") - low) / (high - low), 0, 1)
    extrapolation_weight = 1 - ramp
    pos_freqs = base**exponents
    return (1.0 / (yarn.factor * pos_freqs)) * (1 - extrapolation_weight) + (
        1.0 / pos_freqs
    ) * extrapolation_weight


class RotaryEmbedding(torch.nn.Module):
    """Builds cos/sin for given positions; caches inverse frequencies per NTK alpha."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.scale = config.rope_scaling.cos_sin_scale if config.rope_scaling else 1.0
        device = torch.get_default_device()  # a meta skeleton keeps the CPU copy; the loader replaces it
        freqs = inv_freq(config) if device.type == "meta" else inv_freq(config).to(device)
        self.register_buffer("inv_freq", freqs, persistent=False)
        self._alpha_cache: dict[float, torch.Tensor] = {}
        self._table: tuple[torch.Tensor, torch.Tensor] | None = None  # CPU: cos, sin of positions 0..n-1

    def _inv_freq_for(self, alpha: float) -> torch.Tensor:
        if alpha == 1.0:
            return self.inv_freq
        if alpha not in self._alpha_cache:
            self._alpha_cache[alpha] = inv_freq(self.config, alpha).to(self.inv_freq.device)
        return self._alpha_cache[alpha]

    def forward(
        self, positions: torch.Tensor, ntk_alphas: list[float] | torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions (B, T) int -> cos, sin (B, 1, T, rotary_dim) in float32.

        ntk_alphas: one alpha per row (a list of B), or per token (a (B, T) tensor, for a flat batch of
        several sequences).
        """
        if isinstance(ntk_alphas, list):
            ntk_alphas = torch.tensor(ntk_alphas, dtype=torch.float32)[:, None].expand(positions.shape)
        distinct = [] if ntk_alphas is None else sorted(set(ntk_alphas.flatten().tolist()) - {1.0})
        if not distinct and positions.device.type == "cpu" and positions.numel():
            cos, sin = self._table_for(int(positions.max()) + 1)
            shape = (*positions.shape, self.config.rotary_dim)  # (B, T, 2, rotary_dim/2) rows, contiguous
            return cos[positions].view(shape)[:, None], sin[positions].view(shape)[:, None]
        return self._cos_sin(positions, ntk_alphas, distinct)

    # Rows kept past the longest position seen: doubled up to here (64K rows of 64 halves: 32 MiB of cos
    # and sin), then grown in sixteenths of the next power of two, a table at most 1/8 past the position
    # (at 1,100,000 tokens it was 2^21 rows: 2 GiB at head size 128, now 1,179,648 rows of half as much).
    doubling_rows: ClassVar[int] = 1 << 16

    @classmethod
    def table_rows(cls, needed: int) -> int:
        """How many positions a table holding position ``needed - 1`` gets."""
        if needed <= cls.doubling_rows:
            return 1 << max(needed - 1, 1023).bit_length()
        step = 1 << ((needed - 1).bit_length() - 4)
        return -(-needed // step) * step

    def _table_for(self, needed: int) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin (n, 2, rotary_dim/2) of positions 0..n-1 (n from ``table_rows``), made once and
        extended by the new rows when a position passes n. A step then indexes rows instead of computing
        cos and sin: torch's run on OpenMP even for a 16-row decode step, whose worker then spun for
        milliseconds beside the kernels' workers. The values are what ``_cos_sin`` computes (the same
        elementwise ops; ``test_rope_table_equals_computed``).

        Each row's two halves are the same numbers (the frequencies are concatenated with themselves), so
        only one half is stored, (n, rotary_dim/2), and returned as a view repeating it: indexing that view
        is still one gather per table, into contiguous (.., 2, rotary_dim/2) rows."""
        table = self._table
        held = 0 if table is None else table[0].shape[0]
        if held < needed:
            positions = torch.arange(held, self.table_rows(needed), device=self.inv_freq.device)
            freqs = positions[:, None].float() * self.inv_freq  # (rows, rotary_dim/2), as _cos_sin
            cos, sin = freqs.cos(), freqs.sin()
            if self.scale != 1.0:
                cos, sin = cos * self.scale, sin * self.scale
            if table is not None:  # the rows held stay as they are; only the new ones are computed
                cos, sin = torch.cat((table[0][:, 0], cos)), torch.cat((table[1][:, 0], sin))
            rows, half = cos.shape
            table = self._table = (cos[:, None].expand(rows, 2, half), sin[:, None].expand(rows, 2, half))
        return table

    def _cos_sin(
        self, positions: torch.Tensor, ntk_alphas: torch.Tensor | None, distinct: list[float]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, rotary_dim/2)
        for alpha in distinct:
            where = (ntk_alphas == alpha).to(positions.device)
            freqs[where] = positions[where][:, None].float() * self._inv_freq_for(alpha)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, rotary_dim)
        cos, sin = emb.cos(), emb.sin()
        if self.scale != 1.0:
            cos, sin = cos * self.scale, sin * self.scale
        return cos, sin


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_fp32: bool) -> torch.Tensor:
    """Rotate the first rotary_dim features of x (B, heads, T, head_dim).

    Qwen v1 rotates float32 copies of q/k; transformers' Qwen2/3/Llama cast cos/sin to the activation
    dtype instead. Both are reproduced so parity holds in bfloat16 too.
    """
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    if in_fp32:
        xf = x_rot.float()
        x_rot = (xf * cos + _rotate_half(xf) * sin).type_as(x)
    else:
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        x_rot = x_rot * cos + _rotate_half(x_rot) * sin
    return x_rot if x_pass.shape[-1] == 0 else torch.cat((x_rot, x_pass), dim=-1)


def apply_rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, in_fp32: bool) -> torch.Tensor:
    """:func:`apply_rope` for x laid out (B, T, heads, D): in place in one kernel call where qwenkit's CPU
    kernels run it (bf16 on the CPU; the same rounding), else into a new tensor. Returns the rotated x.

    The kernel serves prompts too: on the Xeon a 512-token chunk of 16 heads of 64 took 94 us against
    torch's chain of ops' 342 us (float32 cos/sin, Qwen v1: 0.64 against 4.0 ms at heads of 128)."""
    if (
        x.dtype == torch.bfloat16
        and x.device.type == "cpu"
        and x.stride(-1) == 1
        and not (x.requires_grad and torch.is_grad_enabled())  # the kernel has no backward
        and kernels.available()
    ):
        if not in_fp32:
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        kernels.rope_(x, cos[:, 0], sin[:, 0])
        return x
    return apply_rope(x.transpose(1, 2), cos, sin, in_fp32).transpose(1, 2)


def logn_scale(positions: torch.Tensor, trained_length: int) -> torch.Tensor:
    """Qwen v1 LogN attention: query at position p is scaled by max(1, ln(p+1) / ln(trained_length))."""
    p1 = (positions + 1).double()
    scale = torch.where(p1 > trained_length, torch.log(p1) / math.log(trained_length), torch.ones_like(p1))
    return scale.float()[:, None, :, None]  # (B, 1, T, 1)
