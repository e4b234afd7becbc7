"""Qwen3's thinking in the chat API and the ``chat`` command: the reply's ``<think>`` block comes apart
from its answer (the same split as the server's), and the history keeps them as Qwen3's template reads
them back, so a reply cut off while thinking goes back as an empty answer, not an open ``<think>``.

A steered model (``tools/scripted.py``) writes the thinking a trained Qwen3 would; the engine,
detokenizer, template and splitter all run for real."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent / "tools"))

from scripted import ScriptedModel, steer_next_request

import qwenkit.cli.chat as chat_cli
from qwenkit.chat import ChatSession, chat, chat_message, chat_stream
from qwenkit.cli import main
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.tokenizer import chatml_template

THOUGHT = "<think>\nThe capital of France is Paris.\n</think>\n\nParis."
GREEDY = SamplingParams(temperature=0, max_tokens=60)
USER = [{"role": "user", "content": "Capital of France?"}]


@pytest.fixture(scope="module")
def steered(tiny_chat_model):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=2, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    llm = LLM(model, loaded.tokenizer, max_batch_size=2, max_seq_len=2048)
    return llm, steer_next_request(llm, model)


@pytest.fixture
def llm(steered):
    return steered[0]


@pytest.fixture
def prompts(llm, monkeypatch):
    """The prompt ids of every request the LLM streams."""
    seen: list[list[int]] = []
    stream = llm.stream
    monkeypatch.setattr(
        llm, "stream", lambda prompt, *a, **k: seen.append(list(prompt)) or stream(prompt, *a, **k)
    )
    return seen


def queue(steered, *replies: str) -> None:
    llm, pending = steered
    pending.extend(llm.tokenizer.encode(r, allow_special=True) for r in replies)


def test_the_answer_is_the_text_and_the_thinking_its_reasoning(steered, llm):
    queue(steered, THOUGHT)
    deltas = list(chat_stream(llm, USER, GREEDY))
    assert "".join(d.text for d in deltas) == "Paris."
    assert "".join(d.reasoning for d in deltas) == "The capital of France is Paris."
    ids = llm.tokenizer.encode(THOUGHT, allow_special=True)
    assert ids[0] == 151667 and 151668 in ids  # <think> and </think>, one token each
    done = deltas[-1].completion
    assert (done.text, done.token_ids[: len(ids)], done.finish_reason) == (THOUGHT, ids, "stop")
    queue(steered, THOUGHT)
    assert chat_message(llm, USER, GREEDY) == {
        "role": "assistant",
        "content": "Paris.",
        "reasoning_content": "The capital of France is Paris.",
    }
    queue(steered, THOUGHT)
    assert chat(llm, USER, GREEDY) == "Paris."


def test_the_next_turn_gets_the_answer_alone(steered, llm, prompts):
    session = ChatSession(llm, GREEDY)
    queue(steered, THOUGHT)
    assert "".join(session.ask("Capital of France?")) == "Paris."
    assert session.history[1] == {
        "role": "assistant",
        "content": "Paris.",
        "reasoning_content": "The capital of France is Paris.",
    }
    queue(steered, "<think>\nA big one.\n</think>\n\nAbout 2 million.")
    pieces = list(session.stream("Population?"))
    assert "".join(p.reasoning for p in pieces) == "A big one."
    assert "".join(p.text for p in pieces) == "About 2 million."
    second = (
        "<|im_start|>user\nCapital of France?<|im_end|>\n<|im_start|>assistant\nParis.<|im_end|>\n"
        "<|im_start|>user\nPopulation?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts[1] == llm.tokenizer.encode(second, allow_special=True)


def test_a_reply_cut_off_while_thinking_goes_back_as_an_empty_answer(steered, llm, prompts):
    """Cut by max_tokens inside its <think>: all of it is reasoning, there is no answer, and the next
    turn's prompt shows an empty assistant turn (the open <think> went back into it)."""
    ids = llm.tokenizer.encode(
        "<think>\nStep one. Step two. Step three.\n</think>\n\nDone.", allow_special=True
    )
    cut = next(k for k in range(len(ids)) if llm.tokenizer.decode(ids[:k]).endswith("Step two."))
    assert llm.tokenizer.decode(ids[:cut]) == "<think>\nStep one. Step two."
    steered[1].append(ids)
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=cut))
    pieces = list(session.stream("Count."))
    assert ("".join(p.text for p in pieces), "".join(p.reasoning for p in pieces)) == (
        "",
        "Step one. Step two.",
    )
    assert session.completion.finish_reason == "length" and session.completion.token_ids == ids[:cut]
    assert session.history[1] == {
        "role": "assistant",
        "content": "",
        "reasoning_content": "Step one. Step two.",
    }
    queue(steered, "Ok.")
    assert "".join(session.ask("Go on.")) == "Ok."
    second = (
        "<|im_start|>user\nCount.<|im_end|>\n<|im_start|>assistant\n<|im_end|>\n"
        "<|im_start|>user\nGo on.<|im_end|>\n<|im_start|>assistant\n"
    )
    assert prompts[1] == llm.tokenizer.encode(second, allow_special=True)


