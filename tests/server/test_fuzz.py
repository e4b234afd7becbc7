"""Property-based fuzzing of the request schema: whatever the body, the server answers without a 5xx."""

from __future__ import annotations

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

json_value = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "assistant", "tool", "x"]) | json_value},
    optional={"content": st.text(max_size=40) | json_value, "tool_call_id": json_value, "name": json_value},
)
FIELDS = {
    "model": st.sampled_from(["tiny", "other"]) | json_value,
    "max_tokens": st.integers(-5, 12) | json_value,
    "max_completion_tokens": st.integers(-5, 12),
    "temperature": st.floats(-1, 3) | json_value,
    "top_p": st.floats(-0.5, 1.5),
    "top_k": st.integers(-3, 100),
    "min_p": st.floats(-0.5, 1.5),
    "repetition_penalty": st.floats(-1, 3),
    "presence_penalty": st.floats(-3, 3),
    "frequency_penalty": st.floats(-3, 3),
    "seed": st.integers(-10, 2**64),
    "n": st.integers(-1, 20),
    "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=20) | json_value,
    "stop_token_ids": st.lists(st.integers(-5, 200000), max_size=4),
    "logprobs": st.booleans() | st.integers(-2, 30),
    "top_logprobs": st.integers(-2, 30),
    "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans() | json_value}) | json_value,
    "echo": st.booleans(),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "65", "x", "-3", "99999999"]), st.floats(-200, 200))
    | json_value,
    "best_of": st.integers(0, 3) | json_value,
    "ignore_eos": st.booleans(),
    "chat_template_kwargs": st.dictionaries(
        st.sampled_from(["enable_thinking", "x"]), json_value, max_size=2
    ),
}
chat_body = st.fixed_dictionaries(
    {"messages": st.lists(message, max_size=3) | json_value},
    optional={**FIELDS, "max_tokens": st.integers(-5, 12)},
)
completion_body = st.fixed_dictionaries(
    {
        "prompt": st.text(max_size=30)
        | st.lists(st.integers(-5, 200000), max_size=6)
        | st.lists(st.lists(st.integers(0, 1000), max_size=4), max_size=3)
        | json_value
    },
    optional={**FIELDS, "max_tokens": st.integers(-5, 12)},
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]), data=st.data())
def test_no_request_body_makes_a_5xx(server, path, data):
    body = data.draw(chat_body if path.endswith("chat/completions") else completion_body)
    r = httpx.post(server.url + path, json=body, timeout=120)
    assert r.status_code < 500, (body, r.text)
    if r.status_code >= 400:
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    elif body.get("stream"):
        assert r.text.rstrip().endswith("data: [DONE]") and '"error"' not in r.text, (body, r.text)


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(raw=st.binary(max_size=60))
def test_garbage_bytes_are_400(server, raw):
    r = httpx.post(
        server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
