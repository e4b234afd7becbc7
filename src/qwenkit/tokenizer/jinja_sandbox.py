"""The sandboxed jinja2 environment chat templates render in, byte-identically to transformers.

Kept apart from ``chat_template`` so that jinja2 (about 20 ms to import) loads only when a template is
first compiled: a plain continuation (``qwenkit generate``) never renders one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenkit.tokenizer.errors import TokenizerError


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker): renders its body."""

    tags = {"generation"}  # noqa: RUF012 - jinja2's Extension API declares tags as a class attribute

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Callable[[], str]) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' semantics: no HTML escaping (jinja's own tojson escapes < > & '), unicode kept.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _TemplateDict:
    """`dict(...)` for templates without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so templates cannot reach CPython internals."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # same signature trick as jinja's Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"templates cannot set underscore attribute {name!r}")


# A template's `*` may build a string or list of at most this many items, and its `*` and `**` an integer of
# at most this many bits: a model's template (a file of the checkpoint, run on every prompt) writing
# `'x' * 10**10` held 10 GB for a minute, and `[1] * 10**10` ended in a MemoryError traceback. The integer is
# bounded by its size, not its exponent: `((2 ** 4096) ** 4096) ** 4096`, or a number squared in a loop,
# builds gigabytes from small exponents. Real templates repeat an indent a few times.
MAX_REPEAT = 1 << 20
MAX_INT_BITS = 1 << 16


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with jinja2's documented size limits on `*` and `**` (its sandbox bounds range())."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            size = _repeated_size(left, right) or _repeated_size(right, left)
            if size > MAX_REPEAT:
                raise jinja2.exceptions.SecurityError(
                    f"a repetition of {size} items is over the sandbox's limit of {MAX_REPEAT}"
                )
            bits = left.bit_length() + right.bit_length() if _ints(left, right) else 0
            if bits > MAX_INT_BITS:
                raise jinja2.exceptions.SecurityError(
                    f"an integer product of {bits} bits is over the sandbox's limit of {MAX_INT_BITS} bits"
                )
        elif _ints(left, right) and abs(left) > 1 and left.bit_length() * right > MAX_INT_BITS:
            raise jinja2.exceptions.SecurityError(
                f"an integer power of {right} is over the sandbox's limit of {MAX_INT_BITS} bits "
                f"(the base has {left.bit_length()})"
            )
        return super().call_binop(context, operator, left, right)


def _ints(left: Any, right: Any) -> bool:
    """Both integers, whose arithmetic Python carries out exactly at any size."""
    return isinstance(left, int) and isinstance(right, int)


def _repeated_size(sequence: Any, times: Any) -> int:
    """How many items ``sequence * times`` would hold (0 unless it repeats a string, list or tuple)."""
    if isinstance(sequence, str | list | tuple) and isinstance(times, int):
        return len(sequence) * max(times, 0)
    return 0


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; a syntax error becomes a one-line TokenizerError."""
    env = _TemplateEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"chat template has a syntax error at line {e.lineno}: {e.message}") from None


def render(source: str, variables: dict[str, Any]) -> str:
    """Render a compiled template; any error raised inside it becomes a one-line TokenizerError."""
    template = compile_template(source)
    try:
        return template.render(**variables)
    except jinja2.TemplateError as e:
        raise TokenizerError(f"chat template failed: {e.message or type(e).__name__}") from None
    except (TypeError, ValueError, KeyError, IndexError, AttributeError, ArithmeticError) as e:
        raise TokenizerError(f"chat template failed: {type(e).__name__}: {e}") from None
    except MemoryError:
        raise TokenizerError("chat template failed: it ran out of memory") from None
    except RecursionError:  # a macro that calls itself: the model's template is broken, not qwenkit
        raise TokenizerError(
            "chat template failed: it recursed too deeply (a macro that calls itself?)"
        ) from None
