"""Text embeddings from a decoder model (Qwen3-Embedding, any causal decoder): the final-norm hidden
state of a text's last token, L2-normalized, computed by the engine as a prefill-only request (``embed``).

A sentence-transformers checkpoint says how to pool in its own files: ``modules.json`` (which modules
follow the transformer: Pooling, Normalize), ``1_Pooling/config.json`` (``pooling_mode_lasttoken``) and
``config_sentence_transformers.json`` (named prompts, as "query"). A decoder model without them pools its
last token and normalizes it, as vLLM does for decoder models.
"""

from __future__ import annotations

import asyncio
import json
import numbers
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.errors import ConfigError, GenerationError

if TYPE_CHECKING:
    from qwenkit.engine.driver import RequestStream
    from qwenkit.generate import LLM

EMBED = SamplingParams(max_tokens=0, embed=True)
_ST = "sentence_transformers.models."
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens")


@dataclass(frozen=True)
class EmbeddingSetup:
    """How a checkpoint's embeddings are made: normalized or not, and its named prompts."""

    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)


def read_setup(directory: str | Path | None) -> EmbeddingSetup:
    """The sentence-transformers files of a checkpoint directory; the defaults where it has none. A
    pooling or module other than last-token pooling and Normalize is refused by name (ConfigError):
    its embeddings would be other numbers than the model's card promises."""
    root = Path(directory) if directory is not None else None
    if root is None or not root.is_dir():
        return EmbeddingSetup()
    config = _json(root / "config.json") if (root / "config.json").is_file() else None
    if isinstance(config, dict) and config.get("is_causal") is False:  # qwenkit's attention is causal
        raise ConfigError(
            f"{root / 'config.json'}: is_causal false asks for bidirectional attention, which qwenkit "
            "does not run: its embeddings would not be this model's"
        )
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    custom = auto_map.get("AutoModel") if isinstance(auto_map, dict) else None
    if custom:  # gte-Qwen2: bidirectional attention in its own code, which its config does not say
        raise ConfigError(
            f"{root / 'config.json'}: its embeddings come from the model's own code (auto_map AutoModel "
            f"{custom!r}), which qwenkit does not run: they would not be this model's"
        )
    if not (root / "modules.json").is_file():
        return EmbeddingSetup()
    modules = _json(root / "modules.json")
    if not isinstance(modules, list) or not all(isinstance(m, dict) for m in modules):
        raise ConfigError(f"{root / 'modules.json'}: expected a list of modules")
    normalize = False
    for module in modules:
        kind = str(module.get("type", ""))
        if kind == _ST + "Transformer":
            continue
        if kind == _ST + "Normalize":
            normalize = True
        elif kind == _ST + "Pooling":
            _check_pooling(root / str(module.get("path", "")) / "config.json")
        else:
            raise ConfigError(
                f"{root / 'modules.json'}: module {kind or module!r} is not supported for embeddings "
                "(last-token Pooling and Normalize are)"
            )
    extra = root / "config_sentence_transformers.json"
    prompts = _json(extra).get("prompts") if extra.is_file() else None
    prompts = {str(k): str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}
    return EmbeddingSetup(normalize=normalize, prompts=prompts)


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None


def _check_pooling(path: Path) -> None:
    config = _json(path) if path.is_file() else None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: missing or not a JSON object")
    other = [m for m in _POOLING_MODES if config.get(f"pooling_mode_{m}")]
    if other or not config.get("pooling_mode_lasttoken"):
        named = ", ".join(other) or "none"
        raise ConfigError(
            f"{path}: pooling {named} is not supported; qwenkit pools the last token "
            "(pooling_mode_lasttoken), as decoder embedding models do"
        )


def finish(hidden: torch.Tensor, normalize: bool, dimensions: int | None) -> list[float]:
    """One hidden state as the embedding: its first ``dimensions`` (Matryoshka), then L2-normalized."""
    if dimensions is not None:
        hidden = hidden[:dimensions]
    if normalize:
        hidden = torch.nn.functional.normalize(hidden.float(), dim=0)
    return hidden.tolist()


def check_dimensions(dimensions: object, hidden_size: int) -> None:
    if dimensions is None:
        return
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= hidden_size:
        raise SamplingParamsError(
            f"dimensions must be an integer in [1, {hidden_size}] (the hidden size), got {dimensions!r}"
        )


