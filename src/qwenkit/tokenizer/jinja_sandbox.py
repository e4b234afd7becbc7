"""The sandboxed jinja2 environment chat templates render in, byte-identically to transformers.

Kept apart from ``chat_template`` so that jinja2 (about 20 ms to import) loads only when a template is
first compiled: a plain continuation (``qwenkit generate``) never renders one.
"""

from __future__ import annotations

import json
import types
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime
from functools import lru_cache, update_wrapper
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qwenkit.tokenizer import jinja_limits as limits
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
    indent: int | str | None = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    # transformers' semantics: no HTML escaping (jinja's own tojson escapes < > & '), unicode kept.
    limits.text_size(x)
    if indent is None:
        return json.dumps(x, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys)
    # an indent is written once per line and nesting level: built piece by piece, each size checked
    width = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
    limits.check_size(width * (_depth(x) + 1), "a JSON indent times the nesting depth")
    encoder = json.JSONEncoder(
        ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )
    pieces, size = [], 0
    for piece in encoder.iterencode(x):
        size += len(piece)
        limits.check_size(size, "a JSON text")
        pieces.append(piece)
    return "".join(pieces)


def _depth(x: Any) -> int:
    """How deeply lists and mappings nest in ``x`` (already sized by ``text_size``)."""
    deepest, stack = 0, [(x, 0)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        if isinstance(item, Mapping):
            stack.extend((v, depth + 1) for v in item.values())
        elif isinstance(item, list | tuple):
            stack.extend((v, depth + 1) for v in item)
    return deepest


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


_TICK = "count_iteration"


def _tick(lineno: int) -> nodes.Expr:
    """The node the code generator writes as a step of the budget (templates cannot write one)."""
    return nodes.EnvironmentAttribute(_TICK).set_lineno(lineno)


class _GuardedCodeGenerator(CodeGenerator):
    """Compiles each loop iteration (and each item a loop's `if` tests) to a step of the render's budget,
    and `~` to a size-checked join: neither calls anything the sandbox could otherwise see."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        line = node.lineno
        node.body = [nodes.ExprStmt(_tick(line)).set_lineno(line), *node.body]
        if node.test is not None:
            node.test = nodes.And(_tick(line), node.test).set_lineno(line)
        super().visit_For(node, frame)

    def visit_EnvironmentAttribute(self, node: nodes.EnvironmentAttribute, frame: Frame) -> None:
        if node.name == _TICK:  # a direct call: no sandbox round trip in a loop's every iteration
            self.write(f"environment.{_TICK}()")
        else:
            super().visit_EnvironmentAttribute(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.join_operands((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


class _TemplateEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with jinja2's documented size limits on `*` and `**` (its sandbox bounds range()), and
    qwenkit's per-render limits (``jinja_limits``) on every call, filter, operator, loop and output."""

    code_generator_class = _GuardedCodeGenerator
    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def count_iteration(self) -> bool:
        limits.step()
        return True

    def join_operands(self, operands: tuple) -> str:
        """`a ~ b`: the operands' text sized before it is built."""
        size = 0
        for operand in operands:
            size += limits.text_size(operand)
            limits.check_size(size, "a string joined with ~")
        return limits.charge("".join(map(str, operands)))

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        """The rendered text (and a macro's or block's): refused as soon as it grows past the limit."""
        out, size = [], 0
        for piece in pieces:
            size += len(piece)
            limits.check_size(size, "the rendered text")
            out.append(piece)
        limits.step(size // limits.CHARS_PER_STEP)
        return "".join(out)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        limits.step(limits.CALL_STEPS)
        if isinstance(obj, types.BuiltinMethodType) and isinstance(obj.__self__, str):
            args = _check_str_method(obj.__self__, obj.__name__, args, kwargs)
        return limits.charge(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Callable[..., str] | None:
        """jinja2's sandboxed `str.format`, its widths and precisions checked before it formats."""
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        template, is_map = value.__self__, value.__name__ == "format_map"

        def checked(*args: Any, **kwargs: Any) -> str:
            if is_map and len(args) == 1 and isinstance(args[0], Mapping):
                limits.check_str_format(template, (), args[0])
            else:
                limits.check_str_format(template, args, kwargs)
            return limits.charge(wrapped(*args, **kwargs))

        return update_wrapper(checked, wrapped)

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "+" and isinstance(left, str | list | tuple) and isinstance(right, str | list | tuple):
            limits.check_size(len(left) + len(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            limits.check_percent(left, right)
        elif operator == "*":
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
        limits.step()
        return limits.charge(super().call_binop(context, operator, left, right))


def _check_str_method(s: str, name: str, args: tuple, kwargs: dict) -> tuple:
    """Refuse a string method whose small arguments ask for a big result; returns the args to call with
    (a joined iterator taken once)."""
    if name in ("center", "ljust", "rjust", "zfill") and args:
        limits.check_width(args[0], f"a {name} width")
    elif name == "expandtabs":
        tabsize = args[0] if args else kwargs.get("tabsize", 8)
        if isinstance(tabsize, int):
            limits.check_size(len(s) + s.count("\t") * tabsize, "an expanded string")
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        limits.check_replace(s, args[0], args[1], args[2] if len(args) > 2 else kwargs.get("count", -1))
    elif name == "join" and args:
        items, _ = limits.joined_size(args[0], s)
        return (items, *args[1:])
    return args


def _ints(left: Any, right: Any) -> bool:
    """Both integers, whose arithmetic Python carries out exactly at any size."""
    return isinstance(left, int) and isinstance(right, int)


def _repeated_size(sequence: Any, times: Any) -> int:
    """How many items ``sequence * times`` would hold (0 unless it repeats a string, list or tuple)."""
    if isinstance(sequence, str | list | tuple) and isinstance(times, int):
        return len(sequence) * max(times, 0)
    return 0


def _finalize(value: Any) -> Any:
    """What `{{ ... }}` prints, unchanged: a list or mapping is sized before it turns into text."""
    if not isinstance(value, str):
        limits.text_size(value)
    return value


@lru_cache(maxsize=16)
def compile_template(source: str) -> jinja2.Template:
    """Compile once per template string; a syntax error becomes a one-line TokenizerError."""
    env = _TemplateEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, jinja2.ext.loopcontrols],
        finalize=_finalize,
    )
    env.filters["tojson"] = _tojson
    for name, function in env.filters.items():
        env.filters[name] = limits.guarded_filter(name, function)
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
        with limits.render_budget():
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
