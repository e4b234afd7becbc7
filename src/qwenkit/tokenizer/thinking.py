"""Qwen3's reasoning: a reply's leading ``<think>...</think>`` block split from the answer, as it streams.

The one implementation of the split: the chat API (``qwenkit.chat``), the hermes tool-call parser
(the server, the agent, the evaluator), the ``chat`` command and evaluation's scoring (whole replies,
:func:`split_thinking`) all read a reply through it, so the same reply has the same reasoning and answer
everywhere. Only a block at the very start is reasoning (or the
whole reply, when the prompt itself opened ``<think>``); a reply cut off inside it is all reasoning, with
no answer. The whitespace around the tags (the newlines the templates write) belongs to neither.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def template_thinks(chat_template: str | None) -> bool:
    """Whether a chat template knows a ``<think>`` block (Qwen3, QwQ): its replies are split."""
    return THINK_OPEN in (chat_template or "")


def prompt_opens_thinking(decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends inside an opened ``<think>`` (its last few tokens decoded)."""
    return decode(list(prompt_ids[-4:])).rstrip().endswith(THINK_OPEN)


def prompt_closes_thinking(decode: Callable[[Sequence[int]], str], prompt_ids: Sequence[int]) -> bool:
    """Whether the rendered prompt ends with a closed ``</think>`` (Qwen3 with ``enable_thinking`` off
    writes an empty block), so the reply does not think."""
    return decode(list(prompt_ids[-4:])).rstrip().endswith(THINK_CLOSE)


def continuation_opens_thinking(
    encode: Callable[[str], Sequence[int]],
    decode: Callable[[Sequence[int]], str],
    prompt_ids: Sequence[int],
    continued: str,
) -> bool:
    """Whether a prompt that ends inside its final message (``continue_final_message``) ends inside a
    ``<think>`` block that message, or the template just before it, opened: the last tag among the final
    message's tokens and the few the template wrote before them is ``<think>``. ``continued``: the
    continued text (encoded only to count how far back to look)."""
    tail = decode(list(prompt_ids[-(len(encode(continued)) + 8) :]))
    return tail.rfind(THINK_OPEN) > tail.rfind(THINK_CLOSE)


def partial_suffix(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper prefix of ``tag``."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def held_back(text: str, tag: str | None) -> int:
    """How much of the end of ``text`` to hold: a partial tag and the whitespace before it (the
    whitespace around markup is dropped). With no tag to watch for, nothing is held."""
    if tag is None:
        return 0
    k = len(text) - partial_suffix(text, tag)
    while k > 0 and text[k - 1].isspace():
        k -= 1
    return len(text) - k


def split_thinking(text: str, *, opened: bool = False) -> tuple[str | None, str]:
    """A whole reply's ``(reasoning, answer)``, as :class:`ThinkSplitter` gives them streamed; reasoning is
    None where the reply has no block (and the prompt opened none). As vLLM's Qwen3 reasoning parser: the
    first ``</think>`` ends the thinking, and a reply cut off inside it has no answer. A reply with a
    ``</think>`` and no ``<think>`` had its block opened by the prompt (a Qwen3 Thinking-2507 template
    behind a server that split nothing): vLLM's newer Qwen3 parser reads it so too."""
    opened = opened or (THINK_CLOSE in text and THINK_OPEN not in text)
    splitter = ThinkSplitter(opened=opened)
    reasoning, answer = splitter.feed(text)
    rest = splitter.finish()
    thought = opened or text.startswith(THINK_OPEN)
    return (reasoning + rest[0] if thought else None), answer + rest[1]


class ThinkSplitter:
    """Feed a reply's text as it streams; each ``feed`` returns ``(reasoning, content)``, the new text of
    each that is decided (reasoning always comes before content), and ``finish`` the rest at the end.
    Text that may still be part of a tag is held back. ``opened``: the prompt already opened the block.
    ``continued``: the reply continues a prefilled final message, inside its open block (``opened``) or
    its answer, so it opens no block and its leading whitespace is the message's own."""

    def __init__(self, *, opened: bool = False, continued: bool = False) -> None:
        # start | thinking | answer
        self.state = "thinking" if opened else "answer" if continued else "start"
        self.strip = opened and not continued  # drop the whitespace after a tag
        self.buf = ""

    def feed(self, text: str) -> tuple[str, str]:
        return self._split(text, final=False)

    def finish(self) -> tuple[str, str]:
        return self._split("", final=True)

    def _split(self, text: str, final: bool) -> tuple[str, str]:
        buf, reasoning = self.buf + text, ""
        self.buf = ""
        if self.state == "start":
            if buf.startswith(THINK_OPEN):
                buf, self.state, self.strip = buf[len(THINK_OPEN) :], "thinking", True
            elif THINK_OPEN.startswith(buf) and not final:
                self.buf = buf  # could still become <think>
                return "", ""
            else:
                self.state = "answer"
        if self.strip:
            buf = buf.lstrip()
            if not buf:
                return "", ""
            self.strip = False
        if self.state == "thinking":
            end = buf.find(THINK_CLOSE)
            if end < 0:
                keep = 0 if final else held_back(buf, THINK_CLOSE)
                reasoning, self.buf = buf[: len(buf) - keep], buf[len(buf) - keep :]
                return (reasoning.rstrip() if final else reasoning), ""
            reasoning, buf = buf[:end].rstrip(), buf[end + len(THINK_CLOSE) :].lstrip()
            self.state, self.strip = "answer", not buf
        return reasoning, buf
