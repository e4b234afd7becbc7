"""The chat's `:commands` over stdin: :history, :clear, :seed, :system, :conf (its settings checked,
applied to the next answer and shown as it takes them), a doubled colon, and the errors of each."""

from __future__ import annotations

import pytest
from chat_driver import run_chat

from qwenkit.cli.chat_commands import CommandError, parse_conf, split_assignments
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

KNOWN = (  # the settings :conf takes
    "max_tokens, temperature, top_p, top_k, min_p, repetition_penalty, presence_penalty, "
    "frequency_penalty, seed, stop, include_stop_str_in_output, logit_bias"
)


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, progress=False)


def test_commands_history_and_errors_over_stdin(tiny_chat_model):
    script = (
        "\n".join(
            [
                "hello there",
                ":history",
                ":conf bogus=1",
                ":conf temperature=-1",
                ":conf temperature=__import__('os')",
                ":seed x",
                ":seed 99999999999999999999999",
                ":frobnicate",
                ":clear",
                ":clear-history",
                ":history",
                ":system Be brief.",
                "second question",
                ":history",
                ":exit",
                "never reached",
            ]
        )
        + "\n"
    )
    r = run_chat(tiny_chat_model, script, "--max-new-tokens", "5", "--temperature", "0")
    # Errors went to stdout and the script exited 0: now each is one line on stderr, the chat goes on,
    # and a script in which a line failed ends with 1.
    assert r.returncode == 1, r.stderr
    out = r.stdout
    assert "user: hello there" in out and "error" not in out
    stop = "[stopped at max_tokens=5; raise it with :conf max_tokens=N]"
    assert r.stderr.splitlines() == [
        stop,
        f"error: unknown :conf key 'bogus'; known: {KNOWN}",
        "error: temperature must be >= 0, got -1",
        "error: value for temperature must be a literal such as 0.7, 20, None or 'text'; "
        "got \"__import__('os')\"",
        "error: :seed needs an integer, got 'x'",
        # an integer past 64 bits was said not to be an integer
        "error: seed must fit in 64 bits (-9223372036854775808..18446744073709551615), "
        "got 99999999999999999999999",
        "error: unknown command :frobnicate; type :help, or ::frobnicate to send it as a message",
        stop,
    ]
    after_clear = out.split("[history cleared]")[1]
    assert "[history is empty]" in after_clear and "user: hello there" not in after_clear
    assert "user: second question" in after_clear and "never reached" not in out
    # :clear writes no terminal codes into a pipe (the random model may print an ESC of its own)
    assert "\033[2J" not in out and "\033[H" not in out
    # the same script without its failing lines ends with 0
    good = "\n".join(line for line in script.splitlines() if line.startswith((":history", ":exit", "hello")))
    r = run_chat(tiny_chat_model, good + "\n", "--max-new-tokens", "5", "--temperature", "0")
    assert (r.returncode, r.stderr) == (0, stop + "\n")


def test_a_message_that_starts_with_a_colon(tiny_chat_model):
    """A line starting with ':' was always a command, so ':) thanks' could not be sent: a doubled colon
    sends the rest as the message, and an unknown command's error says so."""
    script = ":help\n:) thanks\n::) thanks\n:param x\n::param x\n::\n:history\n"
    r = run_chat(tiny_chat_model, script, "--max-new-tokens", "2", "--seed", "1")
    assert r.returncode == 1, r.stderr
    lines = r.stdout.splitlines()
    assert [line for line in lines if line.startswith("user: ")] == [
        "user: :) thanks",
        "user: :param x",
        "user: :",
    ]
    assert "  ::TEXT                send :TEXT as a message (e.g. ::) thanks)" in lines
    errors = [line for line in r.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        "error: unknown command :); type :help, or ::) thanks to send it as a message",
        "error: unknown command :param; type :help, or ::param x to send it as a message",
    ]


