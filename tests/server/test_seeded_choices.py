"""n choices of a seeded request: each choice differs from the others, and the request gives the same
choices on repeat (seed, seed+1, ...), the first of them what n=1 gives."""

from __future__ import annotations

import httpx
import pytest

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_n_seeded_choices_are_distinct_and_reproducible(server, path):
    body = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.95, "seed": 41, "ignore_eos": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == CHAT else {"prompt": "hi"}

    def texts(**fields: object) -> list[str]:
        r = httpx.post(server.url + path, json={**body, **fields}, timeout=120)
        assert r.status_code == 200, r.text
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        return [c["message"]["content"] if path == CHAT else c["text"] for c in choices]

    three = texts(n=3)
    assert len(set(three)) == 3
    assert texts(n=3) == three
    assert texts(n=1) == three[:1]
    assert texts(n=1, seed=42) == three[1:2]
