"""The AutoGPTQ on-disk layout: the quantization config, and packing integer weights to and from it.

One in-memory form is shared by every part of ``quant/``: :class:`IntWeight`, plain integer codes with
per-group scales and true zero points. This module converts it to and from the tensors AutoGPTQ writes
(``qweight``, ``qzeros``, ``scales``, ``g_idx``), following the packing rules of qwen_facts §9.5/§9.6:

* ``qweight`` int32 ``[in * bits / 32, out]``: input row ``p*r + j`` sits in bits ``[bits*j, bits*j + bits)``
  of word row ``r`` (low bits first), ``p = 32 / bits``.
* ``qzeros`` int32 ``[G, out * bits / 32]``: packed along the *output* dim the same way. The old "gptq"
  format stores ``zero - 1`` at every code (one subtraction per word, as GPTQModel writes it: a zero of 0
  borrows from the next code); "gptq_v2" stores the zero itself.
* ``scales`` float16 ``[G, out]``; ``g_idx`` int32 ``[in]``, the group of each input column.

The weight is ``W[o, i] = scales[g_idx[i], o] * (q[i, o] - zero[g_idx[i], o])``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from qwenkit.errors import QwenkitError

CheckpointFormat = Literal["gptq", "gptq_v2"]
SUPPORTED_BITS = (4, 8)
# How GPTQ orders columns: "none" in file order; "static" by decreasing activation size with every group
# fixed in file order (g_idx monotone, stored as desc_act false); "dynamic" by activation size with groups
# formed in that order (g_idx permuted, stored as desc_act true, which vLLM refuses).
ActOrder = Literal["none", "static", "dynamic"]
ACT_ORDERS: tuple[ActOrder, ...] = ("none", "static", "dynamic")


class QuantizationError(QwenkitError, ValueError):
    """A quantization config or quantized tensor qwenkit cannot use; the message says which and why."""


# ---- config ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GPTQConfig:
    """The fields of ``quantize_config.json`` (and ``config.json``'s ``quantization_config``) we act on.

    ``group_size=-1`` means one group per output channel (the whole input row). ``act_order`` is how
    GPTQ visits columns (:data:`ActOrder`); on disk it is AutoGPTQ's ``desc_act``/``static_groups`` pair
    plus ``meta.act_order`` (desc_act alone cannot tell "static" from "none").
    """

    bits: int = 4
    group_size: int = 128
    act_order: ActOrder = "none"
    sym: bool = True
    damp_percent: float = 0.01
    true_sequential: bool = True
    checkpoint_format: CheckpointFormat = "gptq"
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.bits not in SUPPORTED_BITS:
            raise QuantizationError(f"GPTQ bits={self.bits} is not supported; qwenkit runs 4 or 8 bits")
        if self.group_size != -1 and self.group_size <= 0:
            raise QuantizationError(f"GPTQ group_size={self.group_size} must be -1 (per channel) or positive")
        if self.checkpoint_format not in ("gptq", "gptq_v2"):
            raise QuantizationError(
                f"GPTQ checkpoint_format={self.checkpoint_format!r} is not supported; "
                "qwenkit reads 'gptq' (AutoGPTQ) and 'gptq_v2' (GPTQModel)"
            )
        if not 0 < self.damp_percent < 1:
            raise QuantizationError(f"GPTQ damp_percent={self.damp_percent} must be in (0, 1)")
        if self.act_order not in ACT_ORDERS:
            raise QuantizationError(
                f"act_order={self.act_order!r} is not supported; choose {', '.join(ACT_ORDERS)}"
            )

    @property
    def desc_act(self) -> bool:
        """AutoGPTQ's flag for a permuted ``g_idx``: true only for dynamic act-order."""
        return self.act_order == "dynamic"

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTQConfig:
        """Read a quantize_config.json / quantization_config dict; reject anything we would misread."""
        method = d.get("quant_method", "gptq")
        if method != "gptq":
            raise QuantizationError(
                f"quant_method {method!r} is not supported; qwenkit reads GPTQ checkpoints"
            )
        if _flag(d, "lm_head", False):
            raise QuantizationError("GPTQ checkpoints with a quantized lm_head are not supported")
        if d.get("bits") is None:
            raise QuantizationError("GPTQ quantization config has no 'bits'")
        pack = d.get("pack_dtype")  # GPTQModel's word type; else a shape error named the config's sizes
        if pack is not None and str(pack).lower().removeprefix("torch.") != "int32":
            raise QuantizationError(
                f"GPTQ pack_dtype={pack!r} is not supported; qwenkit reads int32 words (GPTQModel's default)"
            )
        # GPTQModel writes its name for it, "format", beside "checkpoint_format" (its reader takes either)
        fmt = d.get("checkpoint_format") or d.get("format") or "gptq"
        meta = d.get("meta") if isinstance(d.get("meta"), dict) else {}
        if _flag(d, "desc_act", False):
            act_order: ActOrder = "dynamic"
        elif _flag(d, "static_groups", False) and meta.get("act_order") == "static":
            act_order = "static"
        else:
            act_order = "none"  # g_idx is monotone; how the columns were visited does not matter to a reader
        known = {f for f in cls.__dataclass_fields__ if f != "extra"} | {
            "desc_act",
            "static_groups",
            "format",
        }
        _check_per_layer(d)
        return cls(
            bits=_number(d, "bits", int, 4),
            group_size=_number(d, "group_size", int, 128),
            act_order=act_order,
            sym=_flag(d, "sym", True),
            damp_percent=_number(d, "damp_percent", float, 0.01),
            true_sequential=_flag(d, "true_sequential", True),
            checkpoint_format=fmt,
            extra={k: v for k, v in d.items() if k not in known and k != "quant_method"},
        )

    @classmethod
    def from_model_dir(cls, path: str | Path) -> GPTQConfig:
        """``quantize_config.json`` if present, else ``config.json``'s ``quantization_config``."""
        p = Path(path)
        if (p / "quantize_config.json").is_file():
            return cls.from_dict(json.loads((p / "quantize_config.json").read_text()))
        cfg = json.loads((p / "config.json").read_text())
        if "quantization_config" not in cfg:
            raise QuantizationError(f"{p} has neither quantize_config.json nor a quantization_config")
        return cls.from_dict(cfg["quantization_config"])

    def to_dict(self) -> dict[str, Any]:
        """The quantize_config.json body AutoGPTQ, optimum, GPTQModel and vLLM read.

        Static act-order is stored as ``desc_act: false`` (``g_idx`` is monotone, so readers need no
        reordering) with AutoGPTQ's ``static_groups: true``; ``meta`` (GPTQModel's free-form field) names
        the tool and the column order used.
        """
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "damp_percent": self.damp_percent,
            "desc_act": self.desc_act,
            "static_groups": self.act_order == "static",
            "sym": self.sym,
            "true_sequential": self.true_sequential,
            "checkpoint_format": self.checkpoint_format,
            "model_name_or_path": None,
            "model_file_base_name": "model",
            "quant_method": "gptq",
            "meta": {"quantizer": [f"qwenkit:{_version()}"], "act_order": self.act_order},
        }

    def for_layer(self, name: str) -> GPTQConfig | None:
        """This layer's config (a layer inside a decoder block, by its Hugging Face name), or None where
        the checkpoint keeps it float.

        Two ways files say so: optimum's ``modules_in_block_to_quantize`` (lists of name suffixes; any
        other layer of a block is float) and GPTQModel's ``dynamic`` (regular expressions matched from the
        start of the name, first match wins, as GPTQModel and vLLM match them: ``-:pattern`` keeps the
        layer float, ``+:pattern`` or a bare pattern overrides bits, group_size, sym or desc_act for it).
        """
        modules = self.extra.get("modules_in_block_to_quantize")
        if modules and not any(name.endswith(suffix) for suffix in _flat(modules)):
            return None
        for pattern, override in (self.extra.get("dynamic") or {}).items():
            negative = pattern.startswith("-:")
            if re.match(pattern[2:] if pattern.startswith(("-:", "+:")) else pattern, name):
                return None if negative else self._overridden(override)
        return self

    def _overridden(self, override: dict[str, Any]) -> GPTQConfig:
        """This config with one ``dynamic`` entry's overrides applied (checked by ``_check_per_layer``).

        The keys are those the loaders honour per layer: GPTQModel's (``create_quant_module``) reads bits,
        group_size, desc_act, sym and pack_dtype (only int32 is read here, so ``_check_per_layer`` refuses
        any other); vLLM's (``gptq_utils.override_config``) reads bits, group_size, desc_act, and sym for
        its Marlin kernel. Both ignore every other key when loading (damp_percent, static_groups, mse...
        steer quantizing only), and so does this. ``sym`` changes no arithmetic here (zero points are read
        from ``qzeros`` either way); ``desc_act`` decides whether a missing ``g_idx`` may be rebuilt.
        """
        changes: dict[str, Any] = {
            k: _number(override, k, int, 0) for k in ("bits", "group_size") if override.get(k) is not None
        }
        if override.get("sym") is not None:
            changes["sym"] = _flag(override, "sym", self.sym)
        desc_act = override.get("desc_act")
        if desc_act is True:
            changes["act_order"] = "dynamic"
        elif desc_act is False and self.act_order == "dynamic":
            changes["act_order"] = "none"  # static act-order is stored as desc_act false too: kept
        return dataclasses.replace(self, **changes) if changes else self

    @property
    def per_layer(self) -> bool:
        """Whether some layers are float or quantized otherwise (``for_layer`` is not always ``self``)."""
        return bool(self.extra.get("modules_in_block_to_quantize") or self.extra.get("dynamic"))

    def num_groups(self, in_features: int) -> int:
        return 1 if self.group_size == -1 else math.ceil(in_features / self.group_size)