def test_a_prompt_that_opens_the_block_starts_the_reply_inside_it(steered, llm, prompts, monkeypatch):
    """Thinking-only templates (Qwen3-2507 Thinking) end the generation prompt with ``<think>\\n``: the
    reply is reasoning up to its ``</think>``."""
    template = llm.tokenizer.chat_template
    opened = template.replace(
        "{{- '<|im_start|>assistant\\n' }}", "{{- '<|im_start|>assistant\\n<think>\\n' }}"
    )
    assert opened != template
    monkeypatch.setattr(llm.tokenizer, "chat_template", opened)
    queue(steered, "Hmm, yes.\n</think>\n\nYes.")
    assert chat_message(llm, USER, GREEDY) == {
        "role": "assistant",
        "content": "Yes.",
        "reasoning_content": "Hmm, yes.",
    }
    assert llm.tokenizer.decode(prompts[0]).endswith("<|im_start|>assistant\n<think>\n")


def test_a_template_that_does_not_think_keeps_the_text_verbatim(steered, llm, monkeypatch):
    """Qwen2.5's or SmolLM's template knows no <think>: whatever the model writes is its answer."""
    monkeypatch.setattr(llm.tokenizer, "chat_template", chatml_template())
    queue(steered, THOUGHT)
    deltas = list(chat_stream(llm, USER, GREEDY))
    assert "".join(d.text for d in deltas) == THOUGHT and not any(d.reasoning for d in deltas)
    session = ChatSession(llm, GREEDY)
    queue(steered, THOUGHT)
    "".join(session.ask("Capital of France?"))
    assert session.history[1] == {"role": "assistant", "content": THOUGHT}


@pytest.mark.parametrize(
    ("tty", "flags", "shown"),
    [
        (False, [], "<think>\nThe capital of France is Paris.\n</think>\n\nParis.\n"),
        (True, [], "\x1b[2mThe capital of France is Paris.\x1b[22m\n\nParis.\n"),
        (False, ["--hide-thinking"], "Paris.\n"),
        (True, ["--hide-thinking"], "Paris.\n"),
    ],
    ids=["pipe", "terminal", "pipe-hidden", "terminal-hidden"],
)
def test_chat_command_shows_the_thinking_apart(
    steered, llm, tiny_chat_model, monkeypatch, capsys, tty, flags, shown
):
    monkeypatch.setattr(chat_cli, "load_llm", lambda args: llm)
    monkeypatch.setattr(sys.stdout, "isatty", lambda: tty)
    queue(steered, THOUGHT)
    assert main(["chat", str(tiny_chat_model), "-p", "Capital of France?", "--temperature", "0", *flags]) == 0
    out = capsys.readouterr()
    assert (out.out, out.err) == (shown, "")


def test_a_terminal_is_undimmed_when_the_reply_stops_while_thinking(steered, llm, monkeypatch, capsys):
    """The dim ends with the reply, which here is cut off inside its thinking."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    queue(steered, THOUGHT)
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=4))
    assert chat_cli.answer(session, "Capital of France?")
    out = capsys.readouterr()
    assert out.out == "\x1b[2mThe capital\x1b[22m\n"
    assert out.err == "[stopped at max_tokens=4; raise it with :conf max_tokens=N]\n"
    assert session.history[1] == {"role": "assistant", "content": "", "reasoning_content": "The capital"}


def test_a_pipe_gets_the_closing_think_line_when_the_reply_stops_while_thinking(
    steered, llm, monkeypatch, capsys
):
    """In a pipe the thinking sits between ``<think>`` and ``</think>`` lines, also when max_tokens cuts
    the reply off inside it: a reader of the output never meets an open block (the block was left open)."""
    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    queue(steered, THOUGHT)
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=4))
    assert chat_cli.answer(session, "Capital of France?")
    out = capsys.readouterr()
    assert out.out == "<think>\nThe capital\n</think>\n"
    assert out.err == "[stopped at max_tokens=4; raise it with :conf max_tokens=N]\n"


def test_ctrl_c_while_thinking_closes_the_block_in_a_pipe(monkeypatch, capsys):
    """Ctrl-C closes the stream mid-thinking (a closed generator cannot yield): the ``</think>`` line
    is still written, then the notice."""
    from qwenkit.generate import Delta

    class Session:  # what chat_cli.answer reads of a ChatSession
        def stream(self, text):
            yield Delta([1], "", reasoning="Let me")
            raise KeyboardInterrupt

    monkeypatch.setattr(sys.stdout, "isatty", lambda: False)
    assert chat_cli.answer(Session(), "Capital of France?")
    out = capsys.readouterr()
    assert (out.out, out.err) == ("<think>\nLet me\n</think>\n", "[interrupted]\n")
