"""Text embeddings from a decoder model (Qwen3-Embedding, any causal decoder): the final-norm hidden
state of a text's last token, L2-normalized, computed by the engine as a prefill-only request (``embed``).

A sentence-transformers checkpoint says how to pool in its own files: ``modules.json`` (which modules
follow the transformer: Pooling, Normalize), ``1_Pooling/config.json`` (``pooling_mode_lasttoken``) and
``config_sentence_transformers.json`` (named prompts, as "query"). A decoder model without them pools its
last token and normalizes it, as vLLM does for decoder models.
"""

from __future__ import annotations

import json
import numbers
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from qwenkit import prompt_only
from qwenkit.engine import PromptTooLongError, SamplingParams, SamplingParamsError
from qwenkit.errors import ConfigError, GenerationError
from qwenkit.model.score_head import RANK_ONLY
from qwenkit.prompt_only import check_each

if TYPE_CHECKING:
    from qwenkit.generate import LLM

EMBED = SamplingParams(max_tokens=0, embed=True)
_ST = "sentence_transformers.models."
_POOLING_MODES = ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens")


@dataclass(frozen=True)
class EmbeddingSetup:
    """How a checkpoint's embeddings are made: normalized or not, its named prompts, and the one used
    where none is named (sentence-transformers' ``default_prompt_name``)."""

    normalize: bool = True
    prompts: dict[str, str] = field(default_factory=dict)
    default_prompt_name: str | None = None
    # sentence_bert_config.json's max_seq_length (Qwen3-Embedding's 8192): longer inputs are refused, as
    # vLLM caps its context there (sentence-transformers cuts them: a vector no reference gives otherwise)
    max_length: int | None = None
    lower_case: bool = False  # sentence_bert_config.json's do_lower_case: prompt and text lowercased first


def read_setup(directory: str | Path | None) -> EmbeddingSetup:
    """The sentence-transformers files of a checkpoint directory; the defaults where it has none. A
    pooling or module other than last-token pooling and Normalize is refused by name (ConfigError):
    its embeddings would be other numbers than the model's card promises."""
    root = Path(directory) if directory is not None else None
    if root is not None and root.is_file() and root.suffix == ".gguf":
        return _gguf_setup(root)
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
        if _module_kind(kind) == "Transformer":
            continue
        if _module_kind(kind) == "Normalize":
            normalize = True
        elif _module_kind(kind) == "Pooling":
            _check_pooling(root / str(module.get("path", "")) / "config.json")
        else:
            raise ConfigError(
                f"{root / 'modules.json'}: module {kind or module!r} is not supported for embeddings "
                "(last-token Pooling and Normalize are)"
            )
    setup = _prompts(root / "config_sentence_transformers.json")
    bert_config = root / "sentence_bert_config.json"
    return replace(
        setup, normalize=normalize, max_length=_max_length(bert_config), lower_case=_lower(bert_config)
    )


def _max_length(path: Path) -> int | None:
    config = _json(path) if path.is_file() else None
    length = config.get("max_seq_length") if isinstance(config, dict) else None
    if length is None:
        return None
    if not isinstance(length, int) or isinstance(length, bool) or length < 1:
        raise ConfigError(f"{path}: max_seq_length must be a positive integer, got {length!r}")
    return length


def _lower(path: Path) -> bool:
    config = _json(path) if path.is_file() else None
    lower = config.get("do_lower_case", False) if isinstance(config, dict) else False
    if not isinstance(lower, bool):
        raise ConfigError(f"{path}: do_lower_case must be true or false, got {lower!r}")
    return lower


def _module_kind(kind: str) -> str | None:
    """A sentence-transformers module type's class (Transformer, Pooling, Normalize), under the names
    ``modules.json`` gives it: ``sentence_transformers.models.Pooling`` before version 5.4,
    ``sentence_transformers.sentence_transformer.modules.pooling.Pooling`` (or ``base.modules``) since."""
    package, _, name = kind.rpartition(".")
    if package == _ST.rstrip(".") or (
        package.startswith("sentence_transformers.") and package.endswith(".modules." + name.lower())
    ):
        return name
    return None


