"""ChatML prompts built the way Qwen v1's `make_context` builds them (qwen_facts §7.1).

Roles and contents are encoded as plain text and the control tokens are inserted as ids, so a message
can never inject `<|im_end|>`. Works with any Qwen tokenizer (v1 ranks == Qwen1.5+ ids).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from qwenkit.tokenizer.base import Tokenizer
from qwenkit.tokenizer.chat_template import DEFAULT_V1_SYSTEM
from qwenkit.tokenizer.errors import TokenizerError

STOP_WORDS_IDS = [[151645], [151644]]  # get_stop_words_ids("chatml"): [[im_end], [im_start]]


def _control(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.added_tokens.get(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer has no {token} token, so it cannot build ChatML prompts")
    return token_id


def _turn(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    """[im_start] role \\n content [im_end], each text part encoded on its own like `_tokenize_str`."""
    nl = tokenizer.encode_plain("\n")
    return [
        _control(tokenizer, "<|im_start|>"),
        *tokenizer.encode_plain(role),
        *nl,
        *tokenizer.encode_plain(content),
        _control(tokenizer, "<|im_end|>"),
    ]


def make_context(
    tokenizer: Tokenizer,
    query: str,
    history: Sequence[tuple[str, str]] | None = None,
    system: str = DEFAULT_V1_SYSTEM,
    max_window_size: int = 6144,
) -> tuple[str, list[int]]:
    """(prompt text, prompt ids) exactly as Qwen's `make_context(chat_format="chatml")`.

    Oldest whole turns are dropped until system + history fits `max_window_size` under the strict `<`
    rule; the size check does not count the current query.
    """
    nl = tokenizer.encode_plain("\n")
    im_start = _control(tokenizer, "<|im_start|>")
    system_ids = _turn(tokenizer, "system", system)
    system_text = f"<|im_start|>system\n{system}<|im_end|>"
    context: list[int] = []
    text = ""
    for q, r in reversed(list(history or ())):
        turn = [*nl, *_turn(tokenizer, "user", q), *nl, *_turn(tokenizer, "assistant", r)]
        if len(system_ids) + len(turn) + len(context) >= max_window_size:
            break
        context = turn + context
        text = f"\n<|im_start|>user\n{q}<|im_end|>\n<|im_start|>assistant\n{r}<|im_end|>" + text
    ids = [*system_ids, *context, *nl, *_turn(tokenizer, "user", query), *nl, im_start]
    ids += [*tokenizer.encode_plain("assistant"), *nl]
    text = f"{system_text}{text}\n<|im_start|>user\n{query}<|im_end|>\n<|im_start|>assistant\n"
    return text, ids


def encode_chatml(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Ids of OpenAI-shaped messages in ChatML, make_context style; the text form is `chatml_template()`.

    A conversation that does not start with a system message gets v1's default system prompt. For
    system/user/assistant turns ending in a user turn this equals `make_context` without truncation.
    """
    if not isinstance(messages, Sequence) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role', 'content'} objects")
    nl = tokenizer.encode_plain("\n")
    ids: list[int] = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TokenizerError(f"chat message {i} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if not isinstance(role, str) or not isinstance(content, str):
            raise TokenizerError(f"chat message {i} needs string 'role' and 'content' for ChatML")
        if i == 0 and role != "system":
            ids += [*_turn(tokenizer, "system", DEFAULT_V1_SYSTEM), *nl]
        ids += [*_turn(tokenizer, role, content), *nl]
    if add_generation_prompt:
        ids += [_control(tokenizer, "<|im_start|>"), *tokenizer.encode_plain("assistant"), *nl]
    return ids
