"""max_tokens cutting a character's UTF-8 bytes: the text ends in U+FFFD (as ``decode`` of the ids, and
as vLLM's), the same in the Python API and the server, whole and streamed, chat and completions, with one
logprob and one counted token for the cut token."""

from __future__ import annotations

import json

import httpx
import pytest

from qwenkit.engine import SamplingParams
from qwenkit.tokenizer.byte_level import bytes_to_piece


def streamed_text(r: httpx.Response) -> str:
    chunks = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    return "".join(
        ch.get("text") or (ch.get("delta") or {}).get("content") or "" for c in chunks for ch in c["choices"]
    )


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_a_cut_character_ends_in_one_replacement_character_everywhere(server, chat_llm, path):
    first_byte = chat_llm.tokenizer.token_to_id(bytes_to_piece("你".encode()[:1]))
    params = SamplingParams(max_tokens=1, temperature=0, logit_bias={first_byte: 100})
    done = chat_llm.generate("hi", params)[0]
    assert (done.token_ids, done.text) == ([first_byte], "\ufffd")
    assert "".join(d.text for d in chat_llm.stream("hi", params)) == "\ufffd"
    body = {"max_tokens": 1, "temperature": 0, "logit_bias": {str(first_byte): 100}}
    if path.endswith("chat/completions"):
        body |= {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}
    else:
        body |= {"prompt": "hi", "logprobs": 0}
    whole = httpx.post(server.url + path, json=body, timeout=60).json()
    choice = whole["choices"][0]
    text = choice["text"] if "text" in choice else choice["message"]["content"]
    tokens = choice["logprobs"]["tokens"] if "text" in choice else choice["logprobs"]["content"]
    assert (text, len(tokens), whole["usage"]["completion_tokens"]) == ("\ufffd", 1, 1)
    stream = httpx.post(server.url + path, json={**body, "stream": True}, timeout=60)
    assert streamed_text(stream) == "\ufffd"