def _number(d: dict[str, Any], key: str, kind: type[int] | type[float], default: int | float) -> Any:
    """``d[key]`` as ``kind`` (missing or null: ``default``); a value that is no number is refused, naming
    it, where ``int()``/``float()`` raised a traceback."""
    value = d.get(key)
    if value is None:
        return default
    try:
        if isinstance(value, bool):
            raise ValueError
        number = kind(value)
    except (TypeError, ValueError):
        name = "an integer" if kind is int else "a number"
        raise QuantizationError(f"GPTQ {key}={value!r} must be {name}") from None
    if kind is int and number != float(value):  # 4.5 bits, not 4
        raise QuantizationError(f"GPTQ {key}={value!r} must be an integer")
    return number


def _flag(d: dict[str, Any], key: str, default: bool) -> bool:
    """``d[key]`` as a boolean (missing or null: ``default``); a string such as ``"false"`` was truthy,
    so it is refused, naming the field."""
    value = d.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise QuantizationError(f"GPTQ {key}={value!r} must be true or false (a JSON boolean)")
    return value


def _flat(modules: list) -> list[str]:
    """optimum's ``[["self_attn.q_proj", ...], ["mlp.down_proj"]]`` (or a flat list) -> the suffixes."""
    return [m for group in modules for m in ([group] if isinstance(group, str) else group)]


