"""The score head of a reranker's GGUF (``checkpoint.gguf_rank``): the output head's rows of the tokens
"yes" and "no" alone, with no full-vocabulary head beside it (an untied model's file has none). It
answers a scoring request (``SamplingParams.score_token_ids``) with the logits of those tokens, as the
full head would, and the engine refuses every other request (``RANK_ONLY``)."""

from __future__ import annotations

import torch
from torch import nn

RANK_ONLY = (
    'this model has no output head (a reranker\'s GGUF holds only the rows of "yes" and "no"): it '
    "scores documents (rerank), not text or embeddings"
)


class ScoreHead(nn.Module):
    """``weight`` (labels, hidden): the head's rows of the tokens ``token_ids`` (in that order)."""

    def __init__(self, hidden_size: int, token_ids: tuple[int, ...]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(token_ids), hidden_size))
        self.token_ids = tuple(token_ids)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """The logits of ``token_ids`` at final-norm hidden states (..., hidden), in the model's dtype."""
        return torch.nn.functional.linear(hidden.to(self.weight), self.weight)

    def columns(self, token_ids: tuple[int, ...]) -> list[int]:
        """Where each of ``token_ids`` (each one of this head's) is among its outputs."""
        return [self.token_ids.index(t) for t in token_ids]

    def extra_repr(self) -> str:
        return f"hidden={self.weight.shape[1]}, token_ids={self.token_ids}"


def score_head(model: nn.Module) -> ScoreHead | None:
    head = getattr(model, "score_head", None)
    return head if isinstance(head, ScoreHead) else None


def attach(model: nn.Module, source: object) -> None:
    """Give ``model`` (being built, on the meta device) the score head of a reranker's GGUF ``source``
    (``GGUFCheckpoint.rank_token_ids``), for the loader to fill from its ``score_head.weight``."""
    token_ids = getattr(source, "rank_token_ids", None)
    if token_ids:
        model.score_head = ScoreHead(model.config.hidden_size, token_ids)