def _prompts(path: Path) -> EmbeddingSetup:
    """The named prompts and ``default_prompt_name`` of ``config_sentence_transformers.json``, read as
    sentence-transformers reads them: a null prompt is the empty one, a default that names none of them
    is refused."""
    extra = _json(path) if path.is_file() else None
    extra = extra if isinstance(extra, dict) else {}
    prompts = extra.get("prompts")
    prompts = (
        {str(k): "" if v is None else str(v) for k, v in prompts.items()} if isinstance(prompts, dict) else {}
    )
    default = extra.get("default_prompt_name")
    if default is not None and default not in prompts:
        known = ", ".join(sorted(prompts)) or "none"
        raise ConfigError(f"{path}: default_prompt_name {default!r} is not one of its prompts ({known})")
    return EmbeddingSetup(prompts=prompts, default_prompt_name=default)


def prompt_prefix(setup: EmbeddingSetup, prompt_name: str | None, name: str = "prompt_name") -> str:
    """The text put before each input: the prompt ``prompt_name`` names, or where it is None the
    checkpoint's default one (none without a ``default_prompt_name``), as sentence-transformers'
    ``encode`` does. ``name``: what the caller calls the option, in the error."""
    if prompt_name is None:
        return setup.prompts[setup.default_prompt_name] if setup.default_prompt_name is not None else ""
    if prompt_name not in setup.prompts:
        known = ", ".join(sorted(setup.prompts)) or "none"
        raise SamplingParamsError(f"{name} {prompt_name!r} is not one of the model's ({known})")
    return setup.prompts[prompt_name]


# llama.cpp's llama_pooling_type (gguf-py's PoolingType), as {arch}.pooling_type holds it
_GGUF_POOLING = {0: "none", 1: "mean", 2: "cls", 3: "last", 4: "rank"}
_GGUF_LAST = 3


def _gguf_setup(path: Path) -> EmbeddingSetup:
    """A GGUF's pooling, as llama.cpp's converter writes it from the sentence-transformers Pooling
    (``{arch}.pooling_type``): last-token pooling runs, another is refused by name; a file without the
    key pools its last token, as a directory without sentence-transformers files does. Normalized, as
    llama.cpp's embedding example and server do by default (``--embd-normalize 2``: L2); the EOS the
    file's ``tokenizer.ggml.add_eos_token`` asks for is the tokenizer's (``gguf_tokenizer``)."""
    from qwenkit.checkpoint.gguf import GGUFError, read_gguf

    try:
        ckpt = read_gguf(path)
    except GGUFError as exc:
        raise ConfigError(str(exc)) from None
    key, pooling = f"{ckpt.architecture}.pooling_type", ckpt.pooling_type
    if ckpt.rank_token_ids is not None:  # its last hidden state goes through the rows of "yes" and "no"
        raise ConfigError(f"{path}: {key} is 4 (rank), a reranker's file: {RANK_ONLY}")
    if pooling is not None and pooling != _GGUF_LAST:
        named = _GGUF_POOLING.get(pooling) if isinstance(pooling, int) else None
        shown = f"{pooling} ({named})" if named else f"{pooling!r}, not a pooling llama.cpp knows"
        raise ConfigError(
            f"{path}: {key} is {shown}; qwenkit pools the last token ({_GGUF_LAST}, last), "
            "as decoder embedding models do"
        )
    return EmbeddingSetup()


def sentence_transformers_files(pooling: object, hidden_size: int) -> dict[str, Any]:
    """The sentence-transformers files (relative path -> JSON) that say what a GGUF's
    ``{arch}.pooling_type`` says, for a directory converted from it: its Pooling (none of the modes for
    a pooling that has no sentence-transformers one) and Normalize, as llama.cpp normalizes."""
    modes = {1: "mean_tokens", 2: "cls_token", 3: "lasttoken"}
    config: dict[str, object] = {"word_embedding_dimension": hidden_size}
    config |= {f"pooling_mode_{m}": pooling == i for i, m in modes.items()}
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": _ST + "Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": _ST + "Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": _ST + "Normalize"},
    ]
    return {"modules.json": modules, "1_Pooling/config.json": config}


