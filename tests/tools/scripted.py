"""A real model whose choices a test steers: the engine, detokenizer, server and parsers all run for real,
but after the prompt the logits favour a scripted reply (as if a trained Qwen had written it).

Random tiny models never choose to call a tool; this stands in for the trained model's decision while
every layer above the logits is exercised unchanged.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


class ScriptedModel(torch.nn.Module):
    """Wraps a Transformer; ``play(prompt_len, ids)`` makes the next request with that prompt length
    produce ``ids`` (then its end-of-turn token), once. Other requests get the model's own logits.

    A script plays for one request: the first whose prompt of that length is read after ``play`` (those
    read in the same step share it, as the sequences of an ``n`` > 1 request), and then only while it follows
    the script (the token fed at each step is the script's previous one). It clears itself once its last
    token is steered; a later request of the same prompt length gets the model's own reply."""

    def __init__(self, inner: torch.nn.Module, end_id: int) -> None:
        super().__init__()
        self.inner, self.end_id = inner, end_id
        self.config, self.model = inner.config, inner.model
        self.script: tuple[int, list[int]] | None = None
        self.claimed = False  # a request has read the script's first token

    def play(self, prompt_len: int, ids: list[int]) -> None:
        self.script, self.claimed = (prompt_len, [*list(ids), self.end_id]), False

    def ntk_alpha(self, n: int) -> float:
        return self.inner.ntk_alpha(n)

    def forward(self, ids, *, positions, logits_index, **kwargs):
        logits = self.inner(ids, positions=positions, logits_index=logits_index, **kwargs)
        if self.script is not None:
            self.play_step(logits, ids, positions, logits_index)
        return logits

    def play_step(self, logits, ids, positions, logits_index) -> None:
        """Favour the script's next token in the rows of the request playing it (see the class)."""
        prompt_len, seq = self.script
        rows = logits if logits_index is not None else logits[0]
        at = positions[0, logits_index] if logits_index is not None else positions[0]
        fed = ids[0, logits_index] if logits_index is not None else ids[0]
        claimed, done = self.claimed, False
        for row, (pos, token) in enumerate(zip(at.tolist(), fed.tolist(), strict=True)):
            k = pos + 1 - prompt_len
            if (k == 0 and not self.claimed) or (0 < k < len(seq) and token == seq[k - 1]):
                rows[row, seq[k]] = rows[row].max() + 50.0
                claimed, done = True, done or k == len(seq) - 1
        self.claimed = claimed
        if done:
            self.script = None

    @staticmethod
    def steer(logits, positions, logits_index, scripts: list[tuple[int, list[int]]]) -> None:
        """Favour each script's next token in the rows at its positions. logits: (K, V) at logits_index,
        or (1, N, V) for every token (a decode step passes no index)."""
        rows = logits if logits_index is not None else logits[0]
        at = positions[0, logits_index] if logits_index is not None else positions[0]
        for row, pos in enumerate(at.tolist()):
            for prompt_len, seq in scripts:
                k = pos + 1 - prompt_len
                if 0 <= k < len(seq):
                    rows[row, seq[k]] = rows[row].max() + 50.0


def steer_next_request(llm, model: ScriptedModel) -> list[list[int]]:
    """Make ``llm.submit`` start the script on the next request it receives (whoever builds the prompt:
    our server or a third-party client). Append the reply's token ids to the returned list to queue it."""
    pending: list[list[int]] = []
    submit = llm.submit

    def steered_submit(prompt, params=None, request_id=None, loop=None, name=None):
        if pending:
            model.play(len(llm.encode(prompt)), pending.pop(0))
        return submit(prompt, params, request_id, loop, name)

    llm.submit = steered_submit
    return pending


@contextlib.contextmanager
def steered_server(
    checkpoint, chat_template: str | None = None, end_token: str = "<|im_end|>"
) -> Iterator[tuple]:
    """A live server on a steered copy of ``checkpoint`` (optionally with another chat template), each
    scripted reply ended by ``end_token``: yields (server, llm, pending replies)."""
    from live import LiveServer

    from qwenkit.generate import LLM
    from qwenkit.server import ServerConfig, create_app

    loaded = LLM.load(checkpoint, dtype="float32", max_batch_size=4, progress=False)
    if chat_template is not None:
        loaded.tokenizer.chat_template = chat_template
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens[end_token])
    llm = LLM(model, loaded.tokenizer, max_batch_size=4, max_seq_len=2048)  # tool prompts are long
    pending = steer_next_request(llm, model)
    app = create_app(llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as live:
        yield live, llm, pending


def play(steered: tuple, reply: str, **_unused: object) -> None:
    """The next request's reply will be ``reply`` (as if a trained model wrote it)."""
    _live, llm, pending = steered
    pending.append(llm.tokenizer.encode(reply, allow_special=True))