def _check_per_layer(d: dict[str, Any]) -> None:
    """Refuse a ``modules_in_block_to_quantize`` or ``dynamic`` entry that :meth:`GPTQConfig.for_layer`
    would misread, naming it."""
    modules = d.get("modules_in_block_to_quantize")
    if modules is not None and not (
        isinstance(modules, list)
        and all(
            isinstance(m, str) or (isinstance(m, list) and all(isinstance(x, str) for x in m))
            for m in modules
        )
    ):
        raise QuantizationError(
            f"GPTQ modules_in_block_to_quantize={modules!r} is not a list of module-name lists"
        )
    dynamic = d.get("dynamic")
    if dynamic is None:
        return
    if not isinstance(dynamic, dict):
        raise QuantizationError(f"GPTQ dynamic={dynamic!r} is not a mapping of name patterns to overrides")
    for pattern, override in dynamic.items():
        raw = pattern[2:] if pattern.startswith(("-:", "+:")) else pattern
        try:
            re.compile(raw)
        except re.error as e:
            raise QuantizationError(
                f"GPTQ dynamic pattern {pattern!r} is not a regular expression: {e}"
            ) from None
        if not isinstance(override, dict):
            raise QuantizationError(f"GPTQ dynamic[{pattern!r}] is {override!r}, not a mapping of overrides")
        try:
            GPTQConfig(
                bits=_number(override, "bits", int, _number(d, "bits", int, 4)),
                group_size=_number(override, "group_size", int, _number(d, "group_size", int, 128)),
                sym=_flag(override, "sym", True),
                act_order="dynamic" if _flag(override, "desc_act", False) else "none",
            )
            pack = override.get("pack_dtype")
            if pack is not None and str(pack).lower().removeprefix("torch.") != "int32":
                raise QuantizationError(
                    f"pack_dtype={pack!r} is not supported; qwenkit reads int32 words (GPTQModel's default)"
                )
        except QuantizationError as e:
            raise QuantizationError(f"GPTQ dynamic[{pattern!r}]: {e}") from None


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qwenkit")
    except PackageNotFoundError:
        return "unknown"


# ---- the shared integer form --------------------------------------------------------------------------


