"""Chat templates: rendered byte-identically to transformers in a sandboxed jinja2 environment
(``jinja_sandbox``, imported when a template is first used), plus the control-token marking that keeps
text from users from turning into control tokens.

Injection safety follows transformers' `sanitize_control_tokens`: before rendering, every control-token
string inside the caller's data (message contents, tool results, tool-call arguments, ...) is wrapped in
two private-use markers. After rendering, a marked token is encoded as plain text and the rest of the
prompt (which holds only the template's own control tokens) is encoded with control tokens parsed. A
template string method that separates a marker from its token (e.g. `content.split('</think>')`) leaves a
lone marker, which is dropped but still breaks the text so the pieces cannot join into a token. Such a
marker also stands between a strip and the whitespace it meant to remove (`.lstrip('\n')` after the
split), so the marked render may hold whitespace the prompt text does not: `align_pieces` cuts the
prompt text itself along the marked render's pieces. Where the markers make a template take another path
than the unmarked data does (a string test that sees a lone marker), the prompt is marked on one side
only (MARKINGS), so that its ids stay those of its text.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Mapping
from functools import lru_cache
from typing import TYPE_CHECKING, Any

from qwenkit.tokenizer.errors import TokenizerError

if TYPE_CHECKING:
    import jinja2

MARK_START = "\U000f0000"
MARK_END = "\U000f0001"
# How a caller's control token is marked: on both sides first, as transformers marks it. A template's string
# tests may then take another path than on the unmarked data (Qwen3's `content.split('</think>')[0]` of
# "</think>answer" is a lone marker, not empty, so a think block is written that the prompt text has not);
# marked on one side, the other side's tests see the data as it is.
MARKINGS = ((MARK_START, MARK_END), (MARK_START, ""), ("", MARK_END))

DEFAULT_V1_SYSTEM = "You are a helpful assistant."

# Names a message's reasoning is passed under; the first is the one chat templates read (as transformers).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def chatml_template(default_system: str | None = DEFAULT_V1_SYSTEM) -> str:
    """The ChatML `chat_template` (a tokenizer_config.json value) that renders Qwen v1's `make_context` text.

    `default_system` is inserted when the conversation does not start with a system message (v1 chat
    uses "You are a helpful assistant."; Qwen1.5 used the same words without the period).
    """
    default = ""
    if default_system is not None:
        sys_text = json.dumps(f"<|im_start|>system\n{default_system}<|im_end|>\n")
        default = (
            f"{{%- if loop.first and messages[0]['role'] != 'system' %}}{{{{- {sys_text} }}}}{{%- endif %}}\n"
        )
    return (
        "{%- for message in messages %}\n"
        f"{default}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}\n"
        "{%- endfor %}\n"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )


def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; a syntax error becomes a one-line TokenizerError."""
    from qwenkit.tokenizer import jinja_sandbox  # jinja2 only once a template is used

    return jinja_sandbox.compile_template(source)


