"""`qwenkit template MODEL_DIR messages.json`: print the exact prompt a model's chat template renders."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from qwenkit.command_parser import CommandParser
from qwenkit.errors import QwenkitError
from qwenkit.tokenizer.base import LONE_SURROGATE
from qwenkit.tokenizer.chat_template import compile_template
from qwenkit.tools.calls import offered_functions
from qwenkit.tools.template_style import tool_style


class _InputError(Exception):
    """A messages or tools file that is missing or not the expected JSON shape."""


def _read_json(path: str, what: str) -> Any:
    try:
        text = sys.stdin.read() if path == "-" else Path(path).read_text(encoding="utf-8")
        text.encode("utf-8")  # stdin's undecodable bytes arrive as surrogates, which the tokenizer refuses
        data = json.loads(text)
    except OSError as e:
        raise _InputError(f"cannot read {what} file {path}: {e.strerror}") from None
    except UnicodeError as e:
        raise _InputError(
            f"{what} file {path} is not UTF-8 text (an invalid byte at position {e.start})"
        ) from None
    except json.JSONDecodeError as e:
        raise _InputError(f"{what} file {path} is not valid JSON: {e}") from None
    # JSON's \udXXX escapes may name half a surrogate pair, which json.loads takes as a lone surrogate:
    # printed raw as a stray byte, or a UnicodeEncodeError traceback where stdout is strict
    found = LONE_SURROGATE.search(json.dumps(data, ensure_ascii=False))
    if found is not None:
        raise _InputError(
            f"{what} file {path} is not valid Unicode: it escapes half a surrogate pair "
            f"(\\u{ord(found.group()):04x}), which is no character"
        )
    return data


def _text_parts_joined(path: str, i: int, message: Any) -> Any:
    """A message whose content is OpenAI's list of text parts, with the parts joined as the server joins
    them (the templates got the list itself and failed on it: "'list object' has no attribute ...")."""
    content = message.get("content") if isinstance(message, dict) else None
    if not isinstance(content, list | str | None):  # a number reached the template: "'int object' has ..."
        raise _InputError(
            f"{path}: message {i}'s content must be text or a list of text parts, not {json.dumps(content)}"
        )
    if not isinstance(content, list):
        return message
    if not all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        raise _InputError(
            f'{path}: message {i}\'s content parts must be text parts ({{"type": "text", "text": ...}})'
        )
    return {**message, "content": "".join(p["text"] for p in content)}


def main(argv: list[str] | None = None) -> int:
    """Render messages (OpenAI JSON: a list, or {"messages": [...], "tools": [...]}) with the template."""
    parser = CommandParser(prog="qwenkit template", description=__doc__)
    parser.add_argument("model_dir", help="model directory with the tokenizer files, or a .gguf file")
    parser.add_argument("messages", help="JSON file of messages ('-' reads standard input)")
    parser.add_argument("--tools", help="JSON file of tool definitions (OpenAI format)")
    parser.add_argument(
        "--no-generation-prompt", action="store_true", help="do not open an assistant turn at the end"
    )
    parser.add_argument(
        "--continue-final-message",
        action="store_true",
        help="end the prompt inside the final message, for the model to continue it (a prefilled reply; "
        "implies --no-generation-prompt)",
    )
    parser.add_argument("--ids", action="store_true", help="print the prompt's token ids as JSON instead")
    parser.add_argument(
        "--chat-template",
        metavar="NAME",
        help="render the model's chat template of this name (e.g. default or tool_use), not the one the "
        "tools pick (tool_use where tools are given and the model has it, else default)",
    )
    args = parser.parse_args(argv)

    from qwenkit.generate import tokenizer_for

    try:
        data = _read_json(args.messages, "messages")
        tools = None
        if isinstance(data, dict):
            tools = data.get("tools")
            data = data.get("messages")
        if args.tools:
            tools = _read_json(args.tools, "tools")
        if not isinstance(data, list):
            raise _InputError(f"{args.messages} must hold a JSON list of messages (or {{'messages': [...]}})")
        if isinstance(tools, dict) and "tools" in tools:
            tools = tools["tools"]
        data = [_text_parts_joined(args.messages, i, m) for i, m in enumerate(data)]
        tokenizer = tokenizer_for(args.model_dir)
        name = args.chat_template
        if name is not None and name not in tokenizer.chat_templates:
            has = ", ".join(sorted(tokenizer.chat_templates)) or "one template, without a name"
            raise _InputError(f"{args.model_dir} has no chat template named {name!r} (it has {has})")
        template = tokenizer.chat_template_for(tools or None, name)  # a model's "tool_use" one, offered tools
        if template:  # its syntax error is the model's, not the messages file's
            try:
                compile_template(template)
            except QwenkitError as e:
                raise _InputError(f"{args.model_dir}: {e}") from None
        gen = not (args.no_generation_prompt or args.continue_final_message)
        cont: dict[str, Any] = {"continue_final_message": True} if args.continue_final_message else {}
        if name is not None:
            cont["chat_template"] = name
        style = tool_style(tokenizer, tools, name)
        try:  # a bad message or tool named no file ("chat message 0 must be ..."): say which one
            functions = offered_functions(tools) if tools is not None else []
        except QwenkitError as e:
            raise _InputError(f"{args.tools or args.messages}: {e}") from None
        if tools and style.react:
            print(
                "qwenkit template: this template renders no hermes <tool_call> tools; the prompt below "
                "carries the ReAct instruction the server and the agent write for it "
                "(replies stop at 'Observation:')",
                file=sys.stderr,
            )
        try:
            if args.ids:
                out = json.dumps(style.prompt_ids(tokenizer, data, functions, tools, gen, **cont)) + "\n"
            else:
                out = style.prompt_text(tokenizer, data, functions, tools, gen, **cont)
        except QwenkitError as e:
            raise _InputError(f"{args.messages}: {e}") from None
        sys.stdout.write(out)
        sys.stdout.flush()
    except (QwenkitError, _InputError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