@dataclass
class IntWeight:
    """A weight-only quantized matrix: ``W[o, i] = scales[g[i], o] * (qweight[o, i] - zeros[g[i], o])``.

    qweight: (out, in) uint8 codes in 0..2**bits-1, in the checkpoint's column order.
    scales: (G, out) float. zeros: (G, out) int16 true zero points (no AutoGPTQ -1 offset).
    g_idx: (in,) int32 group of each input column (not monotone for act-order checkpoints).
    """

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int

    @property
    def out_features(self) -> int:
        return self.qweight.shape[0]

    @property
    def in_features(self) -> int:
        return self.qweight.shape[1]

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """(out, in) float weight, computed in float32 (exact for float16 scales and 8-bit codes)."""
        g = self.g_idx.long()
        s = self.scales.float()[g].T  # (out, in)
        z = self.zeros.float()[g].T
        return ((self.qweight.float() - z) * s).to(dtype)


def default_g_idx(in_features: int, group_size: int) -> torch.Tensor:
    """AutoGPTQ's g_idx without act-order: column i belongs to group i // group_size."""
    gs = in_features if group_size == -1 else group_size
    return (torch.arange(in_features) // gs).to(torch.int32)


# ---- packing ------------------------------------------------------------------------------------------


def _per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"bits={bits} is not supported; qwenkit packs 4 or 8 bits")
    return 32 // bits


