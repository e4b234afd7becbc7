"""The chat's answers as users get them: one-shot -p (and the Python chat API), an empty question or
bad context refused, answers cut off or failing midway, a tool chat that outgrows its window."""

from __future__ import annotations

import subprocess

import pytest
from chat_driver import QWENKIT, run_chat

from qwenkit.chat import ChatSession, chat
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, progress=False)


def test_chat_refuses_an_empty_question_and_a_bad_context(tiny_chat_model):
    for stdin, args, message in [
        ("", ["-p", "  "], "error: the question is empty\n"),
        (" \n", ["-p", "-"], "error: the question is empty\n"),  # read before the model loads
        (
            "",
            ["-p", "hi", "--max-context", "-5"],
            "error: argument --max-context: must be at least 2 tokens (a prompt token and one to generate), "
            "got -5; see `qwenkit chat --help`\n",
        ),
    ]:
        r = run_chat(tiny_chat_model, stdin, *args)
        assert (r.returncode, r.stderr) == (2, message)


def test_one_shot_prompt_and_python_chat_api(tiny_chat_model, llm):
    r = subprocess.run(
        [
            *QWENKIT,
            "chat",
            str(tiny_chat_model),
            "-p",
            "hi",
            "--temperature",
            "1",
            "--seed",
            "3",
            "--top-k",
            "0",
            "--top-p",
            "1",
            "--max-new-tokens",
            "6",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    params = SamplingParams(temperature=1, seed=3, max_tokens=6)
    reply = chat(llm, [{"role": "user", "content": "hi"}], params)
    assert r.stdout.strip() == reply and reply
    session = ChatSession(llm, SamplingParams(temperature=0, max_tokens=4), system="sys")
    first = "".join(session.ask("one"))
    "".join(session.ask("two"))
    assert [m["role"] for m in session.history] == ["user", "assistant", "user", "assistant"]
    assert session.history[1]["content"] == first.strip()


def test_an_answer_that_fails_midway_ends_its_line_before_the_error(tmp_path):
    """The model breaks on a token it wrote itself (its embedding row is NaN, so the step after it has
    NaN logits): the error began on the answer's own line ("Hello world booming: the model produced...")."""
    from factories import write_tiny_chat_model
    from safetensors.torch import load_file, save_file

    from qwenkit.generate import tokenizer_for

    model = write_tiny_chat_model(tmp_path / "breaks", tie_word_embeddings=False)
    tokenizer = tokenizer_for(model)
    said = [tokenizer.encode(piece)[0] for piece in ("Hello", " world", " boom")]
    weights = load_file(model / "model.safetensors")
    weights["model.embed_tokens.weight"][said[-1]] = float("nan")
    save_file(weights, str(model / "model.safetensors"), metadata={"format": "pt"})
    bias = [(token, 100.0 - 2 * k) for k, token in enumerate(said)]
    greedy = ["--temperature", "0", "--repetition-penalty", "10", "--max-new-tokens", "8"]
    error = "error: the model produced NaN/inf logits in float32: the checkpoint may be corrupt"

    script = f":conf logit_bias={bias}\nhi\n:history\n"
    r = run_chat(model, script, *greedy, "--dtype", "float32")
    assert (r.returncode, r.stderr) == (1, f"{error}\n")
    assert (
        "\nHello world boom\nuser: hi\nassistant: Hello world boom\n" in r.stdout
    )  # the part that came stays
    # both streams into one (a terminal, 2>&1): the error on its own line, after the answer's part
    merged = subprocess.run(
        [*QWENKIT, "chat", str(model), *greedy, "--dtype", "float32"],
        input=script,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=120,
    )
    assert f"\nHello world boom\n{error}\nuser: hi\n" in merged.stdout
    # a question asked once (-p) that fails is a failed command: one line on stderr, exit 2
    r = run_chat(model, "", "-p", "say boom", *greedy, "--dtype", "float32")
    assert (r.returncode, r.stdout, r.stderr) == (2, "", f"{error}\n")


def test_an_answer_cut_off_says_so_on_stderr(tiny_chat_model):
    """An answer that stopped at max_tokens ended as if the model had finished: now one line on stderr
    says which limit cut it and how to raise it; an answer the model ends itself gets none."""
    r = run_chat(tiny_chat_model, "", "-p", "hi", "--max-new-tokens", "3", "--temperature", "0")
    assert (r.returncode, r.stderr) == (0, "[stopped at max_tokens=3; raise it with --max-new-tokens N]\n")
    assert r.stdout.endswith("\n")
    # the window, not max_tokens, cut it
    r = run_chat(
        tiny_chat_model, "hi\n", "--max-new-tokens", "500", "--max-context", "40", "--temperature", "0"
    )
    assert (r.returncode, r.stderr) == (0, "[stopped: the 40-token context window is full]\n")
    # the bundled model (the default) ends this answer itself: nothing on stderr
    question = "What is 2+2? Answer in one short sentence."
    r = subprocess.run(
        [*QWENKIT, "chat", "-p", question, "--temperature", "0", "--max-new-tokens", "64"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (r.returncode, r.stderr) == (0, "")
    assert "4" in r.stdout


def test_a_tool_chat_that_outgrows_the_window_drops_its_oldest_turns():
    """A plain chat leaves its oldest turns out of the prompt when the window fills; a tool chat did not,
    so once it outgrew the window every message failed ("the prompt has 423 tokens; the context window
    is 400 ...") until :clear-history. Now it fits as a plain chat does, and :history keeps every turn."""
    questions = ["hi", "hello again, tell me more", "and more"]
    script = "\n".join([*questions, ":history"]) + "\n"
    args = ["--code-interpreter", "--max-context", "400", "--temperature", "0", "--max-new-tokens", "60"]
    r = subprocess.run(  # the bundled model (the default), whose answers fill the window
        [*QWENKIT, "chat", *args], input=script, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "error" not in r.stderr, r.stderr
    asked = [line for line in r.stdout.splitlines() if line.startswith("user: ")]
    assert asked == [f"user: {q}" for q in questions]