def _plain(value: Any) -> Any:
    """A fresh copy made of plain JSON types only: the sandbox then sees no caller objects or methods."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return f"<{type(value).__name__}>"


def join_text_parts(messages: Any) -> Any:
    """``messages`` with each content given as OpenAI text parts (``[{"type": "text", "text": ...}]``)
    joined into one string, as the server takes it: text-only templates concatenate a content or drop
    one that is not a string (Qwen3's), so a list reached none of them as text. Any other part is refused
    by message and part; anything that is not a list of messages is returned as it came."""
    if not isinstance(messages, list | tuple):
        return messages
    out = []
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, Mapping) else None
        if isinstance(content, list | tuple):
            texts = []
            for j, part in enumerate(content):
                text = part.get("text") if isinstance(part, Mapping) and part.get("type") == "text" else None
                if not isinstance(text, str):
                    raise TokenizerError(
                        f"chat message {i} content part {j}: only text parts "
                        f'({{"type": "text", "text": "..."}}) are supported, got {part!r:.60}'
                    )
                texts.append(text)
            message = {**message, "content": "".join(texts)}
        out.append(message)
    return out


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check the OpenAI-shaped message list and normalize it as transformers does before rendering.

    Keys whose value is None are dropped (OpenAI sends `content: null` with tool calls) and the reasoning
    is copied under `reasoning_content` and `thinking` from whichever name the caller used; text parts
    are joined (``join_text_parts``).
    """
    if not isinstance(messages, list | tuple) or not messages:
        raise TokenizerError("chat messages must be a non-empty list of {'role', 'content'} objects")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise TokenizerError(f"chat message {i} must be an object with a string 'role'")
    for message in join_text_parts(messages):
        message = {k: _plain(v) for k, v in message.items() if v is not None}
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# Put after the final message's text to find where it ends in the render (transformers' tag, so a template
# that treats it specially treats ours alike).
CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def tag_final_message(
    messages: list[dict[str, Any]], field: str, source: str
) -> tuple[list[dict[str, Any]], str]:
    """``continue_final_message``, as transformers does it: normalized ``messages`` with CONTINUE_TAG after
    the final message's ``field`` (and after the copies of it under the other reasoning names), and that
    field's text. ``cut_at_tag`` then ends the render where the text ends."""
    last = messages[-1]
    final = last.get(field)
    if final is None:
        raise TokenizerError(f'continue_final_message: the final message has no "{field}" to continue')
    if not isinstance(final, str):
        raise TokenizerError(f'continue_final_message: the final message\'s "{field}" is not text')
    fields = [field]
    if field in _REASONING_FIELDS:  # the reasoning is under every name: tag each, whichever it reads
        fields = [f for f in _REASONING_FIELDS if last.get(f) == final]
    if not any(f in source for f in fields):
        raise TokenizerError(f'continue_final_message: the chat template does not read "{field}"')
    return [*messages[:-1], {**last, **{f: last[f] + CONTINUE_TAG for f in fields}}], final


def cut_at_tag(rendered: str, final: str | None) -> str:
    """A render of ``tag_final_message``'s messages cut where the final message's text ends (less trailing
    whitespace where the template stripped the tag's). ``final``, where given, must be in the render."""
    tag = CONTINUE_TAG.strip()
    if tag not in rendered or (final is not None and final.strip() not in rendered):
        raise TokenizerError(
            "continue_final_message: the chat template does not render the final message as it was given "
            "(it drops or rewrites part of it), so there is no end of it to continue from"
        )
    at = rendered.rindex(tag)
    return rendered[:at] if rendered.startswith(CONTINUE_TAG, at) else rendered[:at].rstrip()


def render(source: str, variables: dict[str, Any]) -> str:
    """Render a compiled template; any error raised inside it becomes a one-line TokenizerError."""
    from qwenkit.tokenizer import jinja_sandbox

    return jinja_sandbox.render(source, variables)


@lru_cache(maxsize=16)
def control_patterns(
    tokens: tuple[str, ...], marking: tuple[str, str] = MARKINGS[0]
) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """(regex for any control token, regex for a token marked as ``marking`` (one of MARKINGS) or a lone
    marker). Longest tokens first."""
    longest_first = sorted(tokens, key=len, reverse=True)
    any_token = re.compile("|".join(map(re.escape, longest_first)) or "(?!)")
    start, end = marking
    marked = re.compile(f"{start}({any_token.pattern}){end}|[{MARK_START}{MARK_END}]")
    return any_token, marked


def mark_control_tokens(obj: Any, any_token: re.Pattern[str], marking: tuple[str, str] = MARKINGS[0]) -> Any:
    """Mark control tokens in every string of `obj` (recursively; dict keys untouched) with ``marking``'s
    markers before and after (one of MARKINGS).

    Markers already present in the input are removed first so they cannot be used to forge a marked token.
    """
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return any_token.sub(f"{marking[0]}\\g<0>{marking[1]}", obj)
    if isinstance(obj, dict):
        return {k: mark_control_tokens(v, any_token, marking) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [mark_control_tokens(v, any_token, marking) for v in obj]
    return obj


def split_marked(rendered: str, marked: re.Pattern[str]) -> list[tuple[str, bool]]:
    """Split a marked render into (text, is_user_token) pieces, dropping lone markers and empty pieces.

    `re.split` with one group gives [template text, marked token, template text, ...]; a lone marker
    yields None in the token slot.
    """
    pieces = marked.split(rendered)
    out: list[tuple[str, bool]] = []
    for i, piece in enumerate(pieces):
        if piece:
            out.append((piece, i % 2 == 1))
    return out


def template_tokens(pieces: list[tuple[str, bool]], any_token: re.Pattern[str]) -> Counter[str]:
    """The control tokens of ``pieces``' template text (not the caller's marked tokens), counted."""
    return Counter(
        token for piece, from_user in pieces if not from_user for token in any_token.findall(piece)
    )


def _common_length(a: str, i: int, b: str, j: int) -> int:
    """Length of the longest common start of ``a[i:]`` and ``b[j:]`` (a binary search of C-speed compares,
    so a long piece costs no character-by-character loop)."""
    lo, hi = 0, min(len(a) - i, len(b) - j)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if b.startswith(a[i : i + mid], j):
            lo = mid
        else:
            hi = mid - 1
    return lo


def align_pieces(
    pieces: list[tuple[str, bool]], text: str, any_token: re.Pattern[str]
) -> list[tuple[str, bool]] | None:
    """``pieces`` of the marked render re-cut to ``text``, the same template's render of the unmarked data.

    Where a lone marker kept a strip from removing whitespace, the pieces join to ``text`` plus that
    whitespace: each character of ``text`` is matched to the first equal one left in the pieces (only
    whitespace may go unmatched) and keeps its piece, so a control token keeps its origin. None when the
    two differ otherwise (a marker changed the template's path), or when a piece less its whitespace
    holds control tokens it did not hold (text from the caller joined into one).
    """
    out: list[tuple[str, bool]] = []
    at = 0
    for piece, from_user in pieces:
        if text.startswith(piece, at):  # the usual case: the whole piece is there as it is
            out.append((piece, from_user))
            at += len(piece)
            continue
        kept: list[str] = []
        j = 0
        while j < len(piece):
            n = _common_length(piece, j, text, at)
            kept.append(piece[j : j + n])
            j, at = j + n, at + n
            if j < len(piece):
                if not piece[j].isspace():
                    return None
                j += 1  # whitespace the text does not have
        cut = "".join(kept)
        if not from_user and any_token.findall(cut) != any_token.findall(piece):
            return None
        if cut:
            out.append((cut, from_user))
    return out if at == len(text) else None


def join_template_pieces(
    pieces: list[tuple[str, bool]], any_token: re.Pattern[str], longest: int
) -> list[tuple[str, bool]]:
    """Template pieces that a dropped lone marker parted, joined again where no control token (``longest``:
    the longest one's length) could run across the join: the prompt's ids are then those of its text
    ("\n" and " \n" apart were two tokens where the text "\n \n" has one)."""
    out: list[tuple[str, bool]] = []
    for piece, from_user in pieces:
        if out and not from_user and not out[-1][1]:
            before = out[-1][0]
            joined = before + piece
            # a token may start in the last longest-1 characters before the join; the alternatives are
            # longest first, so a match there that ends before the join rules out every longer one
            starts = range(max(0, len(before) - longest + 1), len(before))
            if not any((m := any_token.match(joined, i)) and m.end() > len(before) for i in starts):
                out[-1] = (joined, False)
                continue
        out.append((piece, from_user))
    return out
