"""A reranker's GGUF, as llama.cpp's converter writes Qwen3-Reranker (conversion/qwen.py, Qwen3Model):
``{arch}.pooling_type`` 4 (rank), ``{arch}.classifier.output_labels`` ["yes", "no"], and
``cls.output.weight``, the output head's rows of those two tokens (the embeddings' rows for a tied
model; an untied one's lm_head is not written at all). llama.cpp scores a document with the softmax
over the two outputs of that matrix at the last token's final-norm hidden state, P("yes"): the number
``qwenkit.rerank`` computes from the full head's logits of "yes" and "no". The model loads with the two
rows as its score head (``model.score_head``) and no output head, so it scores and does nothing else.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwenkit.errors import CheckpointError

RANK = 4  # llama.cpp's LLAMA_POOLING_TYPE_RANK (gguf-py's PoolingType.RANK)
CLS_OUT = "cls.output.weight"
LABELS = ["yes", "no"]  # the Qwen3-Reranker judge's answers, in the order the converter stacks the rows


def label_ids(
    metadata: Mapping[str, Any], shapes: Mapping[str, Sequence[int]], arch: str
) -> tuple[int, ...] | None:
    """The vocabulary ids of a reranker file's labels ("yes", "no": the tokens its ``cls.output`` rows
    stand for), or None for another file. ValueError, naming the key or tensor, for a rank file qwenkit
    cannot score as the judge (other labels, no ``cls.output``) and a ``cls.output`` in another file."""
    pooling = metadata.get(f"{arch}.pooling_type")
    what = f"a reranker's file ({arch}.pooling_type {RANK}, rank)"
    if pooling != RANK:
        if CLS_OUT in shapes:
            raise ValueError(
                f"{CLS_OUT} is a reranker's tensor ({arch}.pooling_type {RANK}, rank), but this file's "
                f"{arch}.pooling_type is {pooling!r}"
            )
        return None
    labels = metadata.get(f"{arch}.classifier.output_labels")
    if labels != LABELS:
        raise ValueError(
            f"{what} whose {arch}.classifier.output_labels are {labels!r}; qwenkit reranks with the "
            f"yes/no judge of Qwen3-Reranker's files ({LABELS!r})"
        )
    hidden = shapes["token_embd.weight"][1]
    if CLS_OUT not in shapes:
        raise ValueError(f'{what} without {CLS_OUT}, the rows of "yes" and "no" its scores come from')
    if tuple(shapes[CLS_OUT]) != (len(LABELS), hidden):
        raise ValueError(f"{CLS_OUT} has shape {tuple(shapes[CLS_OUT])}, not ({len(LABELS)}, {hidden})")
    tokens = list(metadata.get("tokenizer.ggml.tokens") or ())
    missing = [label for label in labels if label not in tokens]
    if missing:
        raise ValueError(f"{what} whose vocabulary lacks its label {missing[0]!r} as a token")
    return tuple(tokens.index(label) for label in labels)


def refuse_rank(source: object, writes: str) -> None:
    """CheckpointError for a reranker's GGUF ``source`` (``GGUFCheckpoint.rank_token_ids``) that a command
    would write out as ``writes``: that layout has no place for a head of two rows, and its files
    would load as nothing (``score_head.weight`` an unexpected tensor)."""
    if getattr(source, "rank_token_ids", None) is not None:
        raise CheckpointError(
            f"{getattr(source, 'path', source)} is a reranker's GGUF (pooling rank): it holds only the "
            f'head\'s rows of "yes" and "no", which {writes} has no place for; rerank with the file '
            "itself (LLM.rerank, or `qwenkit serve` and POST /v1/rerank)"
        )
