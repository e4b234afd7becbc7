"""A tokenizer's named chat templates, and which one a call renders, as transformers picks it.

A model may ship several templates: tokenizer_config.json's ``chat_template`` as a list of
``{"name", "template"}`` objects (Hermes-2-Pro's "default" and "tool_use"), or transformers 5's
``additional_chat_templates/<name>.jinja`` files beside ``chat_template.jinja`` (the "default" one).
transformers' ``get_chat_template`` renders "tool_use" where ``tools`` are passed and it exists, else
"default"; one template that holds the tools only in "tool_use" gave a prompt without them when "default"
was always rendered.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from qwenkit.tokenizer.errors import TokenizerError

TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
DEFAULT, TOOL_USE = "default", "tool_use"


def named_templates(value: Any) -> tuple[str | None, dict[str, str]]:
    """(the single template, {}) or (None, the named ones) of a tokenizer_config ``chat_template`` value:
    a string, a list of ``{"name", "template"}`` objects (kept as named, as transformers keeps it, even
    with one entry), a name -> template mapping, or None."""
    if value is None or isinstance(value, str):
        return value, {}
    entries = value.items() if isinstance(value, Mapping) else None
    if isinstance(value, list) and all(
        isinstance(t, Mapping) and isinstance(t.get("name"), str) for t in value
    ):
        entries = [(t["name"], t.get("template")) for t in value]
    if entries is None:
        raise TokenizerError(
            "tokenizer_config.json chat_template must be a string or a list of "
            '{"name": ..., "template": ...} objects'
        )
    named = dict(entries)
    bad = next((name for name, text in named.items() if not isinstance(text, str)), None)
    if bad is not None:
        raise TokenizerError(f"tokenizer_config.json chat_template {bad!r} must be a string")
    return None, named


def template_files(model_dir: Path) -> str | list[dict[str, str]] | None:
    """The templates of a directory's template files, which transformers reads in place of
    tokenizer_config.json's: chat_template.jinja's text alone, the list form where
    additional_chat_templates/ holds named ones (chat_template.jinja's is "default"), or None where
    there are no such files."""
    named: dict[str, str] = {}
    if (model_dir / TEMPLATE_FILE).is_file():
        named[DEFAULT] = _template_text(model_dir / TEMPLATE_FILE)
    extra = model_dir / TEMPLATE_DIR
    for path in sorted(extra.glob("*.jinja")) if extra.is_dir() else []:
        named[path.name.removesuffix(".jinja")] = _template_text(path)
    if not named:
        return None
    if list(named) == [DEFAULT]:
        return named[DEFAULT]
    return [{"name": name, "template": text} for name, text in named.items()]


def _template_text(path: Path) -> str:
    """A template file's text; bytes that are not UTF-8 are one line naming the file (a traceback from
    every command that read the tokenizer)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise TokenizerError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def save_named_templates(named: Mapping[str, str], out: Path) -> list[str]:
    """Write ``named`` as transformers 5's ``save_pretrained`` does (its layout `template_files` reads):
    "default" to chat_template.jinja, each other one to additional_chat_templates/<name>.jinja. A name that
    is no plain file name (a path: a GGUF's or a config's text) is left out, as transformers refuses it.
    The names written."""
    written = []
    for name, text in named.items():
        if name == DEFAULT:
            (out / TEMPLATE_FILE).write_text(text, encoding="utf-8")
        elif name and name == Path(name).name and not name.startswith(".") and "\\" not in name:
            (out / TEMPLATE_DIR).mkdir(exist_ok=True)
            (out / TEMPLATE_DIR / f"{name}.jinja").write_text(text, encoding="utf-8")
        else:
            continue
        written.append(name)
    return written


def pick_template(single: str | None, named: Mapping[str, str], tools: Any) -> str | None:
    """The template a call with ``tools`` renders, as transformers' ``get_chat_template`` picks it:
    "tool_use" when tools are passed (not None) and it exists, else "default"; None where none applies."""
    if not named:
        return single
    if tools is not None and TOOL_USE in named:
        return named[TOOL_USE]
    return named.get(DEFAULT)


def no_default_error(named: Mapping[str, str]) -> TokenizerError:
    """Refusal of a call no named template serves (no "default", and no tools for "tool_use")."""
    names = ", ".join(sorted(named))
    return TokenizerError(
        f"this model has several chat templates ({names}) and none named 'default' to render this "
        "conversation with"
    )
