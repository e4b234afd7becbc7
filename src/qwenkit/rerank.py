"""Reranking with a causal LM judge (Qwen3-Reranker): each (query, document) pair is written in the
model card's prompt and its score is P("yes") of the next token, the softmax over the logits of "yes"
and "no" after the prompt. The engine computes each prompt as a scoring request (``score_token_ids``)
beside whatever else runs, and hands back those two logits.

Which models rerank: a Qwen3-Reranker checkpoint says nothing of it (its config is a plain
Qwen3ForCausalLM), so any causal LM with an output head whose vocabulary holds "yes" and "no" as single
tokens is scored; the scores mean something for a model trained as this judge. A checkpoint without a
head (an embedding model) is refused by the engine, by name. A reranker's GGUF (``checkpoint.gguf_rank``)
has the head's rows of "yes" and "no" alone, and the engine reads these two logits from them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from qwenkit import prompt_only
from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.errors import ConfigError, GenerationError
from qwenkit.prompt_only import check_each

if TYPE_CHECKING:
    from qwenkit.generate import LLM

# The Qwen3-Reranker model card's prompt: a system line, the judged pair, an empty thinking block
PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
    'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
DEFAULT_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"


def answer_ids(llm: LLM) -> tuple[int, int]:
    """The ids of the vocabulary pieces "yes" and "no" (transformers' ``convert_tokens_to_ids``);
    ConfigError where either is not one token: this model cannot answer as the judge."""
    yes, no = (llm.tokenizer.token_to_id(piece) for piece in ("yes", "no"))
    if yes is None or no is None:
        raise ConfigError('this model cannot rerank: its vocabulary lacks "yes" or "no" as a single token')
    return yes, no


def params(llm: LLM, adapter: str | None = None) -> SamplingParams:
    """A scoring request for "yes" and "no" (in that order), through served adapter ``adapter``."""
    return SamplingParams(max_tokens=0, score_token_ids=answer_ids(llm), adapter=adapter)


def check_model(llm: LLM, adapter: str | None = None) -> SamplingParams:
    """The scoring params, once the model can score at all: SamplingParamsError for a model without an
    output head or an adapter not served, before any document is looked at (neither is a document's
    fault, so the message names none)."""
    scoring = params(llm, adapter)
    llm.engine.validate([0], scoring)
    return scoring


def check_request(query: object, documents: object, instruction: object = None) -> list[str]:
    """The documents as a list of strings; SamplingParamsError names what is wrong (an empty query or
    list, a document that is no string)."""
    if not isinstance(query, str) or not query:
        raise SamplingParamsError(f"query must be a non-empty string, got {query!r:.60}")
    if instruction is not None and not isinstance(instruction, str):
        raise SamplingParamsError(f"instruction must be a string or None, got {instruction!r:.60}")
    if isinstance(documents, str) or not isinstance(documents, Sequence) or not documents:
        raise SamplingParamsError("documents must be a non-empty list of strings")
    for i, doc in enumerate(documents):
        if not isinstance(doc, str):
            raise SamplingParamsError(f"documents[{i}] must be a string, got {doc!r:.60}")
    return list(documents)


def prompt_ids(
    llm: LLM, query: str, documents: Sequence[str], instruction: str | None = None, adapter: str | None = None
) -> list[list[int]]:
    """Each document's prompt ids, as the model card builds them: the prefix and suffix tokenized alone
    around ``tokenizer("<Instruct>: ...\\n<Query>: ...\\n<Document>: ...")``. A query that already starts
    with the card's prefix was written by the client (vLLM's example does so; query + document is then
    the prompt) and is not wrapped again. Checked by the engine before any runs (context window,
    ``adapter`` served); the message names the document."""
    scoring = check_model(llm, adapter)
    if query.startswith(PREFIX):
        texts, around = [query + doc for doc in documents], ([], [])
    else:
        task = DEFAULT_INSTRUCTION if instruction is None else instruction
        texts = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {doc}" for doc in documents]
        around = tuple(llm.tokenizer.encode(part, allow_special=True) for part in (PREFIX, SUFFIX))
    check_each(texts, lambda text: llm.check_prompt_bound(text, scoring), "documents", always=True)
    ids = [[*around[0], *llm.encode(text), *around[1]] for text in texts]
    check_each(ids, lambda one: llm.engine.validate(one, scoring), "documents", always=True)
    return ids


def score(logits: Sequence[float]) -> float:
    """P("yes") from the (yes, no) logits, as the card computes it: log-softmax over (no, yes), exp."""
    yes, no = logits
    return float(torch.tensor([no, yes]).log_softmax(0)[1].exp())


def _logits(outputs: list) -> list[float]:
    last = outputs[-1]
    if last.token_logits is None:
        reason = last.finish_reason
        raise GenerationError(last.error or f"the scoring request ended without logits ({reason})")
    return last.token_logits


def run(llm: LLM, ids: list[list[int]], adapter: str | None = None) -> list[float]:
    """Each prompt's score, the prompts batched by the engine beside whatever else runs."""
    return prompt_only.run(llm, ids, params(llm, adapter), _score)


async def run_async(
    llm: LLM, ids: list[list[int]], adapter: str | None = None, name: str | None = None
) -> list[prompt_only.Finished[float]]:
    """``run`` from an event loop, which stays free while the engine computes (``prompt_only.run_async``)."""
    return await prompt_only.run_async(llm, ids, params(llm, adapter), _score, name)


def _score(outputs: list) -> float:
    return score(_logits(outputs))
