"""Qwen v1 tool use: the ReAct prompt (Qwen's ``examples/react_prompt.md``), the function-calling
instruction of Qwen's ``openai_api.py``, and the parser that turns ``Action:`` / ``Action Input:`` into
a tool call and ``Final Answer:`` into content. ``Observation:`` is the stop word: the tool's result
is what the model must not invent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from qwenkit.tools.calls import ParsedMessage, ToolCall, arguments_json

# examples/react_prompt.md
TOOL_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the "
    "{name_for_human} API useful for? {description_for_model} Parameters: {parameters} Format the "
    "arguments as a JSON object."
)
REACT_PROMPT = """Answer the following questions as best you can. You have access to the following tools:

{tool_descs}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tool_names}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!

Question: {query}"""

# openai_api.py: the same text for "APIs", without the JSON sentence, ending at "Begin!"
API_DESC = (
    "{name_for_model}: Call this tool to interact with the {name_for_human} API. What is the "
    "{name_for_human} API useful for? {description_for_model} Parameters: {parameters}"
)
REACT_INSTRUCTION = """Answer the following questions as best you can. You have access to the following APIs:

{tools_text}

Use the following format:

Question: the input question you must answer
Thought: you should always think about what to do
Action: the action to take, should be one of [{tools_name_text}]
Action Input: the input to the action
Observation: the result of the action
... (this Thought/Action/Action Input/Observation can be repeated zero or more times)
Thought: I now know the final answer
Final Answer: the final answer to the original input question

