"""The `Tokenizer` interface every other layer uses, with the chat logic shared by both backends."""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Mapping, Sequence
from functools import cached_property
from typing import Any

from qwenkit.tokenizer import chat_template as ct
from qwenkit.tokenizer import length_bound
from qwenkit.tokenizer import named_templates as nt
from qwenkit.tokenizer.errors import TokenizerError

# Keys of generation_config.json that describe sampling; engines read them as defaults.
GENERATION_KEYS = (
    "do_sample",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)
# Tokens that close a chat turn in the templates we know; one of them found in the template is a stop token.
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>")
# tokenizer_config.json keys that transformers passes to templates (as its `special_tokens_map`).
TEMPLATE_TOKEN_KEYS = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)
# Fill-in-the-middle (Qwen2.5-Coder, Qwen3-Coder): the prompt is <|fim_prefix|>{prefix}<|fim_suffix|>{suffix}
# <|fim_middle|> and the model writes the middle. Qwen's FIM example stops on any of FIM_STOP_TOKENS.
FIM_TOKENS = ("<|fim_prefix|>", "<|fim_suffix|>", "<|fim_middle|>")
FIM_STOP_TOKENS = (
    *FIM_TOKENS,
    "<|fim_pad|>",
    "<|repo_name|>",
    "<|file_sep|>",
    "<|endoftext|>",
    "<|im_end|>",
)


