"""Per-render limits on what a chat template may build and run.

A model's template is a file of the checkpoint, rendered on every prompt of `qwenkit serve`: jinja2's
sandbox keeps it from reaching Python, but not from building a gigabyte string (`x|center(10**10)`,
`'{:>999999999}'.format(x)`, a string doubled in a loop) or from looping 10**15 times (three nested
`range(100000)`). Each render gets a budget of steps (a loop iteration, a call, a filter, a KiB of text
read or built), and no string or list it builds, its output included, may exceed MAX_SIZE. Sizes are
checked before a C-level call allocates them where a small argument asks for a big result (a width, a
repetition, a joined list), after the call otherwise. Real templates take a few thousand steps.
"""

from __future__ import annotations

import inspect
import re
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from functools import update_wrapper
from typing import Any, NoReturn

import jinja2.exceptions

# The largest string or list a template may build, its rendered prompt included: far above any context
# window's text (a million tokens is about 4 million characters), far below what exhausts a server.
MAX_SIZE = 1 << 26
# Steps one render may take: a loop iteration or filter is one, a call (method, macro, global) four, and
# a KiB of text or 64 items read or built by a call, filter or operator one. Qwen3's, Qwen2.5's and
# Llama 3.2's templates take 10 to 20 a message; at most about 2 seconds of Python on one core.
MAX_STEPS = 1 << 20
CALL_STEPS = 4
CHARS_PER_STEP = 1024
ITEMS_PER_STEP = 64


# A backstop for what steps do not count (a loop body of a thousand comparisons, a big macro called often):
# one render's time, checked at each step. Real templates render in milliseconds.
MAX_SECONDS = 10.0


class _Budget:
    __slots__ = ("deadline", "steps")

    def __init__(self) -> None:
        self.steps = 0
        self.deadline = time.monotonic() + MAX_SECONDS


_budget: ContextVar[_Budget | None] = ContextVar("qwenkit_template_budget", default=None)


@contextmanager
def render_budget() -> Any:
    """A fresh step budget for one render (a context variable: concurrent renders each get their own)."""
    token = _budget.set(_Budget())
    try:
        yield
    finally:
        _budget.reset(token)


def refuse(message: str) -> NoReturn:
    raise jinja2.exceptions.SecurityError(message)


def step(n: int = 1) -> None:
    """Spend ``n`` steps of this render's budget."""
    budget = _budget.get()
    if budget is None:
        return
    budget.steps += n
    if budget.steps > MAX_STEPS:
        refuse(
            f"the template ran past the sandbox's budget of {MAX_STEPS} steps for one render "
            "(loop iterations, calls, filters, KiB of text)"
        )
    if time.monotonic() > budget.deadline:
        refuse(f"the template ran past the sandbox's limit of {MAX_SECONDS:g} seconds for one render")


def check_size(size: int, what: str = "a string or list") -> None:
    if size > MAX_SIZE:
        refuse(f"{what} of {size} characters or items is over the sandbox's limit of {MAX_SIZE}")


def check_width(width: Any, what: str) -> None:
    """A width, count or indent that sizes a result (an int bigger than MAX_SIZE asks for too much)."""
    if isinstance(width, int) and width > MAX_SIZE:
        refuse(f"{what} of {width} is over the sandbox's limit of {MAX_SIZE}")