def _pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """(R, C) ints in 0..2**bits-1 -> (R / per_word, C) int32; row ``p*r + j`` lands in bits ``bits*j``."""
    p = _per_word(bits)
    if values.shape[0] % p:
        raise QuantizationError(f"cannot pack {values.shape[0]} rows at {bits} bits: not a multiple of {p}")
    v = values.to(torch.int64).reshape(-1, p, values.shape[1])  # (R/p, p, C)
    shifts = (torch.arange(p, dtype=torch.int64) * bits).view(1, p, 1)
    words = (v << shifts).sum(1)  # (R/p, C), each < 2**32
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def _unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of :func:`_pack_rows`: (R, C) int32 -> (R * per_word, C) int16."""
    p = _per_word(bits)
    w = words.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(p, dtype=torch.int64) * bits).view(1, p, 1)
    vals = (w.unsqueeze(1) >> shifts) & (2**bits - 1)  # (R, p, C)
    return vals.reshape(-1, words.shape[1]).to(torch.int16)


UNPACK_BLOCK_ELEMENTS = 1 << 23  # weights unpacked per step: each byte temporary stays ~8 MiB


def _unpack_codes(qweight: torch.Tensor, bits: int) -> torch.Tensor:
    """(in / per_word, out) int32 words -> (out, in) uint8 codes, a block of output columns at a time.

    Each word's bytes, least significant first, hold its codes in order (two nibbles a byte at 4 bits,
    the low one first), so the words are read as bytes and the nibbles split with byte-wide ops: through
    :func:`_unpack_rows`' int64 shifts (8 bytes a weight, several passes) a Qwen2.5-0.5B-shape int4
    checkpoint took 4.4 s to unpack, now 0.4 s. On a big-endian machine, that way instead.
    """
    rows, cols = qweight.shape
    n_in = rows * _per_word(bits)
    out = torch.empty(cols, n_in, dtype=torch.uint8, device=qweight.device)
    step = max(1, UNPACK_BLOCK_ELEMENTS // max(1, n_in))
    for c in range(0, cols, step):
        words = qweight[:, c : c + step]
        if sys.byteorder != "little":
            out[c : c + step] = _unpack_rows(words, bits).T
            continue
        width = words.shape[1]
        data = words.T.contiguous().view(torch.uint8).view(width, rows, 4)  # (out, in / per_word, 4)
        if bits == 8:
            out[c : c + step] = data.view(width, n_in)
        else:
            view = out[c : c + step].view(width, rows, 4, 2)
            torch.bitwise_and(data, 0x0F, out=view[..., 0])
            torch.bitwise_right_shift(data, 4, out=view[..., 1])
    return out


def _offset_words(qzeros: torch.Tensor, bits: int, sign: int) -> torch.Tensor:
    """The "gptq" format's zero offset: add (``sign=+1``, reading) or subtract (writing) one at every code
    of each int32 word, as one 32-bit integer, as GPTQModel converts v1 to v2 and back (its
    ``convert_gptq_v1_to_v2_format_module``). A zero point of 0 then borrows from the next code of its
    word and reads back exactly; per-code masking (AutoGPTQ's reader) agrees wherever every zero is at
    least 1, e.g. every symmetric checkpoint, and otherwise disagreed with transformers + GPTQModel.
    """
    ones = sum(1 << (bits * j) for j in range(_per_word(bits)))  # 0x11111111 at 4 bits, 0x01010101 at 8
    words = (qzeros.to(torch.int64) + sign * ones) & 0xFFFFFFFF
    return torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)


def pack_gptq(w: IntWeight, checkpoint_format: CheckpointFormat = "gptq") -> dict[str, torch.Tensor]:
    """IntWeight -> ``{"qweight", "qzeros", "scales", "g_idx"}`` as AutoGPTQ's ``pack()`` writes them."""
    maxq = 2**w.bits - 1
    if w.qweight.min() < 0 or w.qweight.max() > maxq:
        raise QuantizationError(f"integer weights must lie in 0..{maxq} for {w.bits} bits")
    qweight = _pack_rows(w.qweight.T, w.bits)  # (in / p, out)
    qzeros = _pack_rows(w.zeros.to(torch.int64).T, w.bits).T.contiguous()  # (G, out / p)
    if checkpoint_format == "gptq":
        qzeros = _offset_words(qzeros, w.bits, -1)
    return {
        "qweight": qweight.contiguous(),
        "qzeros": qzeros,
        "scales": w.scales.to(torch.float16).contiguous(),
        "g_idx": w.g_idx.to(torch.int32).contiguous(),
    }


def unpack_gptq(
    qweight: torch.Tensor,
    qzeros: torch.Tensor,
    scales: torch.Tensor,
    g_idx: torch.Tensor | None,
    bits: int,
    checkpoint_format: CheckpointFormat = "gptq",
    group_size: int | None = None,
) -> IntWeight:
    """AutoGPTQ tensors -> IntWeight, checking every shape against the others.

    ``g_idx`` may be None (some exporters omit it without act-order); ``group_size`` then rebuilds it.
    """
    p = _per_word(bits)
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32:
        raise QuantizationError(f"qweight/qzeros must be int32, got {qweight.dtype}/{qzeros.dtype}")
    in_features, out_features = qweight.shape[0] * p, qweight.shape[1]
    if scales.dim() != 2 or scales.shape[1] != out_features:
        raise QuantizationError(
            f"scales shape {tuple(scales.shape)} does not match qweight {tuple(qweight.shape)}: "
            f"expected (G, {out_features})"
        )
    n_groups = scales.shape[0]
    if tuple(qzeros.shape) != (n_groups, out_features // p) or out_features % p:
        raise QuantizationError(
            f"qzeros shape {tuple(qzeros.shape)} does not match scales {tuple(scales.shape)} at {bits} bits: "
            f"expected ({n_groups}, {out_features // p})"
        )
    if g_idx is None:
        if group_size is None:
            raise QuantizationError("g_idx is missing and no group_size was given to rebuild it")
        g_idx = default_g_idx(in_features, group_size)
    if tuple(g_idx.shape) != (in_features,):
        raise QuantizationError(
            f"g_idx shape {tuple(g_idx.shape)} does not match qweight {tuple(qweight.shape)}: "
            f"expected ({in_features},)"
        )
    if g_idx.numel() and (g_idx.min() < 0 or g_idx.max() >= n_groups):
        raise QuantizationError(f"g_idx values must lie in 0..{n_groups - 1} (scales has {n_groups} groups)")
    if checkpoint_format == "gptq":
        qzeros = _offset_words(qzeros, bits, +1)
    zeros = _unpack_rows(qzeros.T.contiguous(), bits).T  # (G, out)
    return IntWeight(
        qweight=_unpack_codes(qweight, bits),  # (out, in)
        scales=scales,
        zeros=zeros.to(torch.int16).contiguous(),
        g_idx=g_idx.to(torch.int32),
        bits=bits,
    )


def gptq_shapes(
    in_features: int, out_features: int, config: GPTQConfig
) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """The shape and dtype of every tensor a GPTQ Linear stores (without bias); rejects odd sizes."""
    p = 32 // config.bits
    if in_features % p or out_features % p:
        raise QuantizationError(
            f"a {in_features}->{out_features} Linear cannot be packed at {config.bits} bits: "
            f"both sizes must be multiples of {p}"
        )
    g = config.num_groups(in_features)
    return {
        "qweight": ((in_features // p, out_features), torch.int32),
        "qzeros": ((g, out_features // p), torch.int32),
        "scales": ((g, out_features), torch.float16),
        "g_idx": ((in_features,), torch.int32),
    }
