"""A model's chat template past the sandbox's limits is the request's 400 naming the limit, at once: before,
`qwenkit serve` built the string or ran the loops (gigabytes, or hours) on its one rendering thread."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))

from scripted import steered_server

from qwenkit.tokenizer.chat_template import chatml_template
from qwenkit.tokenizer.jinja_limits import MAX_SIZE, MAX_STEPS

# the ChatML template, with a loop or a width past the limits where the last message asks for it
BOMBS = (
    "{% if messages[-1].content == 'loops' %}{% for i in range(2000) %}{% for j in range(1000) %}"
    "{% endfor %}{% endfor %}{% endif %}"
    "{% if messages[-1].content == 'width' %}{{ 'x'|center(70000000) }}{% endif %}"
    "{% if messages[-1].content == 'format' %}{{ '{:>70000000}'.format('x') }}{% endif %}"
)


@pytest.fixture(scope="module")
def bombed(tiny_chat_model):
    with steered_server(tiny_chat_model, chat_template=BOMBS + chatml_template()) as served:
        yield served


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            "loops",
            f"the template ran past the sandbox's budget of {MAX_STEPS} steps for one render "
            "(loop iterations, calls, filters, KiB of text)",
        ),
        ("width", f"a center width of 70000000 is over the sandbox's limit of {MAX_SIZE}"),
        ("format", f"a format width or precision of 70000000 is over the sandbox's limit of {MAX_SIZE}"),
    ],
)
def test_a_template_past_the_limits_is_a_400_naming_the_limit(bombed, content, reason):
    import httpx

    live = bombed[0]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 2}
    start = time.monotonic()
    r = httpx.post(live.url + "/v1/chat/completions", json=body, timeout=60)
    assert time.monotonic() - start < 8
    assert r.status_code == 400
    assert r.json()["error"]["message"] == f"messages: the chat template could not render them: {reason}"
