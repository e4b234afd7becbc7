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


@pytest.mark.parametrize("seed", [-3, -(2**63), 2**63 - 1])
def test_any_int64_seed_is_taken_and_reproduces_the_python_apis_tokens(server, chat_llm, seed):
    """OpenAI's API and vLLM take any int64 seed, negative ones too; a negative seed was a 400. The last
    choice of n=2 at 2**63 - 1 runs with seed 2**63, past int64 but a seed the engine takes."""
    from qwenkit.engine import SamplingParams

    body = {"prompt": "hi", "max_tokens": 6, "temperature": 1.0, "seed": seed, "ignore_eos": True}
    body |= {"logprobs": 0, "n": 2, "top_p": 1.0, "top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0}
    r = httpx.post(server.url + COMPLETIONS, json=body, timeout=120)
    assert r.status_code == 200, r.text
    again = httpx.post(server.url + COMPLETIONS, json=body, timeout=120).json()
    assert again["choices"] == r.json()["choices"]
    params = SamplingParams(max_tokens=6, temperature=1.0, seed=seed, ignore_eos=True, logprobs=0)
    want = chat_llm.generate("hi", params)[0]
    first = next(c for c in r.json()["choices"] if c["index"] == 0)
    assert first["text"] == want.text
    assert len(first["logprobs"]["tokens"]) == len(want.token_ids) == 6
