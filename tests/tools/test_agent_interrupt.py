"""A tool turn cut short (Ctrl-C at a write, in a tool, while the model thinks; a stream closed early;
a round that fails): the agent and the tool chat keep what ran, as a plain chat keeps its answer."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from agent_helpers import ADD, PARAMS, Writes, call, chatml_without_tools, queue

from qwenkit.engine import SamplingParams
from qwenkit.tools.agent import Agent, Tool, ToolError


class CtrlC(Writes):
    """Standard output where Ctrl-C comes once, at the write of ``at`` (a piece of the streamed answer)."""

    def __init__(self, at: str) -> None:
        super().__init__()
        self.at: str | None = at

    def write(self, text: str) -> int:
        if text == self.at:
            self.at = None
            raise KeyboardInterrupt
        return super().write(text)


def recorded_prompts(llm, monkeypatch) -> list[list[int]]:
    prompts: list[list[int]] = []
    submit = llm.submit
    monkeypatch.setattr(
        llm, "submit", lambda prompt, *a, **k: prompts.append(prompt) or submit(prompt, *a, **k)
    )
    return prompts


def test_tool_chat_ctrl_c_keeps_the_calls_that_ran_as_a_plain_chat_keeps_its_answer(
    steered, tmp_path, monkeypatch
):
    """Ctrl-C in the second round of a tool chat dropped the whole turn: the code the interpreter had
    run (its file written) was gone from :history and from the next prompt, which asked the model about
    a conversation where nothing ran. Now the turn stays as far as it went, as a plain chat's answer:
    the question, the round whose tool ran (call and result as the agent keeps them), and the text shown
    of the answer Ctrl-C stopped."""
    from qwenkit.cli import chat as chat_cli

    llm = steered[0]
    code = "open('n.txt', 'w').write('42')\nprint(42)"
    queue(steered, call("code_interpreter", json.dumps({"code": code})))
    queue(steered, "I wrote 42 to n.txt, and then I went on to explain at length why.", "Yes.")
    pieces = [llm.tokenizer.decode([t]) for t in llm.tokenizer.encode("I wrote 42 to n.txt, and then")]
    out = CtrlC(at=pieces[-1])  # Ctrl-C at the write of " then"
    prompts = recorded_prompts(llm, monkeypatch)
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    monkeypatch.setattr("sys.stdin", io.StringIO("Write 42 to n.txt.\n:history\nDid it work?\n"))
    monkeypatch.setattr("sys.stdout", out)
    argv = ["--code-interpreter", "--code-dir", str(tmp_path), "--temperature", "0", "--max-tokens", "120"]
    assert chat_cli.main(argv) == 0
    assert (tmp_path / "n.txt").read_text() == "42"
    # the text given to the terminal, the piece whose write Ctrl-C stopped included (as a plain chat's)
    shown = "I wrote 42 to n.txt, and then"
    printed = "[output]\nstdout:\n\n```\n42\n\n```\nI wrote 42 to n.txt, and\n"
    history = out.getvalue().split(printed, 1)[1]
    assert history.splitlines()[:9] == [
        "user: Write 42 to n.txt.",
        f"assistant: [calls code_interpreter({json.dumps({'code': code})})]",
        "tool: stdout:",
        "",
        "```",
        "42",
        "",
        "```",
        f"assistant: {shown}",
    ]
    third = llm.tokenizer.decode(prompts[2])
    assert third.endswith(
        "<|im_start|>user\nWrite 42 to n.txt.<|im_end|>\n<|im_start|>assistant\n"
        + call("code_interpreter", json.dumps({"code": code}))
        + "<|im_end|>\n<|im_start|>user\n<tool_response>\nstdout:\n\n```\n42\n\n```\n</tool_response>"
        f"<|im_end|>\n<|im_start|>assistant\n{shown}<|im_end|>\n"
        "<|im_start|>user\nDid it work?<|im_end|>\n<|im_start|>assistant\n"
    ), third
    assert not steered[1] and llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_ctrl_c_inside_a_tool_keeps_the_rounds_before_it_and_the_text_shown(steered, monkeypatch):
    """Ctrl-C at a --tools result prompt (raised inside the agent, not at a write): the round whose tool
    ran stays, the interrupted round's calls do not (their results never came), the reply's text does."""
    from qwenkit.cli.chat import ToolChatSession
    from qwenkit.tools.agent import typed_tools

    answers = iter(["sunny, 21C"])

    def ask(name: str, arguments: str) -> str:
        return next(answers)  # the second call: StopIteration, as Ctrl-C: raise KeyboardInterrupt instead

    def typed(name: str, arguments: str) -> str:
        try:
            return ask(name, arguments)
        except StopIteration:
            raise KeyboardInterrupt from None

    specs = [{"name": "get_weather", "parameters": {"type": "object"}}]
    session = ToolChatSession(steered[0], typed_tools(specs, typed), PARAMS)
    queue(steered, call("get_weather", '{"city": "Paris"}'))
    queue(steered, "And Rome:\n" + call("get_weather", '{"city": "Rome"}'))
    with pytest.raises(KeyboardInterrupt):
        assert "".join(session.ask("Weather in Paris and Rome?")) == "And Rome:\n"
    assert session.history == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {
                    "id": session.history[1]["tool_calls"][0]["id"],
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {
            "role": "tool",
            "tool_call_id": session.history[1]["tool_calls"][0]["id"],
            "name": "get_weather",
            "content": "sunny, 21C",
        },
        {"role": "assistant", "content": "And Rome:"},
    ]
    assert not steered[1]


def ctrl_c_after(llm, monkeypatch, text: str) -> None:
    """Ctrl-C once, inside the agent, right after the next reply has written ``text`` (as SIGINT arrives
    while the engine streams: no piece of it need have been shown)."""
    stream = llm.stream

    def interrupted(prompt, *a, **k):
        deltas, written = stream(prompt, *a, **k), ""
        try:
            for delta in deltas:
                written += delta.text
                yield delta
                if text in written:
                    monkeypatch.setattr(llm, "stream", stream)
                    raise KeyboardInterrupt
        finally:
            deltas.close()

    monkeypatch.setattr(llm, "stream", interrupted)


WEATHER = [{"name": "get_weather", "parameters": {"type": "object"}}]


def test_ctrl_c_inside_the_second_call_of_a_reply_keeps_the_first_call_that_ran(steered, monkeypatch):
    """A reply of two calls, Ctrl-C at the second one's result prompt: the round was dropped whole, the
    first call's result (typed, or code the interpreter ran) with it, and only the text shown stayed. Now
    the history keeps the reply with the call that ran and its result, as the next request shows it."""
    from qwenkit.cli.chat import ToolChatSession
    from qwenkit.tools.agent import typed_tools

    results = iter(["sunny, 21C"])

    def typed(name: str, arguments: str) -> str:
        try:
            return next(results)
        except StopIteration:
            raise KeyboardInterrupt from None

    session = ToolChatSession(steered[0], typed_tools(WEATHER, typed), PARAMS)
    paris, rome = call("get_weather", '{"city": "Paris"}'), call("get_weather", '{"city": "Rome"}')
    queue(steered, f"Both:\n{paris}\n{rome}")
    with pytest.raises(KeyboardInterrupt):
        assert "".join(session.ask("Weather in Paris and Rome?")) == "Both:\n"
    call_id = session.history[1]["tool_calls"][0]["id"]
    assert session.history == [
        {"role": "user", "content": "Weather in Paris and Rome?"},
        {
            "role": "assistant",
            "content": "Both:",
            "tool_calls": [
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": {"city": "Paris"}},
                }
            ],
        },
        {"role": "tool", "tool_call_id": call_id, "name": "get_weather", "content": "sunny, 21C"},
    ]
    prompts = recorded_prompts(steered[0], monkeypatch)
    queue(steered, "Paris is sunny.")
    assert "".join(session.ask("And Paris?")) == "Paris is sunny."
    assert (
        steered[0]
        .tokenizer.decode(prompts[0])
        .endswith(
            "<|im_start|>user\nWeather in Paris and Rome?<|im_end|>\n<|im_start|>assistant\nBoth:\n"
            f"{paris}<|im_end|>\n<|im_start|>user\n<tool_response>\nsunny, 21C\n</tool_response><|im_end|>\n"
            "<|im_start|>user\nAnd Paris?<|im_end|>\n<|im_start|>assistant\n"
        )
    )
    assert not steered[1]


def test_ctrl_c_while_a_tool_reply_thinks_keeps_its_thinking_as_a_plain_chat_does(steered, monkeypatch):
    """A plain chat stopped while the model thinks keeps the turn, the thinking as ``reasoning_content``
    and an empty answer; a tool chat kept nothing (no text had been shown), so the question was gone
    from the next prompt. Now it keeps the same, and the thinking of a reply whose tool was stopped."""
    from qwenkit.cli.chat import ToolChatSession
    from qwenkit.tools.agent import typed_tools

    llm = steered[0]
    session = ToolChatSession(llm, [ADD], PARAMS)
    queue(steered, "<think>\nThe user wants a sum, so I call add.\n</think>\n\n" + call("add", "{}"))
    ctrl_c_after(llm, monkeypatch, "so")
    with pytest.raises(KeyboardInterrupt):
        assert "".join(session.ask("What is 2+3?")) == ""
    assert session.history == [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "", "reasoning_content": "The user wants a sum, so"},
    ]
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0
    llm.model.script = None

    # the reply whole, its call stopped: its thinking stays with the text shown
    def typed(name: str, arguments: str) -> str:
        raise KeyboardInterrupt  # at the result prompt

    stopped = ToolChatSession(llm, typed_tools(WEATHER, typed), PARAMS)
    queue(
        steered, "<think>\nLook it up.\n</think>\n\nLet me look.\n" + call("get_weather", '{"city": "Rome"}')
    )
    with pytest.raises(KeyboardInterrupt):
        assert "".join(stopped.ask("Weather in Rome?")) == "Let me look.\n"
    assert stopped.history == [
        {"role": "user", "content": "Weather in Rome?"},
        {"role": "assistant", "content": "Let me look.", "reasoning_content": "Look it up."},
    ]
    assert not steered[1]


def test_ctrl_c_in_a_react_reply_keeps_the_turn_and_the_answer_written(steered, monkeypatch):
    """A ReAct reply shows nothing until it is whole, so Ctrl-C in it kept nothing: the question was gone
    from the next prompt. Now the turn stays as a plain chat's: the answer written so far (what follows
    ``Final Answer:``), or an empty one while the model was still thinking or writing its action."""
    from qwenkit.cli.chat import ToolChatSession

    llm = steered[0]
    monkeypatch.setattr(llm.tokenizer, "chat_template", chatml_without_tools(llm.tokenizer.chat_template))
    for reply, at, kept in [
        (
            "Thought: I know it.\nFinal Answer: It is five, as two and three make five.",
            "two",
            "It is five, as two",
        ),
        ('Thought: I should add.\nAction: add\nAction Input: {"a": 2, "b": 3}', "add\n", ""),
    ]:
        session = ToolChatSession(llm, [ADD], PARAMS)
        queue(steered, reply)
        ctrl_c_after(llm, monkeypatch, at)
        with pytest.raises(KeyboardInterrupt):
            assert "".join(session.ask("What is 2+3?")) == ""
        assert session.history == [
            {"role": "user", "content": "What is 2+3?"},
            {"role": "assistant", "content": kept},
        ]
        assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0
        llm.model.script = None
    assert not steered[1]


def test_a_tool_chat_stopped_before_anything_showed_leaves_the_history_as_it_was(steered):
    from qwenkit.cli.chat import ToolChatSession

    session = ToolChatSession(steered[0], [ADD], PARAMS)
    queue(steered, "The sum is 5.")
    stream = session.ask("What is 2+3?")
    assert next(stream) == "The"
    stream.close()
    assert session.history == [
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "The"},
    ]
    session.history.clear()
    stream = session.ask("What is 2+3?")
    stream.close()  # before it began
    assert session.history == []
    assert steered[0].driver.wait_idle() and steered[0].engine.blocks.usage == 0
    steered[0].model.script = None  # the reply left unplayed plays for no later request


def test_an_agent_stream_closed_early_aborts_its_request_and_runs_no_tool(steered):
    """Agent.stream left by ``break``/``close()``: the request stops at once (KV freed), the call the reply
    was writing never runs, and ``conversation`` holds what happened, the text shown included."""
    llm = steered[0]
    ran = []
    add = Tool("add", lambda a, b: ran.append((a, b)) or a + b, "Add", ADD.parameters)
    long = SamplingParams(max_tokens=1500, temperature=0)
    queue(steered, call("add", '{"a": 2, "b": 3}'))
    queue(steered, "Let me add again, " + "at length " * 500 + call("add", '{"a": 5, "b": 10}'))
    conversation: list[dict] = []
    stream = Agent(llm, [add], params=long).stream("What is 2+3+10?", conversation=conversation)
    pieces = [next(stream) for _ in range(3)]
    stream.close()
    assert llm.driver.wait_idle(timeout=2) and llm.engine.blocks.usage == 0
    assert ran == [(2, 3)]
    assert [m["role"] for m in conversation] == ["user", "assistant", "tool", "assistant"]
    assert conversation[2]["content"] == "5" and conversation[3]["content"] == "".join(pieces).strip()
    llm.model.script = None
    with pytest.raises(ToolError, match="conversation must be an empty list"):
        next(Agent(llm, [add]).stream("hi", conversation=conversation))


def test_a_tool_chat_round_that_fails_after_a_tool_ran_keeps_the_run(steered, capsys):
    """A result too long for the window fails the next reply (one error line): the call that ran stays in
    the history, as Ctrl-C keeps it, where the whole turn was dropped; the next turn's prompt, fitted to
    the window, leaves that turn out (not the history)."""
    from qwenkit.cli.chat import ToolChatSession, answer

    big = Tool("fetch", lambda: "word " * 3000, "Fetch", {"type": "object", "properties": {}})
    session = ToolChatSession(steered[0], [big], PARAMS)
    queue(steered, call("fetch", "{}"))
    assert answer(session, "Fetch it.") is False
    err = capsys.readouterr().err
    assert err.startswith("error: the prompt has ") and err.count("\n") == 1, err
    assert [m["role"] for m in session.history] == ["user", "assistant", "tool"]
    assert session.history[2]["content"] == "word " * 3000
    queue(steered, "Hello.")
    assert answer(session, "Hi.") and session.history[-1] == {"role": "assistant", "content": "Hello."}
    assert len(session.history) == 5 and not steered[1]
