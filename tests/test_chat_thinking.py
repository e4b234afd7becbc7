"""Qwen3's thinking switch in the chat front ends: ``ChatSession(template_kwargs=...)``, the tool agent's
``template_kwargs`` and ``qwenkit chat --no-thinking`` render the template with ``enable_thinking=False``
(the prompt closes an empty ``<think>`` block, so the model answers at once), every turn; a template
without the switch refuses the flag rather than ignore it."""

from __future__ import annotations

import json
import shutil

import pytest

from qwenkit.chat import ChatError, ChatSession, chat, chat_message, chat_stream
from qwenkit.cli import main
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.tools.agent import Agent, Tool, ToolError

EMPTY_THINK = [151667, 271, 151668, 271]  # "<think>\n\n</think>\n\n"


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, progress=False)


@pytest.fixture
def prompts(monkeypatch):
    """The prompt ids of every request the LLM streams."""
    seen: list[list[int]] = []
    stream = LLM.stream

    def recording(self, prompt, params=None, *args, **kwargs):
        seen.append(list(prompt))
        return stream(self, prompt, params, *args, **kwargs)

    monkeypatch.setattr(LLM, "stream", recording)
    return seen


def test_a_session_without_thinking_closes_the_block_every_turn(llm, prompts):
    session = ChatSession(
        llm, SamplingParams(temperature=0, max_tokens=3), template_kwargs={"enable_thinking": False}
    )
    "".join(session.ask("one"))
    "".join(session.ask("two"))
    history = [*session.history[:2], {"role": "user", "content": "two"}]
    expected = llm.tokenizer.apply_chat_template(history, add_generation_prompt=True, enable_thinking=False)
    assert prompts[1] == expected and prompts[1][-4:] == EMPTY_THINK and prompts[0][-4:] == EMPTY_THINK
    default = ChatSession(llm, SamplingParams(temperature=0, max_tokens=3))
    "".join(default.ask("one"))
    assert prompts[2] == prompts[0][:-4]  # thinking on: the template's own default
    with pytest.raises(ChatError, match="template_kwargs must be a dict"):
        ChatSession(llm, None, template_kwargs="enable_thinking=False")


@pytest.mark.parametrize(
    "front", [chat, chat_message, lambda *a, **k: "".join(d.text for d in chat_stream(*a, **k))]
)
def test_a_sampling_setting_passed_as_a_template_argument_is_refused(llm, prompts, front):
    """``chat(llm, messages, max_tokens=5)`` read max_tokens as a chat template variable, which the
    template ignores: the reply ran to the model's default length. The keyword arguments are the
    template's (``enable_thinking=False``); a sampling setting there is refused, before anything runs."""
    user = [{"role": "user", "content": "hi"}]
    with pytest.raises(ChatError, match=r"^max_tokens is a sampling setting, not a chat template argument: "):
        front(llm, user, max_tokens=5)
    with pytest.raises(ChatError, match=r"pass params=SamplingParams\(temperature=\.\.\.\)"):
        front(llm, user, SamplingParams(max_tokens=2), temperature=0)
    assert prompts == []
    front(llm, user, SamplingParams(temperature=0, max_tokens=2), enable_thinking=False)
    assert prompts[0][-4:] == EMPTY_THINK


def test_a_session_refuses_a_sampling_setting_in_template_kwargs(llm):
    with pytest.raises(ChatError, match=r"^seed is a sampling setting, not a chat template argument"):
        ChatSession(llm, None, template_kwargs={"seed": 3})


def test_an_agent_without_thinking(llm, prompts):
    tool = Tool("now", lambda: "12:00", "the time", {"type": "object", "properties": {}})
    agent = Agent(
        llm,
        [tool],
        params=SamplingParams(temperature=0, max_tokens=3),
        template_kwargs={"enable_thinking": False},
    )
    agent.run("time?")
    assert prompts[0][-4:] == EMPTY_THINK
    assert prompts[0] == agent.style.tool_prompt(
        llm.tokenizer, [{"role": "user", "content": "time?"}], [tool.spec()], enable_thinking=False
    )
    with pytest.raises(ToolError, match="template_kwargs must be a dict"):
        Agent(llm, [tool], template_kwargs=["enable_thinking"])


@pytest.mark.parametrize("tools", [[], ["--code-interpreter"]], ids=["chat", "tool-chat"])
def test_chat_cli_no_thinking(tiny_chat_model, prompts, capsys, tools):
    assert (
        main(["chat", str(tiny_chat_model), "-p", "hi", "--max-new-tokens", "2", "--no-thinking", *tools])
        == 0
    )
    assert main(["chat", str(tiny_chat_model), "-p", "hi", "--max-new-tokens", "2", *tools]) == 0
    assert prompts[0][-4:] == EMPTY_THINK and prompts[1] == prompts[0][:-4]


@pytest.mark.parametrize("tools", [[], ["--code-interpreter"]], ids=["chat", "tool-chat"])
def test_no_thinking_is_refused_by_a_template_without_the_switch(tiny_chat_model, tmp_path, capsys, tools):
    """Refused from the template alone, before the weights load: here they are not even readable."""
    model = shutil.copytree(tiny_chat_model, tmp_path / "no-switch")
    (model / "model.safetensors").write_bytes(b"not a safetensors file")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        config["chat_template"]
        .replace("enable_thinking is defined and ", "")
        .replace("enable_thinking is false", "false")
    )
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert main(["chat", str(model), "-p", "hi", "--max-new-tokens", "2", "--no-thinking", *tools]) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [
        "error: --no-thinking: this model's chat template has no thinking switch (enable_thinking)"
    ]


def test_no_thinking_help_says_the_soft_switch_holds_until_the_next(capsys):
    """Qwen3 follows the latest /think or /no_think of a conversation (its model card), so /no_think is
    not a one-turn switch, as the help said."""
    with pytest.raises(SystemExit):
        main(["chat", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert (
        "without it, /no_think or /think in a message switches it from that turn on "
        "(Qwen3 follows the latest)" in help_text
    )
    assert "for one turn" not in help_text


def test_a_reply_stopped_early_closes_the_sessions_stream():
    """Ctrl-C stops the printed reply: the session's stream under it is closed then, so its turn joins
    the history at once, not when CPython happens to free the abandoned stream (here a reference is
    kept, as another implementation's collector would)."""
    from qwenkit.cli.chat import with_thinking
    from qwenkit.generate import Delta

    closed = []

    def stream():
        try:
            yield Delta([1], "Par", None)
            yield Delta([2], "is.", None)
        finally:
            closed.append(True)

    held = stream()
    printed = with_thinking(held, hide=False)
    assert next(printed) == "Par"
    printed.close()
    assert closed == [True]