def check_inputs(inputs: object) -> list[str | list[int]]:
    """OpenAI's ``input``: a string, a list of strings, a list of token ids, or a list of such lists;
    as a list of single inputs. SamplingParamsError names what is wrong."""
    if isinstance(inputs, str):
        inputs = [inputs]
    elif isinstance(inputs, list | tuple) and inputs and all(_is_id(t) for t in inputs):
        inputs = [list(inputs)]
    if not isinstance(inputs, list | tuple) or not inputs:
        raise SamplingParamsError(
            "input must be a non-empty string, list of strings, list of token ids, or list of such lists"
        )
    out: list[str | list[int]] = []
    for i, one in enumerate(inputs):
        if isinstance(one, str):
            if not one:
                raise SamplingParamsError(f"input[{i}] is an empty string")
            out.append(one)
        elif isinstance(one, list | tuple) and one and all(_is_id(t) for t in one):
            out.append([int(t) for t in one])
        else:
            raise SamplingParamsError(
                f"input[{i}] must be a non-empty string or a non-empty list of token ids, got {one!r:.60}"
            )
    return out


def _is_id(value: object) -> bool:
    """An integer (numpy's too, as ``generate`` takes them), never a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def prompt_ids(
    llm: LLM, inputs: Sequence[str | list[int]], prefix: str = "", adapter: str | None = None
) -> list[list[int]]:
    """Each input's ids, checked by the engine (vocabulary, context, ``adapter`` served) before any
    runs: text as transformers' ``tokenizer(prefix + text)`` makes it (the tokenizer's post-processor
    adds its tokens: Qwen3-Embedding's ``<|endoftext|>``), ids as given."""
    encoded = [llm.encode(prefix + one) if isinstance(one, str) else list(one) for one in inputs]
    if adapter is not None:  # first: a name not served is no input's fault
        llm.engine.validate([0], replace(EMBED, adapter=adapter))
    for i, ids in enumerate(encoded):
        try:
            llm.engine.validate(ids, EMBED)
        except SamplingParamsError as exc:
            raise SamplingParamsError(f"input[{i}]: {exc}" if len(encoded) > 1 else str(exc)) from None
    return encoded


def _hidden(outputs: list) -> torch.Tensor:
    last = outputs[-1]
    if last.embedding is None:
        raise GenerationError(last.error or f"the embedding request ended without one ({last.finish_reason})")
    return last.embedding


def run(llm: LLM, ids: list[list[int]], adapter: str | None = None) -> list[torch.Tensor]:
    """The hidden states of ``ids``, batched by the engine beside whatever else runs; through served
    adapter ``adapter`` where given."""
    params = replace(EMBED, adapter=adapter)
    with llm.driver.together():  # queued as one batch
        streams = [llm.driver.submit(one, params) for one in ids]
    try:
        return [_hidden(list(stream)) for stream in streams]
    finally:
        for stream in streams:
            stream.abort()


@dataclass(frozen=True)
class Embedded:
    """One input's hidden state, and how long it waited for its first step (the server's metrics)."""

    hidden: torch.Tensor
    queued: float | None  # seconds from submission to its first step (None: it never had one)


async def run_async(
    llm: LLM, ids: list[list[int]], adapter: str | None = None, name: str | None = None
) -> list[Embedded]:
    """``run`` from an event loop, which stays free while the engine computes; through served adapter
    ``adapter`` where given. ``name``: the requests' id in the engine's log (a server's request id)."""
    loop = asyncio.get_running_loop()
    params = replace(EMBED, adapter=adapter)
    submitted = time.perf_counter()
    with llm.driver.together():
        streams = [llm.driver.submit(one, params, loop=loop, name=name) for one in ids]

    async def read(stream: RequestStream) -> Embedded:
        outputs = [out async for out in stream]
        first = next((o.scheduled_at for o in outputs if o.scheduled_at is not None), None)
        return Embedded(_hidden(outputs), None if first is None else max(first - submitted, 0.0))

    try:
        return list(await asyncio.gather(*(read(s) for s in streams)))
    finally:
        for stream in streams:
            stream.abort()