def token_text(value: Any) -> str | None:
    """A tokenizer_config token entry is a string or an AddedToken dict {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    return None


# What a str decoded from bytes that are not UTF-8 holds (Python's surrogateescape: argv, a C-locale stdin);
# no UTF-8 tokenizer can take it (the `tokenizers` library raised TypeError or UnicodeEncodeError).
LONE_SURROGATE = re.compile("[\ud800-\udfff]")


def check_unicode(text: str, what: str = "the text") -> None:
    """TokenizerError where ``text`` holds a lone surrogate, naming its position."""
    found = LONE_SURROGATE.search(text)
    if found is not None:
        raise TokenizerError(
            f"{what} is not valid Unicode: a lone surrogate {found.group()!r} at position {found.start()} "
            "(bytes that were not UTF-8, decoded with errors='surrogateescape'?)"
        )


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


def continued_field(continue_final_message: bool | str, add_generation_prompt: bool) -> str | None:
    """The field of the final message a prompt continues (``continue_final_message``: False, True for the
    content, or a field's name), or None; refused beside a generation prompt, as transformers refuses it."""
    if continue_final_message is False or continue_final_message is None:
        return None
    if add_generation_prompt:
        raise TokenizerError(
            "continue_final_message and add_generation_prompt cannot both be set: the final message is "
            "continued and no new turn opened (pass add_generation_prompt=False)"
        )
    if continue_final_message is True:
        return "content"
    if not isinstance(continue_final_message, str) or not continue_final_message:
        raise TokenizerError("continue_final_message must be true, false or the name of a message field")
    return continue_final_message


class Tokenizer(ABC):
    """Text <-> token ids, special and stop tokens, and chat prompts.

    Subclasses supply the encoder (tiktoken for Qwen v1, `tokenizers` for the rest) through a handful of
    abstract methods; everything about chat templates and stop tokens lives here so both behave alike.
    `encode` treats special-token text as plain text unless asked: text from users must never become a
    control token. `encode_prompt` is how a raw-text prompt reaches the model: `encode` inside the tokens
    the tokenizer adds to every sequence (Llama's BOS; Qwen's tokenizers add none).
    """

    def __init__(
        self,
        added_tokens: Mapping[str, int],
        special_token_ids: Iterable[int],
        chat_template: str | list[Any] | Mapping[str, str] | None,
        tokenizer_config: Mapping[str, Any] | None = None,
        generation_config: Mapping[str, Any] | None = None,
        default_eos: str | None = None,
        sequence_special_ids: tuple[Sequence[int], Sequence[int]] = ((), ()),
    ) -> None:
        # (before, after): the ids transformers' `tokenizer(text)` puts around a text's own
        self.sequence_special_ids: tuple[tuple[int, ...], tuple[int, ...]] = (
            tuple(sequence_special_ids[0]),
            tuple(sequence_special_ids[1]),
        )
        self.added_tokens: dict[str, int] = dict(added_tokens)
        self.special_token_ids: frozenset[int] = frozenset(special_token_ids)
        # the default template; named ones (`named_templates`) in chat_templates, "default" among them
        single, self.chat_templates = nt.named_templates(chat_template)
        self.chat_template: str | None = self.chat_templates.get(nt.DEFAULT, single)
        self.tokenizer_config: dict[str, Any] = dict(tokenizer_config or {})
        self.generation_config: dict[str, Any] = dict(generation_config or {})
        # A model that ships generation_config.json gets transformers' defaults for what it leaves out.
        self.has_generation_config = generation_config is not None

        eos = set()
        eos_text = token_text(self.tokenizer_config.get("eos_token")) or default_eos
        if eos_text is not None and eos_text in self.added_tokens:
            eos.add(self.added_tokens[eos_text])
        else:
            eos_text = None
        self._eos_text = eos_text
        eos |= _ids(self.generation_config.get("eos_token_id"))
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        self.generation_defaults: dict[str, Any] = {  # null is unset, as transformers reads it
            k: self.generation_config[k] for k in GENERATION_KEYS if self.generation_config.get(k) is not None
        }

    # ---- backend primitives -------------------------------------------------------------------------
    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can produce (regular + added tokens)."""

    @abstractmethod
    def encode_plain(self, text: str) -> list[int]:
        """Encode with every added token's text treated as ordinary text."""

    @abstractmethod
    def encode_with_added(self, text: str) -> list[int]:
        """Encode with added/special-token text parsed into its token (the reference libraries' default)."""

    @abstractmethod
    def decode(self, ids: Sequence[int], *, skip_special: bool = False) -> str:
        """Ids -> text; invalid UTF-8 becomes U+FFFD. `skip_special` drops special tokens."""

    @abstractmethod
    def token_bytes(self, token_id: int) -> bytes:
        """The raw bytes a token stands for (added tokens: their UTF-8 text). Used for streaming."""

    @abstractmethod
    def id_to_piece(self, token_id: int) -> str:
        """The vocabulary spelling of a token (byte-level, e.g. "Ġhello"; added tokens as written)."""

    @abstractmethod
    def token_to_id(self, piece: str) -> int | None:
        """The id of a vocabulary piece or added token, or None."""

    # ---- shared behaviour ---------------------------------------------------------------------------
    def encode(self, text: str, *, allow_special: bool = False) -> list[int]:
        """Text -> ids. By default special-token text is plain text (injection safe)."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode str, got {type(text).__name__}")
        check_unicode(text)
        return self.encode_with_added(text) if allow_special else self.encode_plain(text)

    @property
    def eos_token(self) -> str | None:
        """The end-of-sequence token's text, as transformers names it: tokenizer_config's ``eos_token``,
        else the first of generation_config's ``eos_token_id`` (not the lowest id that ends a reply)."""
        if self._eos_text is not None:
            return self._eos_text
        ids = self.generation_config.get("eos_token_id")
        first = ids[0] if isinstance(ids, list) and ids else ids
        return self.decode([first]) if isinstance(first, int) else None

    @property
    def bos_token(self) -> str | None:
        """The token a raw prompt starts with (Llama's ``<s>``), or None where none is added (Qwen)."""
        before, _ = self.sequence_special_ids
        return self.decode(list(before[:1])) if before else None

    def encode_prompt(self, text: str, *, allow_special: bool = False) -> list[int]:
        """A raw-text prompt as the model expects it: `encode` with the tokenizer's sequence tokens around it
        (Llama's BOS), as transformers' `tokenizer(text)`, vLLM's completions and llama.cpp add them.

        Every raw-text path (generate, /v1/completions, eval scoring) comes here. Rendered chat prompts do
        not: their template writes its own BOS, and a second one would be a prompt the model never saw.
        """
        before, after = self.sequence_special_ids
        return [*before, *self.encode(text, allow_special=allow_special), *after]

    def token_length_bound(self) -> length_bound.LengthBound | None:
        """What `min_tokens` reads its bound from (the most bytes of text one token stands for, ...),
        read once; None where no such bound holds (see `length_bound`)."""
        return None

    @cached_property
    def _token_length_bound(self) -> length_bound.LengthBound | None:
        return self.token_length_bound()

    def min_tokens(self, *texts: str, reaching: int = 1) -> int:
        """At least how many tokens ``texts`` make, each encoded on its own (with or without added
        tokens): read from their UTF-8 lengths in milliseconds, so a caller can refuse a prompt that cannot
        fit before tokenizing it (a 48 MB one took 52 s). 0 where no bound is known, and at once for texts
        too short to reach ``reaching`` tokens by it (the vocabulary, read once, is not read for them)."""
        if 4 * sum(map(len, texts)) < reaching:  # at most 4 bytes a character, at least 1 a token
            return 0
        return length_bound.min_tokens(texts, self._token_length_bound)

    @cached_property
    def control_tokens(self) -> tuple[str, ...]:
        """Added tokens that chat content may not produce: all of them except whitespace-only ones."""
        return tuple(t for t in self.added_tokens if t and not t.isspace())

    @property
    def has_fim(self) -> bool:
        """Whether the tokenizer has the fill-in-the-middle tokens (`encode_fim`)."""
        return all(t in self.added_tokens for t in FIM_TOKENS)

    def encode_fim(self, prefix: str, suffix: str) -> list[int]:
        """A fill-in-the-middle prompt: the FIM tokens as their ids around ``prefix`` and ``suffix`` encoded
        as plain text (FIM token text inside code stays text), after the tokenizer's BOS where it adds one."""
        if not self.has_fim:
            tokens = ", ".join(FIM_TOKENS)
            raise TokenizerError(
                f"fill-in-the-middle needs a tokenizer with the tokens {tokens} (as Qwen2.5-Coder's and "
                "Qwen3-Coder's); this model's tokenizer does not have them"
            )
        fim_prefix, fim_suffix, fim_middle = (self.added_tokens[t] for t in FIM_TOKENS)
        before, _ = self.sequence_special_ids
        return [*before, fim_prefix, *self.encode(prefix), fim_suffix, *self.encode(suffix), fim_middle]

    @cached_property
    def fim_stop_token_ids(self) -> frozenset[int]:
        """The tokens a fill-in-the-middle answer ends on (those of FIM_STOP_TOKENS this tokenizer has)."""
        return frozenset(self.added_tokens[t] for t in FIM_STOP_TOKENS if t in self.added_tokens)

    @cached_property
    def stop_token_ids(self) -> frozenset[int]:
        """eos ids plus the template's end-of-turn token (e.g. <|im_end|>); generation stops on any."""
        stops = set(self.eos_token_ids)
        template = "".join([self.chat_template or "", *self.chat_templates.values()])
        for tok in END_OF_TURN_TOKENS:
            if tok in template and tok in self.added_tokens:
                stops.add(self.added_tokens[tok])
        return frozenset(stops)

    def _template_variables(
        self,
        messages: Any,
        tools: list[dict[str, Any]] | None,
        add_generation_prompt: bool,
        template_kwargs: dict[str, Any],
        continue_final_message: bool | str = False,
        chat_template: str | None = None,
    ) -> tuple[dict[str, Any], str | None]:
        """(the template's variables, the final message's text where it is continued: see `cut_at_tag`)."""
        if tools is not None and (
            not isinstance(tools, list | tuple) or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise TokenizerError("tools must be a list of JSON-schema objects")
        token_vars: dict[str, Any] = {}
        for key in TEMPLATE_TOKEN_KEYS:
            text = token_text(self.tokenizer_config.get(key))
            if text is not None:
                token_vars[key] = text
        normalized, final = ct.normalize_messages(messages), None
        field = continued_field(continue_final_message, add_generation_prompt)
        if field is not None:
            normalized, final = ct.tag_final_message(
                normalized, field, self._require_template(tools, chat_template)
            )
        variables = {
            **token_vars,
            **ct._plain(template_kwargs),
            "messages": normalized,
            "tools": ct._plain(tools),
            "documents": None,
            "add_generation_prompt": add_generation_prompt,
        }
        return variables, final

    def chat_template_for(self, tools: Any = None, chat_template: str | None = None) -> str | None:
        """The template a call with ``tools`` renders, as transformers' ``get_chat_template`` picks it: the
        one ``chat_template`` names (any other text given there is itself the template), else a model's
        "tool_use" template where tools are passed (not None) and it has one, else its default; None where
        none applies. What the template does with tools (`template_style`) is read from this one."""
        if chat_template is not None:
            if not isinstance(chat_template, str):
                raise TokenizerError(
                    f"chat_template must be a template's name or text, got {chat_template!r:.60}"
                )
            return self.chat_templates.get(chat_template, chat_template)
        return nt.pick_template(self.chat_template, self.chat_templates, tools)

    def _require_template(self, tools: Any = None, chat_template: str | None = None) -> str:
        template = self.chat_template_for(tools, chat_template)
        if template:
            return template
        if self.chat_templates:
            raise nt.no_default_error(self.chat_templates)
        raise TokenizerError(
            "this tokenizer has no chat_template (neither tokenizer_config.json nor chat_template.jinja "
            "has one; in a GGUF file, no tokenizer.chat_template key)"
        )

    def render_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool | str = False,
        *,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text, byte-identical to transformers' `apply_chat_template(tokenize=False)`.

        ``continue_final_message`` (True for the content, or the name of the field, e.g.
        ``"reasoning_content"``) ends the prompt inside the final message, for the model to go on with it,
        as transformers does; it needs ``add_generation_prompt=False``. ``chat_template``: a model's named
        template to render (or a template's text), as transformers' argument (`chat_template_for`).
        """
        variables, final = self._template_variables(
            messages, tools, add_generation_prompt, template_kwargs, continue_final_message, chat_template
        )
        rendered = ct.render(self._require_template(tools, chat_template), variables)
        return rendered if final is None else ct.cut_at_tag(rendered, final)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool | str = False,
        *,
        chat_template: str | None = None,
        check_texts: Callable[[Sequence[str]], None] | None = None,
        **template_kwargs: Any,
    ) -> list[int]:
        """The prompt ids. Control tokens come only from the template; control-token text inside messages,
        tool results, tool-call arguments or tool definitions is encoded as plain text.

        Without such text the ids equal the reference (transformers) ids for the same rendered text.
        ``continue_final_message`` and ``chat_template``: as `render_chat_template`. ``check_texts`` is
        called with the texts the ids will be encoded from (each on its own) once the prompt is rendered and
        before any is tokenized, so a caller can refuse (raise) what surely cannot fit its context
        (`min_tokens`) without tokenizing it.
        """
        if chat_template is None:  # Qwen v1's built-in ChatML, where no template is asked for
            segments = self.chat_segments(
                messages, tools, add_generation_prompt, continue_final_message, check_texts
            )
            if segments is not None:
                return [token for ids, _ in segments for token in ids]
        ids: list[int] = []
        pieces = self.chat_pieces(
            messages,
            tools,
            add_generation_prompt,
            continue_final_message,
            chat_template=chat_template,
            **template_kwargs,
        )
        check_unicode("".join(piece for piece, _ in pieces), "the rendered chat prompt")
        if check_texts is not None:
            check_texts([piece for piece, _ in pieces])
        for piece, from_user in pieces:
            ids += self.encode_plain(piece) if from_user else self.encode_with_added(piece)
        return ids

    def chat_segments(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool | str = False,
        check_texts: Callable[[Sequence[str]], None] | None = None,
    ) -> list[tuple[list[int], bool]] | None:
        """The chat ids as (ids, is_reply) segments where the tokenizer builds them in code, not from a
        template's text (Qwen v1's ChatML); None where the chat template decides. Chat and fine-tuning
        both use them, so a model is trained on the very ids it is prompted with. ``check_texts``: as
        `apply_chat_template`'s."""
        return None

    def chat_pieces(
        self,
        messages: Sequence[Mapping[str, Any]],
        tools: list[dict[str, Any]] | None = None,
        add_generation_prompt: bool = True,
        continue_final_message: bool | str = False,
        *,
        chat_template: str | None = None,
        **template_kwargs: Any,
    ) -> list[tuple[str, bool]]:
        """The rendered prompt as (text, from_user) pieces: a from_user piece is control-token text that
        came from the caller's data and must be encoded as plain text; the rest is template text.

        Fine-tuning uses this to find the template's own turn markers and label assistant turns.
        """
        source = self._require_template(tools, chat_template)
        no_token, _ = ct.control_patterns(())
        variables, final = self._template_variables(
            messages, tools, add_generation_prompt, template_kwargs, continue_final_message, chat_template
        )

        def render(pattern: re.Pattern[str], marking: tuple[str, str] = ct.MARKINGS[0]) -> str:
            data = dict(variables)
            for key in ("messages", "tools"):
                data[key] = ct.mark_control_tokens(variables[key], pattern, marking)
            for key, value in template_kwargs.items():
                data[key] = ct.mark_control_tokens(ct._plain(value), pattern, marking)
            rendered = ct.render(source, data)
            if final is None:
                return rendered
            return ct.cut_at_tag(rendered, ct.mark_control_tokens(final, pattern, marking))

        longest = max(map(len, self.control_tokens), default=0)
        text: str | None = None
        both_sides: list[tuple[str, bool]] | None = None  # the pieces of the first marking, MARKINGS[0]
        for marking in ct.MARKINGS:
            any_token, marked = ct.control_patterns(self.control_tokens, marking)
            rendered = render(any_token, marking)
            pieces = ct.split_marked(rendered, marked)
            if both_sides is None and ct.MARK_START not in rendered and ct.MARK_END not in rendered:
                return pieces  # nothing was marked: the render is the prompt text
            # a marker may have kept the template's strips from the whitespace they remove in the prompt
            # text; the data's own markers are removed there as in the marked render
            text = render(no_token) if text is None else text
            aligned = ct.align_pieces(pieces, text, any_token)
            # a one-sided marking may let the template's edits of the data form a control token of the
            # caller's text (`replace('\n', '')` in "<|im_\nstart|>", on the path a marker closed): taken
            # only where its template writes no control token the both-sides render's template did not
            if aligned is not None and (
                both_sides is None
                or not ct.template_tokens(aligned, any_token) - ct.template_tokens(both_sides, any_token)
            ):
                return ct.join_template_pieces(aligned, any_token, longest)
            both_sides = pieces if both_sides is None else both_sides
        # every marking changed the template's path: the both-sides render, as transformers encodes it
        return ct.join_template_pieces(both_sides or [], any_token, longest)
