"""Type checks for ``LLM.load``'s and ``LLM.load_adapter``'s arguments, before anything is read: a wrong
type used to fail deep inside (pathlib, ``dict()``, a comparison after the weights had loaded) or, for a
flag such as ``prefix_caching="no"``, to be taken as true."""

from __future__ import annotations

import numbers
import os
import re
from collections.abc import Mapping

import torch

from qwenkit.errors import ConfigError


def _is_path(value: object) -> bool:
    return isinstance(value, str | os.PathLike)


def check_load_args(
    path: object,
    sizes: dict[str, object],
    flags: dict[str, object],
    adapter: object,
    adapters: object,
) -> None:
    """ConfigError naming the first argument of the wrong type. ``sizes``: integers or None; ``flags``:
    bools (``cuda_graphs`` may also be None, its "auto")."""
    if not _is_path(path):
        raise ConfigError(f"path must be a model directory or a .gguf file (a str or Path), got {path!r:.60}")
    for name, value in sizes.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Integral)):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
    for name, value in flags.items():
        if name == "cuda_graphs" and value is None:
            continue
        if not isinstance(value, bool):
            choices = "True, False or None" if name == "cuda_graphs" else "True or False"
            raise ConfigError(f"{name} must be {choices}, got {value!r:.60}")
    if adapter is not None and not _is_path(adapter):
        raise ConfigError(
            f"adapter must be a path to a LoRA adapter (a str or Path) or None, got {adapter!r:.60}"
        )
    if adapters is not None and not (
        isinstance(adapters, Mapping)
        and all(_is_path(v) for v in adapters.values())  # names: AdapterNameError where served
    ):
        raise ConfigError(f"adapters must map names to adapter paths, got {adapters!r:.60}")


def check_adapter_path(path: object) -> None:
    """ConfigError for an adapter path that is not a str or Path (None failed in pathlib). The name is
    checked where adapters are served (``AdapterNameError``)."""
    if not _is_path(path):
        raise ConfigError(f"adapter path must be a str or Path, got {path!r:.60}")


def checked_device(device: object) -> str:
    """``device``'s name ("cpu", "cuda:0"); a ``torch.device`` as torch code passes it (it was refused as
    an unknown device, ``device(type='cpu')``, though it named cpu). ConfigError for any other device
    or a CUDA one on a machine without."""
    device = str(device) if isinstance(device, torch.device) else device
    if not isinstance(device, str) or not re.fullmatch(r"cpu|cuda(:\d+)?", device):  # torch's own error
        raise ConfigError(f"unknown device {device!r}; choose cpu or cuda (cuda:N)")  # lists 20 types
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for, but no CUDA device is available")
    return device
