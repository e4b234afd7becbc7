"""Constrained decoding with llguidance: JSON schemas and tool-call grammars -> per-request token masks.

Grammars are built here as llguidance text (a Lark grammar with ``%json`` schema islands) and carried in
``SamplingParams.grammar``; ``enable_grammars(llm)`` installs the compiler the engine calls when such a
request arrives. JSON is compact (no whitespace between tokens, ``,`` and ``:`` separators): a weak
model cannot wander in whitespace until ``max_tokens`` runs out.
"""

from __future__ import annotations

import json
import re
import threading
from functools import lru_cache
from typing import Any

import llguidance
import torch

from qwenkit.errors import QwenkitError
from qwenkit.generate import LLM
from qwenkit.tokenizer import Tokenizer

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ",", "key_separator": ":"}
# The hermes call as Qwen's templates spell it; only the arguments value is compact JSON.
HERMES_OPEN = '<tool_call>\n{"name": '
HERMES_ARGS = ', "arguments": '
HERMES_CLOSE = "}\n</tool_call>"


class GrammarError(QwenkitError, ValueError):
    """A schema or grammar llguidance cannot compile."""


# ---- grammar text ---------------------------------------------------------------------------------


def _lark_string(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


# Where a JSON schema keeps its subschemas: a schema, a list of schemas, or a name -> schema mapping.
_SUBSCHEMA = ("additionalProperties", "items", "contains", "not", "if", "then", "else", "unevaluatedItems")
_SUBSCHEMA_LISTS = ("prefixItems", "anyOf", "allOf", "oneOf")
_SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")


def declared_properties_only(schema: Any, close: bool = True) -> Any:
    """``schema`` with ``"additionalProperties": false`` on every object that has ``properties`` (none
    too: a tool without arguments) and says nothing about other keys, at any depth (a copy; the caller's
    schema is left as it was).

    JSON Schema lets such an object take any further keys, and under a grammar a model that does not
    know when to stop takes them without end (the bundled model wrote ``"address"`` again and again
    until ``max_tokens``). vLLM's default grammar engine (xgrammar's strict mode) and OpenAI's strict
    structured outputs do the same; a schema that wants more keys says so with ``additionalProperties``
    (or ``patternProperties``), and an object schema without ``properties`` stays open. The parts of an
    ``allOf`` each describe some keys of one object, so they stay open themselves (``close`` False)."""
    if isinstance(schema, list):
        return [declared_properties_only(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = dict(schema)
    for key in _SUBSCHEMA:
        if isinstance(out.get(key), dict | list):
            out[key] = declared_properties_only(out[key])
    for key in _SUBSCHEMA_LISTS:
        if isinstance(out.get(key), list):
            out[key] = [declared_properties_only(s, close=key != "allOf") for s in out[key]]
    for key in _SUBSCHEMA_MAPS:
        if isinstance(out.get(key), dict):
            out[key] = {name: declared_properties_only(s) for name, s in out[key].items()}
    open_keys = ("additionalProperties", "patternProperties", "unevaluatedProperties")
    if close and isinstance(out.get("properties"), dict) and not any(k in out for k in open_keys):
        # Keys the schema names elsewhere stay allowed (any value here; their parts still say what):
        # closed to `properties` alone, such a valid schema could match nothing.
        named = [k for k in _named_keys(out) if k not in out["properties"]]
        out["properties"] = {**out["properties"], **{k: {} for k in named}}
        out["additionalProperties"] = False
    return out


def _named_keys(schema: dict[str, Any]) -> list[str]:
    """The keys an object schema requires, and those its ``allOf`` / ``anyOf`` / ``oneOf`` parts describe
    or require, in order, each once."""

    def names(part: dict[str, Any], key: str) -> list[Any]:  # a malformed value is llguidance's to refuse
        value = part.get(key)
        return list(value) if isinstance(value, list | dict) else []

    keys = names(schema, "required")
    for key in ("allOf", "anyOf", "oneOf"):
        parts = schema.get(key)
        for part in parts if isinstance(parts, list) else []:
            if isinstance(part, dict):
                keys += names(part, "properties") + names(part, "required")
    return [k for k in dict.fromkeys(keys) if isinstance(k, str)]


def _json_island(schema: dict[str, Any]) -> str:
    schema = declared_properties_only(schema)
    return "%json " + json.dumps({**schema, "x-guidance": COMPACT_JSON}, ensure_ascii=False)


def json_schema_grammar(schema: dict[str, Any] | None) -> str:
    """Compact JSON matching ``schema`` (None: any JSON object, as ``json_object`` asks), objects with
    ``properties`` taking only those (:func:`declared_properties_only`)."""
    try:
        return llguidance.LLMatcher.grammar_from_json_schema(
            declared_properties_only(schema) if schema is not None else {"type": "object"},
            overrides=COMPACT_JSON,
        )
    except ValueError as e:  # a value it cannot read (an integer past 64 bits), before any compiling
        raise GrammarError(f"the schema cannot be used for constrained decoding: {e}") from None


def tool_call_grammar(functions: list[dict[str, Any]], *, parallel: bool = True) -> str:
    """One ``<tool_call>`` block per call to one of ``functions`` (OpenAI ``function`` objects), the
    arguments matching each one's ``parameters`` schema; several blocks (one per line) when parallel."""
    start = 'start: call ("\\n" call)*' if parallel else "start: call"
    return "\n".join([start, *_call_rules(functions)])


def calls_or_json_grammar(
    functions: list[dict[str, Any]],
    schema: dict[str, Any] | None,
    *,
    parallel: bool = True,
    style: str = "hermes",
) -> str:
    """A reply that may call ``functions`` or answer in a ``response_format``: either calls in the
    template's ``style`` or JSON matching ``schema`` (None: any object), as OpenAI's models answer a
    request with both ``tools`` (``tool_choice: "auto"``) and a response format: held to the format alone,
    the model could never call a tool. ``style``: ``"hermes"`` (``<tool_call>`` blocks, as
    :func:`tool_call_grammar`), ``"llama3_json"`` or ``"react"`` (one call, as :func:`llama3_call_grammar`
    and :func:`react_call_grammar`)."""
    answer_schema = schema if schema is not None else {"type": "object"}
    if style == "llama3_json":  # a call is JSON itself: one schema, the calls' shapes or the answer's
        return json_schema_grammar(_llama3_calls_or(functions, answer_schema))
    answer = "answer: " + _json_island(answer_schema)
    if style == "hermes":
        calls = ['calls: call ("\\n" call)*' if parallel else "calls: call", *_call_rules(functions)]
    else:
        head, *rules = react_call_grammar(functions).split("\n")  # "start: call0 | call1 ...", the rules
        calls = ["calls: " + head.removeprefix("start: "), *rules]
    return "\n".join(["start: calls | answer", answer, *calls])


def _llama3_calls_or(functions: list[dict[str, Any]], answer: dict[str, Any]) -> dict[str, Any]:
    """A JSON schema for one Llama 3 call to one of ``functions`` (``{"name": ..., "parameters": ...}``)
    or ``answer``. One schema, not a grammar's alternatives: llguidance's lexer takes a call's literal
    ``{"name": `` over a JSON island at the same ``{``, and no answer could be written. Each function's
    parameters and the answer are a resource of their own (``$id``), so that a ``#/$defs/...`` reference
    in each resolves in that schema, as it does in an island of its own."""
    if not functions:
        raise GrammarError("a tool-call grammar needs at least one function")
    calls = [
        {
            "type": "object",
            "properties": {
                "name": {"const": fn["name"]},
                "parameters": {
                    "$id": f"urn:qwenkit:call{i}",
                    **(fn.get("parameters") or {"type": "object", "properties": {}}),
                },
            },
            "required": ["name", "parameters"],
            "additionalProperties": False,
        }
        for i, fn in enumerate(functions)
    ]
    return {"anyOf": [*calls, {"$id": "urn:qwenkit:answer", **answer}]}


def _call_rules(functions: list[dict[str, Any]]) -> list[str]:
    """Lark rules: ``call``, a hermes block calling one of ``functions``, and each function's rules."""
    if not functions:
        raise GrammarError("a tool-call grammar needs at least one function")
    rules = []
    for i, fn in enumerate(functions):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        rules.append(
            f"call{i}: {_lark_string(HERMES_OPEN + json.dumps(fn['name'], ensure_ascii=False) + HERMES_ARGS)}"
            f" args{i} {_lark_string(HERMES_CLOSE)}\nargs{i}: {_json_island(params)}"
        )
    return ["call: " + " | ".join(f"call{i}" for i in range(len(functions))), *rules]


def llama3_call_grammar(functions: list[dict[str, Any]]) -> str:
    """Llama 3.1/3.2's bare JSON call to one of ``functions``, as Meta's template asks for it:
    ``{"name": <name>, "parameters": <arguments>}``, the arguments compact JSON matching its ``parameters``
    schema. One call: Meta's template renders one call per assistant turn (it raises on more), so a
    forced reply the client sends back must be one."""
    if not functions:
        raise GrammarError("a tool-call grammar needs at least one function")
    rules = []
    for i, fn in enumerate(functions):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        head = '{"name": ' + json.dumps(fn["name"], ensure_ascii=False) + ', "parameters": '
        rules.append(f'call{i}: {_lark_string(head)} args{i} "}}"\nargs{i}: {_json_island(params)}')
    return "\n".join(["start: " + " | ".join(f"call{i}" for i in range(len(functions))), *rules])


def react_call_grammar(functions: list[dict[str, Any]]) -> str:
    """Qwen v1's ReAct call to one of ``functions``: ``Action: <name>\\nAction Input: <arguments>``, the
    arguments compact JSON matching its ``parameters``. The reply is the call (no thought before it);
    the grammar ends where the model would write ``Observation:``."""
    if not functions:
        raise GrammarError("a tool-call grammar needs at least one function")
    rules = []
    for i, fn in enumerate(functions):
        params = fn.get("parameters") or {"type": "object", "properties": {}}
        head = f"Action: {fn['name']}\nAction Input: "
        rules.append(f"call{i}: {_lark_string(head)} args{i}\nargs{i}: {_json_island(params)}")
    return "\n".join(["start: " + " | ".join(f"call{i}" for i in range(len(functions))), *rules])


def after_thinking(grammar: str, *, opened: bool = True) -> str:
    """``grammar`` for a reply that may think first: any text up to the first ``</think>``, the newlines
    after it, then ``grammar``. ``opened``: the prompt opened the ``<think>`` block (thinking-only
    templates: Qwen3-*-Thinking-2507, QwQ), so the reply starts inside it; else (Qwen3's hybrid models
    with thinking on) the reply may open one itself or answer at once. vLLM's reasoning parsers hold
    structured output back until the reasoning ends the same way; held from the first token, the call or
    the JSON would land inside the reasoning, or the model could not think at all."""
    start = "start: thought NEWLINES? @answer" if opened else 'start: ("<think>" thought NEWLINES?)? @answer'
    head = (
        "%llguidance {}\n"
        f"{start}\n"
        'thought[lazy]: THOUGHT "</think>"\n'  # lazy: the first </think> ends it
        "THOUGHT: /(.|\\n)*/\n"
        "NEWLINES: /\\n+/\n"
    )
    if grammar.lstrip().startswith("{"):  # a top-level grammar (llguidance's JSON-schema form)
        (body,) = json.loads(grammar)["grammars"]
        body = {**body, "name": "answer"}
    else:  # Lark text
        body = {"name": "answer", "lark_grammar": grammar}
    return json.dumps({"grammars": [{"name": "thinking", "lark_grammar": head}, body]}, ensure_ascii=False)


# ---- compiling ------------------------------------------------------------------------------------


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: every token's bytes, eos, and an encoder."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos: int) -> None:
        known = tokenizer.vocab_size
        self.tokens = [tokenizer.token_bytes(i) if i < known else b"" for i in range(vocab_size)]
        self.eos_token_id = eos
        self.bos_token_id = None
        self.special_token_ids = sorted(tokenizer.special_token_ids)
        self._tokenizer = tokenizer
        # Text the grammar forces is tokenized as the model writes it: a non-special added token's text
        # (Qwen's <tool_call>, </tool_call>, <think>) as that one token, the rest as plain text.
        markup = [t for t, i in tokenizer.added_tokens.items() if i not in tokenizer.special_token_ids]
        markup.sort(key=len, reverse=True)  # the longest first: </tool_call> before a shorter token in it
        self._markup = re.compile("(" + "|".join(map(re.escape, markup)) + ")") if markup else None

    def __call__(self, text: str) -> list[int]:
        if self._markup is None:
            return self._tokenizer.encode_plain(text)
        ids: list[int] = []
        for i, piece in enumerate(self._markup.split(text)):  # odd pieces: the markup split off
            if i % 2:
                ids.append(self._tokenizer.added_tokens[piece])
            elif piece:
                ids += self._tokenizer.encode_plain(piece)
        return ids


class GrammarConstraint:
    """One request's llguidance matcher, as the engine's TokenConstraint."""

    def __init__(self, matcher: llguidance.LLMatcher) -> None:
        self.matcher = matcher

    def fill_bitmask(self, row: torch.Tensor) -> None:
        self.matcher.unsafe_compute_mask_ptr(row.data_ptr(), row.numel() * row.element_size())

    def accept(self, token: int) -> bool:
        # consume_token takes the end of the text at a dead end (no token allowed): that is no answer
        return self.matcher.consume_token(token) and not self.matcher.is_error()

    @property
    def finished(self) -> bool:
        return self.matcher.is_stopped()


class GrammarCompiler:
    """Grammar text -> GrammarConstraint for one tokenizer (building the token trie takes ~1-3 s, once)."""

    def __init__(self, tokenizer: Tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
        vocab = _Vocabulary(tokenizer, vocab_size, eos_token_ids[0])
        wrapper = llguidance.TokenizerWrapper(vocab)
        self.lltokenizer = llguidance.LLTokenizer(wrapper, n_vocab=vocab_size, eos_token=eos_token_ids)

    def check(self, grammar: str) -> None:
        """Raise GrammarError naming the problem if ``grammar`` does not compile."""
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.lltokenizer)
        if failed:  # llguidance's first line names the problem; the rest quotes our generated grammar
            lines = messages[0].splitlines()
            problem = re.sub(r"^at \d+\(\d+\): ", "", lines[0])
            if problem.endswith(":"):  # "regex parse error:" names its cause on a later "error: ..." line
                cause = next((ln.strip()[7:] for ln in lines[1:] if ln.strip().startswith("error: ")), "")
                problem = f"{problem} {cause}".rstrip()
            raise GrammarError(f"the schema cannot be used for constrained decoding: {problem}")
        # A grammar that matches nothing compiles; llguidance finds it out at its first mask, where it
        # allows no token (and forces the end of the text, which would be an empty answer).
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        matcher.compute_bitmask()
        if matcher.is_error():
            raise GrammarError(
                "the schema cannot be used for constrained decoding: no JSON value matches the schema"
            )

    def __call__(self, grammar: str) -> GrammarConstraint:
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(f"the grammar does not compile: {matcher.get_error()}")
        return GrammarConstraint(matcher)


_lock = threading.Lock()


def enable_grammars(llm: LLM) -> GrammarCompiler:
    """Install (once) the grammar compiler on ``llm``'s engine; returns it."""
    with _lock:
        engine = llm.engine
        if not isinstance(engine.grammar_compiler, GrammarCompiler):
            engine.grammar_compiler = _compiler(
                llm.tokenizer, engine.vocab_size, tuple(sorted(llm.eos_token_ids))
            )
        return engine.grammar_compiler


@lru_cache(maxsize=4)
def _compiler(tokenizer: Tokenizer, vocab_size: int, eos: tuple[int, ...]) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, vocab_size, list(eos))
