"""One group size that tiles every quantized layer, so the checkpoint loads in every GPTQ reader.

A group size that does not divide a layer's input width leaves a short last group (576 columns at 128:
four groups of 128 and one of 64). qwenkit and AutoGPTQ's reference dequantizer take that, but vLLM
allocates ``width // group_size`` groups and fails on the weight shape, and GPTQModel's CPU int4 kernel
refuses the layer. So when ``--group-size`` does not tile a layer, :func:`choose_group_size` falls back to
the largest of :data:`READER_GROUP_SIZES` (below the requested size) that tiles every layer, and says
which layers forced it.

Why one size for the whole model and not one per layer: GPTQModel and vLLM read per-layer overrides
(GPTQModel's ``dynamic`` key in ``quantize_config.json``), but transformers + optimum read a single
``group_size`` and would build every layer with it. A smaller group only costs a little memory
(one float16 scale and one zero per group) and never quality.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from qwenkit.quant.gptq_format import QuantizationError

# Group sizes every GPTQ reader's int4 kernels take: vLLM's Marlin (-1, 32, 64, 128) and GPTQModel's
# CPU kernel (16, 32, 64, 128). Largest first.
READER_GROUP_SIZES = (128, 64, 32)
TORCH_INT4_GROUPS = (32, 64, 128, 256)  # torch's CPU int4 matmul, which GPTQModel's CPU kernel calls
GPTQMODEL_GROUPS = (16, 32, 64, 128, 256, 512, 1024)  # GPTQModel's TorchLinear (transformers on CPU)
PARTIAL_GROUP_READERS = "vLLM (weight shape) and GPTQModel's CPU int4 kernel (K not divisible by group)"


@dataclass(frozen=True)
class GroupChoice:
    """The group size to use, the one asked for, and the layers (by input width) that forced a change."""

    group_size: int
    requested: int
    untiled: dict[int, list[str]] = field(default_factory=dict)  # width -> layer names
    partial: bool = False  # kept the requested size with short last groups (--partial-groups)

    def note(self) -> str | None:
        """One line for the user, or None when the requested size tiles every layer."""
        if not self.untiled:
            return None
        where = "; ".join(f"{_describe(names)} ({w} inputs)" for w, names in sorted(self.untiled.items()))
        if self.partial:
            return (
                f"group size {self.requested} leaves a short last group in {where}; "
                f"{PARTIAL_GROUP_READERS} refuse such checkpoints"
            )
        return (
            f"group size {self.requested} does not divide the input width of {where}; using "
            f"{self.group_size}, the largest size that tiles every quantized layer "
            f"(--partial-groups keeps {self.requested} with a short last group)"
        )


def choose_group_size(widths: Mapping[str, int], requested: int, partial_groups: bool = False) -> GroupChoice:
    """The group size for layers with these input ``widths`` (name -> in_features).

    ``requested`` is kept when it divides every width (-1, one group per row, always does). Otherwise the
    largest of :data:`READER_GROUP_SIZES` below it that divides every width is used; with
    ``partial_groups`` the requested size is kept and the note warns about the readers that refuse it.
    If no size fits, the error names the first layer that cannot be tiled and the sizes that would work.
    """
    if requested == -1:
        return GroupChoice(-1, -1)
    untiled: dict[int, list[str]] = {}
    for name, width in widths.items():
        if width % requested:
            untiled.setdefault(width, []).append(name)
    if not untiled:
        return GroupChoice(requested, requested)
    if partial_groups:
        return GroupChoice(requested, requested, untiled, partial=True)
    for size in READER_GROUP_SIZES:
        if size < requested and all(w % size == 0 for w in widths.values()):
            return GroupChoice(size, requested, untiled)
    width, names = min(untiled.items())
    common = math.gcd(*widths.values())
    fits = [d for d in range(min(common, requested), 1, -1) if common % d == 0][:4]
    sizes = ", ".join(str(d) for d in fits)
    smaller = ", ".join(str(s) for s in READER_GROUP_SIZES if s < requested)  # the ones tried above
    tried = f" and no smaller reader size ({smaller}) tiles every layer" if smaller else ""
    raise QuantizationError(
        f"--group-size {requested} does not tile {names[0]} ({width} inputs){tried}; use --group-size "
        f"{sizes + ' or ' if sizes else ''}-1 (one group per row), or --partial-groups"
    )


def per_row_int4_note(widths: Mapping[str, int]) -> str | None:
    """4-bit with one group per row: GPTQModel's CPU int4 kernel takes only groups of 32 to 256 columns."""
    wide = sorted({w for w in widths.values() if w not in TORCH_INT4_GROUPS})
    if not wide:
        return None
    sizes = ", ".join(map(str, TORCH_INT4_GROUPS))
    return (
        f"4-bit with --group-size -1 makes groups as wide as the rows ({', '.join(map(str, wide))}); "
        f"GPTQModel's CPU int4 kernel (transformers on CPU) takes only {sizes}"
    )


def reader_size_note(choice: GroupChoice) -> str | None:
    """A size that tiles every layer but is not one vLLM's kernels take (96, 256): the file loads in qwenkit
    and AutoGPTQ only, which the user would otherwise learn from the first reader that refuses it."""
    size = choice.group_size
    if size == -1 or size in READER_GROUP_SIZES or choice.partial:  # partial groups have their own note
        return None
    nor = ", nor GPTQModel's (transformers on CPU: 16 to 1024 in powers of 2)"
    return (
        f"group size {size} is not one vLLM's GPTQ kernels take (-1, 32, 64, 128)"
        f"{'' if size in GPTQMODEL_GROUPS else nor}; qwenkit and AutoGPTQ read it"
    )


def _describe(names: list[str]) -> str:
    """``self_attn.q_proj, mlp.up_proj in 30 layers`` rather than 60 full names."""
    kinds: dict[str, set[str]] = {}
    for name in names:
        _, sep, rest = name.partition("layers.")
        index, _, kind = rest.partition(".")
        kinds.setdefault(kind if sep else name, set()).add(index if sep else "")
    layers = set().union(*kinds.values())
    return f"{', '.join(kinds)} in {len(layers)} layers" if len(layers) > 1 else ", ".join(names)
