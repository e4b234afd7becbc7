"""Checkpoints saved from the bare decoder (transformers' ``Qwen3Model``, not ``Qwen3ForCausalLM``), as
sentence-transformers embedding models ship them (Qwen3-Embedding): ``embed_tokens.weight``,
``layers.N.*`` and ``norm.weight`` without the ``model.`` prefix, and no ``lm_head.weight``.

The names are taken by name (the three roots only); a missing head is not made up: where config.json
leaves it untied (Qwen3-Embedding-8B), the model gets a ``MissingHead`` and computes embeddings only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from torch import nn

from qwenkit.checkpoint.files import tensor_names
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.model.score_head import RANK_ONLY
from qwenkit.model.transformer import MissingHead

_BARE_ROOT = re.compile(r"^(embed_tokens|layers|norm)\.")


def prefixed(name: str) -> str:
    """A bare decoder's tensor name as ours (``layers.0.x`` -> ``model.layers.0.x``); others as given."""
    return "model." + name if _BARE_ROOT.match(name) else name


class BareNames:
    """Wraps a checkpoint's (name, tensor) stream: bare-decoder names get ``model.``; ``seen`` says
    whether any came that way."""

    def __init__(self, tensors: Iterable[tuple[str, Any]]) -> None:
        self._tensors = tensors
        self.seen = False

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for name, tensor in self._tensors:
            ours = prefixed(name)
            self.seen = self.seen or ours != name
            yield ours, tensor


def without_head(model: nn.Module, missing: list[str], names: BareNames, source: object) -> list[str]:
    """``missing`` less the output head where a bare decoder's checkpoint has none, or a
    sentence-transformers model's (``modules.json`` beside it: one qwenkit quantized or converted keeps
    it, its names now ours); the model's head is then a ``MissingHead``. So is an embedding model's GGUF
    with no ``output.weight`` (``GGUFCheckpoint.headless``), whose config ties the head as llama.cpp
    would: the file cannot tell a tied head from none, and a made-up one would write nonsense."""
    path = getattr(source, "path", None)
    embedder = isinstance(path, str | Path) and (Path(path) / "modules.json").is_file()
    if (names.seen or embedder) and "lm_head.weight" in missing:
        model.lm_head = MissingHead()
        return [n for n in missing if n != "lm_head.weight"]
    if getattr(source, "headless", False):  # the loader then leaves it untied
        model.lm_head = MissingHead()
    return missing


def lacks_head(source: object, config: ModelConfig) -> bool:
    """Whether a checkpoint directory has no output head to load: untied, and no ``lm_head.weight``
    among its tensor names (read without a tensor). Its memory estimate leaves the head out: vocab x
    hidden, 1.2 GB of Qwen3-Embedding-8B's bfloat16 weights."""
    if config.tie_word_embeddings or not hasattr(type(source), "weights"):  # a GGUF file's head is its own
        return False
    try:
        return "lm_head.weight" not in tensor_names(source.weights)  # type: ignore[attr-defined]
    except CheckpointError:  # no weight files (`info` of a config alone): none is known to be missing
        return False


def embeds_only(source: object, config: ModelConfig) -> bool:
    """Whether the checkpoint loads as a model that computes embeddings only (``without_head``'s
    condition, from its file names alone, before a weight is read): no output head, and the bare
    decoder's names or a sentence-transformers ``modules.json``."""
    if not lacks_head(source, config):
        return False
    if (Path(getattr(source, "path", "")) / "modules.json").is_file():
        return True
    return any(_BARE_ROOT.match(name) for name in tensor_names(source.weights))  # type: ignore[attr-defined]


def refuse_embeddings_only(path: str | Path, advice: str) -> None:
    """ConfigError, before the weights load, for a checkpoint that computes embeddings only
    (``embeds_only``, or a GGUF's ``headless``) or reranks only (a reranker's GGUF): a command that
    runs its text (chat, generate, profile, eval, fine-tuning) has nothing to run, and failed at its
    first logits with a traceback. ``advice``: what to do instead."""
    from qwenkit.checkpoint.loader import open_checkpoint  # (the loader imports this module)

    source = open_checkpoint(path)
    if getattr(source, "rank_token_ids", None):  # a reranker's GGUF: its rows of "yes" and "no" alone
        raise ConfigError(f"{path}: {RANK_ONLY}; serve it (`qwenkit serve`) and ask POST /v1/rerank")
    # an embedding GGUF without output.weight (``GGUFCheckpoint.headless``) loads headless too
    if getattr(source, "headless", False) or embeds_only(source, ModelConfig.from_hf(source.hf_config)):
        raise ConfigError(
            f"{path} has no output head (an embedding model's bare decoder): it computes embeddings only, "
            f"not text; {advice}"
        )