def charge(value: Any) -> Any:
    """Check a built value's size and spend its steps; returns the value."""
    if isinstance(value, str):
        check_size(len(value))
        step(len(value) // CHARS_PER_STEP)
    elif isinstance(value, list | tuple | dict):
        check_size(len(value))
        step(len(value) // ITEMS_PER_STEP)
    return value


def text_size(value: Any) -> int:
    """About how many characters ``str(value)`` (or its JSON) holds, refused past MAX_SIZE without
    building it: a list of a million references to a million-item list prints as 10**12 characters.
    A list or mapping met again is counted from its first count, not walked again."""
    if isinstance(value, str):
        return len(value)
    total, items, seen = 0, 0, dict[int, int]()
    stack: list[tuple[Any, int]] = [(value, -1)]
    while stack:
        item, started = stack.pop()
        if started >= 0:  # a container's items are all counted: remember its size
            seen[id(item)] = total - started
            continue
        items += 1
        if isinstance(item, str):
            total += len(item) + 2
        elif isinstance(item, bool | float) or item is None:
            total += 24
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif id(item) in seen:
            total += seen[id(item)]
        elif isinstance(item, Mapping | list | tuple):
            stack.append((item, total))
            if isinstance(item, Mapping):
                total += 2 + 4 * len(item)
                stack.extend((k, -1) for k in item)
                stack.extend((v, -1) for v in item.values())
            else:
                total += 2 + 2 * len(item)
                stack.extend((v, -1) for v in item)
        else:
            total += 64
        check_size(total, "the text of a value")
    step(total // CHARS_PER_STEP + items // ITEMS_PER_STEP)
    return total


def joined_size(items: Iterable[Any], separator: str) -> tuple[list[Any], int]:
    """The items (taken from an iterator once) and the size of their join."""
    items = list(items)
    check_size(len(items), "a joined sequence")
    size = len(separator) * max(len(items) - 1, 0)
    for item in items:
        size += text_size(item)
        check_size(size, "a joined string")
    return items, size


def check_replace(s: str, old: str, new: str, count: Any = -1) -> None:
    found = s.count(old) if old else len(s) + 1
    if isinstance(count, int) and count >= 0:
        found = min(found, count)
    check_size(len(s) + found * (len(new) - len(old)), "a replaced string")


_NUMBER = re.compile(r"\d+")
# printf-style conversion: flags, width and precision (either may be `*`, taken from the arguments)
_PERCENT = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?")


def _check_spec_numbers(numbers: Iterable[str], args: Iterable[Any], star: bool) -> None:
    for number in numbers:
        check_width(int(number), "a format width or precision")
    if star:  # a width or precision given as an argument
        for arg in args:
            check_width(arg, "a format width or precision")


def check_percent(template: str, args: Any) -> None:
    """`"%999999999s" % x` or `"%*s" % (10**9, x)`: widths and precisions, and the values' text."""
    if isinstance(args, Mapping):
        values = list(args.values())
    else:
        values = list(args) if isinstance(args, tuple) else [args]
    for match in _PERCENT.finditer(template):
        numbers = [n for n in match.groups() if n and n != "*"]
        _check_spec_numbers(numbers, values, "*" in match.groups())
    check_size(len(template) + sum(text_size(v) for v in values), "a formatted string")


def check_str_format(template: str, args: tuple, kwargs: Mapping[str, Any]) -> None:
    """`"{:>999999999}".format(x)`: widths and precisions in its fields (nested ones from the arguments)."""
    import _string

    values = [*args, *kwargs.values()]
    for _, field, spec, _ in _string.formatter_parser(template):
        if field is not None and spec:
            _check_spec_numbers(_NUMBER.findall(spec), values, "{" in spec)
    check_size(len(template) + sum(text_size(v) for v in values), "a formatted string")


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) else None


def _center(a: dict[str, Any]) -> None:
    text_size(a["value"])
    check_width(a.get("width", 80), "a center width")


def _indent(a: dict[str, Any]) -> None:
    size = text_size(a["s"])
    width = a.get("width", 4)
    per_line = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
    lines = a["s"].count("\n") + 1 if isinstance(a["s"], str) else size + 1
    check_size(size + lines * per_line, "an indented string")


def _wordwrap(a: dict[str, Any]) -> None:
    size = text_size(a["s"])
    wrap = a.get("wrapstring")
    check_size(size + size * (len(wrap) if isinstance(wrap, str) else 1), "a wrapped string")


def _format(a: dict[str, Any]) -> None:
    if isinstance(a["value"], str):
        check_percent(a["value"], a.get("kwargs") or a.get("args", ()))


def _join(a: dict[str, Any]) -> None:
    if a.get("attribute") is None and isinstance(a.get("d", ""), str):
        a["value"], _ = joined_size(a["value"], a.get("d", ""))


def _replace(a: dict[str, Any]) -> None:
    s, old, new, count = a["s"], a["old"], a["new"], a.get("count")
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        check_replace(s, old, new, -1 if count is None else count)


def _sum(a: dict[str, Any]) -> None:
    """Lists or tuples summed: each `+` copies the sum so far, so the work grows with the square."""
    if isinstance(a.get("start"), list | tuple) and a.get("attribute") is None:
        a["iterable"] = items = list(a["iterable"])
        sizes = [len(item) for item in items if isinstance(item, list | tuple)]
        check_size(len(a["start"]) + sum(sizes), "a summed list")
        step(len(sizes) * (len(a["start"]) + sum(sizes)) // (2 * ITEMS_PER_STEP))


# Filters whose small arguments can ask for a big result, checked (arguments by name) before they run.
_FILTER_CHECKS = {
    "center": _center,
    "indent": _indent,
    "wordwrap": _wordwrap,
    "format": _format,
    "join": _join,
    "replace": _replace,
    "sum": _sum,
    "batch": lambda a: check_width(a["linecount"], "a batch size"),
    "slice": lambda a: check_width(a["slices"], "a slice count"),
}
# Filters that turn their value into text: a list or mapping is sized before it is printed.
_TEXT_FILTERS = frozenset(
    [
        "capitalize",
        "e",
        "escape",
        "forceescape",
        "lower",
        "pprint",
        "safe",
        "string",
        "striptags",
        "title",
        "trim",
        "truncate",
        "upper",
        "urlencode",
        "urlize",
        "wordcount",
    ]
)


def guarded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    """``function`` spending a step, with its arguments checked (``_FILTER_CHECKS``, ``_TEXT_FILTERS``)
    and its result sized; jinja2's pass-context marker is kept."""
    check = _FILTER_CHECKS.get(name)
    signature = inspect.signature(function) if check is not None else None
    value_at = 1 if getattr(function, "jinja_pass_arg", None) is not None else 0
    # jinja2's async-variant filters take a context their wrapped function does not: kept apart from binding
    hidden = value_at if getattr(inspect.unwrap(function), "jinja_pass_arg", None) is None else 0
    is_text = name in _TEXT_FILTERS

    def guarded(*args: Any, **kwargs: Any) -> Any:
        step()
        if signature is not None and check is not None:
            bound = signature.bind(*args[hidden:], **kwargs)
            bound.apply_defaults()
            check(bound.arguments)
            args, kwargs = (*args[:hidden], *bound.args), bound.kwargs
        elif is_text and len(args) > value_at:
            text_size(args[value_at])
        return charge(function(*args, **kwargs))

    return update_wrapper(guarded, function)