Begin!"""

STOP_WORDS = ("Observation:", "Observation:\n")


def react_prompt(tools: list[dict[str, Any]], query: str) -> str:
    """The react_prompt.md user message for tools given as {name_for_human, name_for_model,
    description_for_model, parameters}."""
    descs = [
        TOOL_DESC.format(
            name_for_model=t["name_for_model"],
            name_for_human=t["name_for_human"],
            description_for_model=t["description_for_model"],
            parameters=json.dumps(t["parameters"], ensure_ascii=False),
        )
        for t in tools
    ]
    names = ",".join(t["name_for_model"] for t in tools)
    return REACT_PROMPT.format(tool_descs="\n\n".join(descs), tool_names=names, query=query)


def react_instruction(functions: list[dict[str, Any]]) -> str:
    """openai_api.py's instruction for OpenAI ``function`` objects (name, description, parameters). As
    there, a function may set react_prompt.md's own fields: ``name_for_model`` (the name the prompt
    offers, so the one the model writes in its Action), ``name_for_human``, ``description_for_model``."""

    def field(fn: dict[str, Any], key: str, default: str) -> str:
        return fn[key] if isinstance(fn.get(key), str) else default

    texts, names = [], []
    for fn in functions:
        name = field(fn, "name_for_model", fn["name"])
        texts.append(
            API_DESC.format(
                name_for_model=name,
                name_for_human=field(fn, "name_for_human", fn["name"]),
                description_for_model=field(fn, "description_for_model", field(fn, "description", "")),
                parameters=json.dumps(fn.get("parameters", {}), ensure_ascii=False),
            )
        )
        names.append(name)
    return REACT_INSTRUCTION.format(tools_text="\n\n".join(texts), tools_name_text=", ".join(names))


def react_messages(messages: list[dict[str, Any]], functions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """openai_api.py's ``parse_messages``: the instruction goes before the history's last user turn (the
    query's where there is no history) as ``{instruction}\\n\\nQuestion: {text}``; the assistant turns
    after a user turn (calls, results, the answer) become one assistant turn of ReAct text, each call
    ``Thought: …\\nAction: …\\nAction Input: …`` followed by ``\\nObservation: {result}``, a plain
    answer ``Thought: I now know the final answer.\\nFinal Answer: …``. A conversation that ends with a
    tool result ends with that turn open after ``\\nThought:``, for the model to continue
    (``continues_turn``)."""
    out: list[dict[str, Any]] = []

    def assistant(text: str) -> None:
        if out and out[-1]["role"] == "assistant":  # the same ReAct turn goes on
            out[-1] = {**out[-1], "content": f"{out[-1]['content']}\n{text}"}
        else:
            out.append({"role": "assistant", "content": text})

    for n, m in enumerate(messages):
        role, content = m["role"], (m.get("content") or "").lstrip("\n").rstrip()
        if role == "assistant" and m.get("tool_calls"):
            steps = [content if content.startswith("Thought:") else f"Thought: {content}"]
            for call in m["tool_calls"]:
                fn = call["function"]  # checked: an object with a name (template_style.check_calls)
                args = fn.get("arguments")
                args = "{}" if args is None else args
                args = args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)
                steps.append(f"Action: {fn['name']}\nAction Input: {args}")
            assistant("\n".join(steps))
        elif role in ("tool", "function") and out and out[-1]["role"] == "assistant":
            observation = f"{out[-1]['content']}\nObservation: {content}"
            if n == len(messages) - 1:  # the model goes on with its next thought
                observation += "\nThought:"
            out[-1] = {**out[-1], "content": observation}
        elif role == "assistant":
            assistant(f"Thought: I now know the final answer.\nFinal Answer: {content}")
        elif role in ("user", "system"):  # stripped like every content there
            out.append({**m, "content": content})
        else:
            out.append(dict(m))
    # the last user turn of the history (one the assistant answered), or the query where there is none
    # (parse_messages): a follow-up question leaves the instruction on the turn answered with it
    users = [i for i, m in enumerate(out) if m["role"] == "user"]
    if users:
        answered = [i for i in users if i + 1 < len(out) and out[i + 1]["role"] == "assistant"]
        i = answered[-1] if answered and out[-1]["role"] == "user" else users[-1]
        out[i] = {**out[i], "content": f"{react_instruction(functions)}\n\nQuestion: {out[i]['content']}"}
    return out


def continues_turn(messages: list[dict[str, Any]], rendered: list[dict[str, Any]]) -> bool:
    """Whether ``rendered`` (``react_messages`` of ``messages``) ends with the open assistant turn that a
    final tool result leaves: the prompt is then that turn's text, not a new turn (openai_api.py's
    ``text_complete_last_message``)."""
    return (
        bool(messages)
        and messages[-1].get("role") in ("tool", "function")
        and rendered[-1]["role"] == "assistant"
    )


def parse_react(text: str, read_arguments: Callable[[str, str], str | None] | None = None) -> ParsedMessage:
    """openai_api.py's parse_response: the first Action/Action Input pair is a call (the stop word may
    have been swallowed; the reply may open with ``Action:``, as a forced call does); otherwise the text
    after the last ``Final Answer:`` is the content. An Action Input that is not a JSON object cannot be
    sent as OpenAI ``arguments``: ``read_arguments(name, text)`` may read it as the tool's own runner does
    (JSON object text, or None), else the reply is returned verbatim as content, with a warning."""
    padded = "\n" + text
    i, j = padded.find("\nAction:"), padded.find("\nAction Input:")
    k = padded.find("\nObservation:")
    if 0 <= i < j:
        if k < j:
            padded = padded.rstrip() + "\nObservation:"
            k = padded.find("\nObservation:")
        name = padded[i + len("\nAction:") : j].strip()
        raw_args = padded[j + len("\nAction Input:") : k].strip()
        if name:
            arguments, written = arguments_json(raw_args), None
            if arguments is None and read_arguments is not None:
                arguments, written = read_arguments(name, raw_args), raw_args
            if arguments is None:
                warning = (
                    f"the Action Input of {name!r} is not a JSON object; returned as text: {raw_args[:200]!r}"
                )
                return ParsedMessage(text, "", [], [warning])
            thought = padded[:i].strip().removeprefix("Thought:").strip()
            return ParsedMessage(thought, "", [ToolCall(name, arguments, text=written)], [])
    answer = text.rfind("\nFinal Answer: ")
    if answer >= 0:
        return ParsedMessage(text[answer + len("\nFinal Answer: ") :], "", [], [])
    return ParsedMessage(text.removeprefix("Final Answer: "), "", [], [])


def partial_answer(text: str) -> str:
    """The answer of a ReAct reply cut off before its end, as ``parse_react`` would take it whole: what
    follows its ``Final Answer:`` so far; none while it was still thinking or writing an action (that call
    never ran); the text itself where it keeps to no ReAct form (a whole one is its answer so)."""
    padded = "\n" + text
    at = padded.rfind("\nFinal Answer:")
    if at >= 0 and "\nAction:" not in padded[:at]:
        return padded[at + len("\nFinal Answer:") :].strip()
    if any(f"\n{word}:" in padded for word in ("Thought", "Action", "Final Answer")):
        return ""
    return text
