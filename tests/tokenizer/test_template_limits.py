"""A model's chat template (a file of the checkpoint, rendered on every prompt) is bounded per render: no
string or list it builds may exceed MAX_SIZE characters or items, and it may take at most MAX_STEPS steps.
Before, `x|center(10**10)` or `'{:>999999999}'.format(x)` built gigabytes, and three nested `range(100000)`
loops ran 10**15 iterations: `qwenkit serve` hung on one request. Each case here is just past a limit (so
that, unbounded, it renders in a second or two instead of failing), refused in one line naming it."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from tokenizer_data import QWEN3_DIR

from qwenkit.cli import template as template_cli
from qwenkit.tokenizer import HFTokenizer, TokenizerError
from qwenkit.tokenizer.jinja_limits import MAX_SIZE, MAX_STEPS

SIZE = f"is over the sandbox's limit of {MAX_SIZE}"
STEPS = (
    f"chat template failed: the template ran past the sandbox's budget of {MAX_STEPS} steps for one render"
)
MILLION = "'x' * 1000000"

REFUSED = [
    ("{{ 'x'|center(70000000)|length }}", f"a center width of 70000000 {SIZE}"),
    ("{{ 'x'.ljust(70000000)|length }}", f"a ljust width of 70000000 {SIZE}"),
    ("{{ 'x'.zfill(70000000)|length }}", f"a zfill width of 70000000 {SIZE}"),
    ("{{ '{:>70000000}'.format('x')|length }}", f"a format width or precision of 70000000 {SIZE}"),
    ("{{ '{:>{}}'.format('x', 70000000)|length }}", f"a format width or precision of 70000000 {SIZE}"),
    ("{{ ('%70000000s' % 'x')|length }}", f"a format width or precision of 70000000 {SIZE}"),
    ("{{ ('%*s' % (70000000, 'x'))|length }}", f"a format width or precision of 70000000 {SIZE}"),
    ("{{ '%70000000s'|format('x')|length }}", f"a format width or precision of 70000000 {SIZE}"),
    ("{{ 'a\nb'|indent(40000000)|length }}", f"an indented string of 80000003 characters or items {SIZE}"),
    ("{{ range(100000)|join('x' * 1000)|length }}", "a joined string of "),
    (
        "{{ ','.join([" + MILLION + "] * 70)|length }}",
        f"a joined string of 68000069 characters or items {SIZE}",
    ),
    (
        "{{ (" + MILLION + ").replace('x', 'yy' * 40)|length }}",
        f"a replaced string of 80000000 characters or items {SIZE}",
    ),
    ("{{ (" + MILLION + ")|replace('x', 'yy' * 40)|length }}", "a replaced string of 80000000 "),
    (
        "{{ 'x\ty'.expandtabs(70000000)|length }}",
        f"an expanded string of 70000003 characters or items {SIZE}",
    ),
    ("{{ [1]|batch(70000000)|list|length }}", f"a batch size of 70000000 {SIZE}"),
    ("{{ [1]|slice(70000000)|first }}", f"a slice count of 70000000 {SIZE}"),
    # doubled in a loop: seven iterations reach 128 MB
    (
        "{% set ns = namespace(s=" + MILLION + ") %}{% for i in range(7) %}{% set ns.s = ns.s ~ ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        f"a string joined with ~ of 128000000 characters or items {SIZE}",
    ),
    (
        "{% set ns = namespace(s=" + MILLION + ") %}{% for i in range(7) %}{% set ns.s = ns.s + ns.s %}"
        "{% endfor %}{{ ns.s|length }}",
        f"a concatenation of 128000000 characters or items {SIZE}",
    ),
    # the rendered text itself, and a list printed (or written as JSON): sized before it turns into text
    ("{% for i in range(70) %}{{ " + MILLION + " }}{% endfor %}", "the rendered text of 68000000 "),
    ("{% set a = [0] * 1000000 %}{{ [a] * 20 }}", "the text of a value of "),
    ("{% set a = [0] * 1000000 %}{{ ([a] * 20)|tojson|length }}", "the text of a value of "),
    ("{% set a = [0] * 1000000 %}{{ ([a] * 20)|string|length }}", "the text of a value of "),
    ("{{ [[1]]|tojson(indent=40000000)|length }}", "a JSON indent times the nesting depth of 120000000 "),
]
LOOPS = [
    "{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}",
    "{% for i in range(2000) %}{% for j in range(1000) if false %}{% endfor %}{% endfor %}",
    # a recursive loop over a binary tree 21 deep: two million leaves
    "{% set ns = namespace(t=[]) %}{% for i in range(21) %}{% set ns.t = [ns.t, ns.t] %}{% endfor %}"
    "{% for x in [ns.t] recursive %}{{ loop(x) }}{% endfor %}",
    "{% macro f(n) %}{% if n %}{{ f(n - 1) }}{{ f(n - 1) }}{% endif %}{% endmacro %}{{ f(20) }}",
    # lists summed: each `+` copies the sum so far (two billion items copied)
    "{{ ([[0] * 1000] * 2000)|sum(start=[])|length }}",
    # few iterations, each reading a megabyte: a step per KiB
    "{% set s = " + MILLION + " %}{% for i in range(2000) %}{{ s|upper|length }}{% endfor %}",
]


def _with_template(qwen3, source: str) -> HFTokenizer:
    return HFTokenizer(qwen3.backend, {**qwen3.tokenizer_config, "chat_template": source})


def _refused(qwen3, source: str) -> str:
    tok = _with_template(qwen3, source)
    start = time.monotonic()
    with pytest.raises(TokenizerError) as e:
        tok.render_chat_template([{"role": "user", "content": "hi"}])
    assert time.monotonic() - start < 8  # refused, not hung
    assert "\n" not in str(e.value)
    return str(e.value)


@pytest.mark.parametrize(("source", "message"), REFUSED)
def test_a_template_building_a_string_over_the_limit_is_refused(qwen3, source, message):
    assert _refused(qwen3, source).startswith(f"chat template failed: {message}")


@pytest.mark.parametrize("source", LOOPS)
def test_a_template_running_past_the_step_budget_is_refused(qwen3, source):
    assert _refused(qwen3, source).startswith(STEPS)


def test_each_render_has_its_own_budget(qwen3):
    """Most of the budget, twice: the second render starts from nothing, not where the first ended."""
    tok = _with_template(
        qwen3, "{% for i in range(1000) %}{% for j in range(600) %}{% endfor %}{% endfor %}ok"
    )
    assert [tok.render_chat_template([{"role": "user", "content": "hi"}]) for _ in range(2)] == ["ok", "ok"]


def test_sizes_under_the_limits_render_as_before(qwen3):
    tok = _with_template(
        qwen3,
        "{{ 'x'|center(7) }}|{{ '{:>5}'.format('ab') }}|{{ '%-4s|' % 'c' }}{{ '%*d' % (3, 7) }}"
        "|{{ 'a\nb'|indent(2, first=true) }}|{{ [1, 2]|join(', ') }}|{{ {'k': [1]}|tojson(indent=2) }}"
        "|{{ ('x' * 1000000)|length }}|{{ [[1, 2]] ~ 'z' }}",
    )
    out = tok.render_chat_template([{"role": "user", "content": "hi"}])
    assert out == '   x   |   ab|c   |  7|  a\n  b|1, 2|{\n  "k": [\n    1\n  ]\n}|1000000|[[1, 2]]z'


def _conversation(turns: int) -> list[dict]:
    call = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Oslo"}}}
    messages = [{"role": "system", "content": "Be brief."}]
    for i in range(turns):
        messages += [
            {"role": "user", "content": f"Weather {i}? " * 20},
            {"role": "assistant", "content": "<think>\nr\n</think>\n\nLet me look.", "tool_calls": [call]},
            {"role": "tool", "content": '{"sunny": true}'},
            {"role": "assistant", "content": "Sunny."},
        ]
    return messages


def test_a_long_conversation_renders_as_transformers_within_the_budget(qwen3, hf_qwen3):
    """Qwen3's template takes about 10 steps a message: 4,001 messages with tools render as
    transformers renders them, far inside the budget."""
    tools = [
        {"type": "function", "function": {"name": f"f{i}", "description": "d" * 100, "parameters": {}}}
        for i in range(20)
    ]
    messages = _conversation(1000)
    ours = qwen3.render_chat_template(messages, tools=tools, add_generation_prompt=True)
    theirs = hf_qwen3.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)
    assert ours == theirs
    assert len(ours) > 500_000


def test_the_template_command_says_which_limit_in_one_line(tmp_path, capsys):
    model = tmp_path / "m"
    model.mkdir()
    shutil.copy(QWEN3_DIR / "tokenizer.json", model / "tokenizer.json")
    config = json.loads((QWEN3_DIR / "tokenizer_config.json").read_text())
    config["chat_template"] = "{% for i in range(2000) %}{% for j in range(1000) %}{% endfor %}{% endfor %}"
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    messages = tmp_path / "messages.json"
    messages.write_text(json.dumps([{"role": "user", "content": "hi"}]))
    start = time.monotonic()
    assert template_cli.main([str(model), str(messages)]) == 2
    assert time.monotonic() - start < 8
    err = capsys.readouterr().err
    assert err == (f"error: {messages}: {STEPS} (loop iterations, calls, filters, KiB of text)\n")


def test_a_render_past_the_time_limit_is_refused(qwen3, monkeypatch):
    """The backstop for work steps do not count (a loop body of many comparisons): a render's time."""
    from qwenkit.tokenizer import jinja_limits

    monkeypatch.setattr(jinja_limits, "MAX_SECONDS", 0.2)
    body = "{% if i == i %}{% endif %}" * 2000
    message = _refused(qwen3, "{% for i in range(100000) %}" + body + "{% endfor %}")
    assert (
        message
        == "chat template failed: the template ran past the sandbox's limit of 0.2 seconds for one render"
    )