def test_a_failed_answer_or_a_mistyped_setting_keeps_the_chat(tiny_chat_model):
    """Errors while answering (a setting the engine refuses, a message too long for the window) are one
    line and the chat goes on, its history without the failed turn; :conf checks each value's type."""
    script = "\n".join(
        [
            "hello",
            ":conf top_k=2.7",
            ":conf seed=1.5",
            ":conf stop=5",
            ":conf temperature='hot'",
            ":conf stop='a b' max_tokens=3",
            ":conf stop='open",
            ":seed",
            ":conf adapter='foo'",
            ":conf logit_bias={10000000: 1}",
            "this turn fails",
            ":reset-conf",
            "word " * 80,
            "third",
            ":history",
        ]
    )
    r = run_chat(
        tiny_chat_model, script + "\n", "--max-new-tokens", "4", "--max-context", "64", "--seed", "7"
    )
    assert r.returncode == 1, r.stderr
    out, errors = r.stdout, r.stderr
    for message in [
        "error: top_k must be an integer, got 2.7\n",
        "error: seed must be an integer or None, got 1.5\n",
        "error: stop must be a list or a string, got 5\n",
        "error: temperature must be a number, got 'hot'\n",
        'error: a quote or bracket is not closed in "stop=\'open"\n',
        f"error: :conf cannot set adapter: it is not a chat setting; known: {KNOWN}\n",
        "error: logit_bias token id 10000000 is outside the vocabulary (0..151935)\n",
        "error: the message needs ",
    ]:
        assert message in errors and message not in out, message
    assert "\nstop=['a b']\n" in out and "[seed = 7]" in out and "error" not in out
    history = out.rsplit("[settings reset]", 1)[1]  # what :history printed at the end
    assert "user: hello" in history and "user: third" in history
    assert "this turn fails" not in history and "word word" not in history
    assert "Traceback" not in errors


def test_conf_really_applies_to_the_next_answer(tiny_chat_model, llm):
    # Greedy, one token: the reply must be exactly the model's first greedy token after the chat prompt.
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])
    expected = llm.generate(prompt, SamplingParams(temperature=0, max_tokens=1, ignore_eos=True))[
        0
    ].text.strip()
    r = run_chat(tiny_chat_model, ":conf temperature=0 max_tokens=1\nhi\n:history\n")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("temperature=0\nmax_tokens=1\n\n")  # the settings set, then the answer
    assert f"assistant: {expected}\n" in r.stdout
    # :reset-conf goes back: now 5 tokens of sampled text, not 1
    params = parse_conf(SamplingParams(), ["top_k=3", "stop='x'", "seed=None"])
    assert (params.top_k, params.stop, params.seed) == (3, ("x",), None)
    with pytest.raises(CommandError, match="expected key=value"):
        parse_conf(params, ["temperature"])
    # a dict or nested list with spaces is one value: it was cut at its first space ("got '{9707:'")
    items = split_assignments("logit_bias={9707: 5.0, 1879: -100} stop=[('a b'), ['c]']] top_k=2")
    assert items == ["logit_bias={9707: 5.0, 1879: -100}", "stop=[('a b'), ['c]']]", "top_k=2"]
    params = parse_conf(params, split_assignments("logit_bias={9707: 5.0, 1879: -100}  stop=['a b', 'c']"))
    assert (params.logit_bias, params.stop) == (((1879, -100.0), (9707, 5.0)), ("a b", "c"))
    for unclosed in ("logit_bias={1: [2, 3}", "stop='a b", "stop=[('a', 'b']"):
        with pytest.raises(CommandError, match="a quote or bracket is not closed"):
            split_assignments(unclosed)


def test_conf_shows_each_setting_on_its_line_as_conf_takes_it(tiny_chat_model):
    """:conf alone lists the chat's settings one a line, each as ``key=value`` typed back to :conf (it was
    one line of the engine's reprs: stop=('a b',), logit_bias=((9707, 5.0),)), so a line can be copied;
    a change shows the settings it set. The engine's own fields (grammar, adapter, ignore_eos, ...) are
    neither shown nor set: the whole list, internal fields with it, followed every change."""
    args = ("--max-new-tokens", "3", "--temperature", "0", "--top-p", "0.8", "--top-k", "20")
    script = ":conf stop='a b' logit_bias={9707: 5} top-k=20\n:conf\n:conf ignore_eos=True\n"
    r = run_chat(tiny_chat_model, script, *args)
    assert r.returncode == 1
    assert r.stderr == f"error: :conf cannot set ignore_eos: it is not a chat setting; known: {KNOWN}\n"
    shown = r.stdout.rstrip("\n").splitlines()  # the chat ends its last line at the end of its input
    every = [
        "max_tokens=3",
        "temperature=0.0",
        "top_p=0.8",
        "top_k=20",
        "min_p=0.0",
        "repetition_penalty=1.0",
        "presence_penalty=0.0",
        "frequency_penalty=0.0",
        "seed=None",
        "stop=['a b']",
        "include_stop_str_in_output=False",
        "logit_bias={9707: 5.0}",
    ]
    assert shown == ["stop=['a b']", "logit_bias={9707: 5.0}", "top_k=20", *every]
    again = run_chat(tiny_chat_model, f":conf {' '.join(every)}\n")  # the defaults of the model, then these
    assert (again.returncode, again.stderr, again.stdout.rstrip("\n").splitlines()) == (0, "", every)