def _json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: cannot read it: {exc}") from None


def _check_pooling(path: Path) -> None:
    """Last-token pooling alone, read as sentence-transformers' Pooling takes its config: the
    ``pooling_mode`` string (the form version 5.4 writes) wins over the ``pooling_mode_*`` flags."""
    config = _json(path) if path.is_file() else None
    if not isinstance(config, dict):
        raise ConfigError(f"{path}: missing or not a JSON object")
    mode = config.get("pooling_mode")
    if mode is not None:
        if str(mode).lower() != "lasttoken":
            raise ConfigError(
                f"{path}: pooling_mode {mode!r} is not supported; qwenkit pools the last token "
                "(lasttoken), as decoder embedding models do"
            )
        return
    # a flag left out is sentence-transformers' default: mean pooling's is on (last-token pooling with it
    # absent computes both, concatenated)
    other = [m for m in _POOLING_MODES if config.get(f"pooling_mode_{m}", m == "mean_tokens")]
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


def check_dimensions(dimensions: object, hidden_size: int, name: str = "dimensions") -> None:
    """``dimensions`` (Matryoshka) fits the hidden size; ``name``: what the caller calls the option."""
    if dimensions is None:
        return
    if not isinstance(dimensions, int) or isinstance(dimensions, bool) or not 1 <= dimensions <= hidden_size:
        raise SamplingParamsError(
            f"{name} must be an integer in [1, {hidden_size}] (the hidden size), got {dimensions!r}"
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
    adds its tokens: Qwen3-Embedding's ``<|endoftext|>``), ids as given. A text surely past the context
    window is refused from its length before any input is tokenized (``LLM.check_prompt_bound``, as
    ``generate`` does)."""
    if adapter is not None:  # first: a name not served is no input's fault
        llm.engine.validate([0], replace(EMBED, adapter=adapter))
    lower = llm.embedding_setup.lower_case  # as sentence-transformers and vLLM: the prompt lowercased too
    texts = [_text(prefix + one, lower) if isinstance(one, str) else one for one in inputs]
    check_each(texts, lambda text: llm.check_prompt_bound(text, EMBED), "input")
    encoded = [llm.encode(text) if isinstance(text, str) else list(text) for text in texts]
    check_each(encoded, lambda ids: llm.engine.validate(ids, EMBED), "input")
    check_each(encoded, lambda ids: _check_length(ids, llm.embedding_setup.max_length), "input")
    return encoded


def _text(text: str, lower: bool) -> str:
    return text.lower() if lower else text


def _check_length(ids: list[int], limit: int | None) -> None:
    if limit is not None and len(ids) > limit:
        raise PromptTooLongError(
            f"the input has {len(ids)} tokens; this model embeds at most {limit} "
            "(max_seq_length in its sentence_bert_config.json)"
        )


def _hidden(outputs: list) -> torch.Tensor:
    last = outputs[-1]
    if last.embedding is None:
        raise GenerationError(last.error or f"the embedding request ended without one ({last.finish_reason})")
    return last.embedding


def run(llm: LLM, ids: list[list[int]], adapter: str | None = None) -> list[torch.Tensor]:
    """The hidden states of ``ids``, batched by the engine beside whatever else runs; through served
    adapter ``adapter`` where given."""
    return prompt_only.run(llm, ids, replace(EMBED, adapter=adapter), _hidden)


async def run_async(
    llm: LLM, ids: list[list[int]], adapter: str | None = None, name: str | None = None
) -> list[prompt_only.Finished[torch.Tensor]]:
    """``run`` from an event loop, which stays free while the engine computes (``prompt_only.run_async``)."""
    return await prompt_only.run_async(llm, ids, replace(EMBED, adapter=adapter), _hidden, name)
