"""ChatML prompts built the way Qwen v1's `make_context` builds them (qwen_facts §7.1).

Roles and contents are encoded as plain text and the control tokens are inserted as ids, so a message
can never inject `<|im_end|>`. Works with any Qwen tokenizer (v1 ranks == Qwen1.5+ ids).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from qwenkit.tokenizer import chat_template as ct
from qwenkit.tokenizer.base import Tokenizer, continued_field
from qwenkit.tokenizer.chat_template import DEFAULT_V1_SYSTEM
from qwenkit.tokenizer.errors import TokenizerError

STOP_WORDS_IDS = [[151645], [151644]]  # get_stop_words_ids("chatml"): [[im_end], [im_start]]


def _control(tokenizer: Tokenizer, token: str) -> int:
    token_id = tokenizer.added_tokens.get(token)
    if token_id is None:
        raise TokenizerError(f"tokenizer has no {token} token, so it cannot build ChatML prompts")
    return token_id


def _turn_parts(tokenizer: Tokenizer, role: str, content: str) -> tuple[list[int], list[int], int]:
    """([im_start] role \\n, content, im_end): each text part encoded on its own, like `_tokenize_str`."""
    head = [_control(tokenizer, "<|im_start|>"), *tokenizer.encode_plain(role), *tokenizer.encode_plain("\n")]
    return head, tokenizer.encode_plain(content), _control(tokenizer, "<|im_end|>")


def _turn(tokenizer: Tokenizer, role: str, content: str) -> list[int]:
    """[im_start] role \\n content [im_end]."""
    head, body, end = _turn_parts(tokenizer, role, content)
    return [*head, *body, end]


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


def chatml_segments(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    continue_final_message: bool | str = False,
    check_texts: Callable[[Sequence[str]], None] | None = None,
) -> list[tuple[list[int], bool]]:
    """Ids of OpenAI-shaped messages in ChatML, make_context style, as (ids, is_reply) segments.

    A reply segment is an assistant turn's content and its <|im_end|>: what fine-tuning labels. Qwen
    builds both its prompts (`make_context`) and its training examples (finetune.py `preprocess`) this
    way, every text part encoded on its own, so inference and fine-tuning share this one encoding. The
    text form is `chatml_template()`. A conversation that does not start with a system message gets v1's
    default system prompt; for system/user/assistant turns ending in a user turn the ids equal
    `make_context` without truncation. ``continue_final_message`` leaves the final turn open after its
    content (no <|im_end|>), as `chatml_template()`'s text cut by transformers' rule. ``check_texts``:
    as `Tokenizer.apply_chat_template`'s, called with the messages' contents before any is encoded.
    """
    field = continued_field(continue_final_message, add_generation_prompt)
    if field not in (None, "content"):
        raise TokenizerError(f'continue_final_message: Qwen v1\'s ChatML has no "{field}" to continue')
    normalized = ct.normalize_messages(messages)
    if check_texts is not None:
        check_texts([m["content"] for m in normalized if isinstance(m.get("content"), str)])
    nl = tokenizer.encode_plain("\n")
    segments: list[tuple[list[int], bool]] = []
    for i, message in enumerate(normalized):
        role, content = message.get("role"), message.get("content")
        if not isinstance(content, str):
            raise TokenizerError(f"chat message {i} needs string 'role' and 'content' for ChatML")
        if i == 0 and role != "system":
            segments.append(([*_turn(tokenizer, "system", DEFAULT_V1_SYSTEM), *nl], False))
        head, body, end = _turn_parts(tokenizer, role, content)
        if field is not None and i == len(normalized) - 1:  # the open turn the model goes on with
            segments += [(head, False), (body, role == "assistant")]
        elif role == "assistant":
            segments += [(head, False), ([*body, end], True), (nl, False)]
        else:
            segments.append(([*head, *body, end, *nl], False))
    if add_generation_prompt:
        segments.append(
            ([_control(tokenizer, "<|im_start|>"), *tokenizer.encode_plain("assistant"), *nl], False)
        )
    return segments


def encode_chatml(
    tokenizer: Tokenizer, messages: Sequence[Mapping[str, Any]], *, add_generation_prompt: bool = True
) -> list[int]:
    """Ids of OpenAI-shaped messages in ChatML, make_context style (see `chatml_segments`)."""
    segments = chatml_segments(tokenizer, messages, add_generation_prompt=add_generation_prompt)
    return [token for ids, _ in segments for token in ids]
