"""/metrics against the traffic a live server served: counters equal the usage the responses reported,
histogram counts the requests they cover, gauges back at idle, the text parses, and the series the
GPU overlay's autoscaler reads exists under the name and type its prometheus-adapter rule names."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import httpx
import yaml
from prometheus_client.parser import text_string_to_metric_families

CHAT = "/v1/chat/completions"
HELLO = [{"role": "user", "content": "Hello"}]
DEPLOY = Path(__file__).parents[2] / "deploy"


def scrape(live) -> tuple[dict, dict]:
    """({(sample name, labels other than model_name): value}, {family name: type}), read by
    prometheus_client's own text parser."""
    samples, types = {}, {}
    for family in text_string_to_metric_families(httpx.get(live.url + "/metrics").text):
        types[family.name] = family.type
        for s in family.samples:
            labels = tuple(sorted((k, v) for k, v in s.labels.items() if k != "model_name"))
            samples[(s.name, labels)] = s.value
    return samples, types


def usage_of(path: str, body: dict) -> tuple[int, int, int]:
    """(prompt tokens, completion tokens, choices) of the usage a response reports."""
    u = body["usage"] if "usage" in body else body["response"]["usage"]
    if path == "/v1/responses":
        return u["input_tokens"], u["output_tokens"], 1
    return u["prompt_tokens"], u["completion_tokens"], len(body.get("choices") or [0])


def test_counters_and_histograms_equal_the_usage_served(make_server, chat_llm):
    live = make_server(response_cache_entries=0)
    whole = [
        (CHAT, {"messages": HELLO, "max_tokens": 3}),
        (CHAT, {"messages": HELLO, "max_tokens": 3, "n": 2}),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "n": 3}),
        ("/v1/responses", {"input": "Hello", "max_output_tokens": 5}),
    ]
    streamed = [
        (CHAT, {"messages": HELLO, "max_tokens": 3, "n": 2, "stream_options": {"include_usage": True}}),
        ("/v1/completions", {"prompt": "Hello", "max_tokens": 4, "stream_options": {"include_usage": True}}),
        ("/v1/responses", {"input": "Hello", "max_output_tokens": 5}),
    ]
    served = []  # (prompt tokens per choice, completion tokens, choices)
    for path, body in whole:
        r = httpx.post(live.url + path, json=body, timeout=60)
        assert r.status_code == 200, r.text
        served.append(usage_of(path, r.json()))
    for path, body in streamed:
        with httpx.stream("POST", live.url + path, json={**body, "stream": True}, timeout=60) as s:
            last = [x for x in s.iter_lines() if x.startswith("data: {")][-1]
        usage = usage_of(path, json.loads(last[6:]))
        served.append((usage[0], usage[1], body.get("n", 1)))
    assert chat_llm.driver.wait_idle()
    m, _ = scrape(live)
    choices = sum(n for _, _, n in served)
    assert choices == 11
    assert m[("vllm:generation_tokens_total", ())] == sum(c for _, c, _ in served) == 41
    # each choice's prompt is processed (its copies, n > 1, are requests of their own to the engine, as
    # vLLM's children are), while usage counts a request's prompt once
    assert m[("vllm:prompt_tokens_total", ())] == sum(p * n for p, _, n in served)
    assert m[("vllm:request_success_total", (("finished_reason", "length"),))] == choices
    for histogram in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert m[(f"vllm:{histogram}_count", ())] == choices, histogram
        assert m[(f"vllm:{histogram}_bucket", (("le", "+Inf"),))] == choices, histogram
    assert m[("vllm:time_per_output_token_seconds_count", ())] == choices  # every one made > 1 token
    # every choice waited, if briefly, before its first step, which came before its first token
    assert m[("vllm:request_queue_time_seconds_count", ())] == choices
    assert (
        0 < m[("vllm:request_queue_time_seconds_sum", ())] < m[("vllm:time_to_first_token_seconds_sum", ())]
    )
    # one inter-token observation per delivery after a choice's first token: at most one a token (the
    # tokens of a step, or of steps read together, are one delivery), within each choice's decode time
    itl = m[("vllm:inter_token_latency_seconds_count", ())]
    assert 1 <= itl <= sum(c for _, c, _ in served) - choices
    decode = m[("vllm:e2e_request_latency_seconds_sum", ())] - m[("vllm:time_to_first_token_seconds_sum", ())]
    assert 0 < m[("vllm:inter_token_latency_seconds_sum", ())] <= decode
    for gauge in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc"):
        assert m[(f"vllm:{gauge}", ())] == 0, gauge


def test_embeddings_count_as_requests_with_their_prompt_tokens(make_server, chat_llm):
    """Each input of /v1/embeddings is one engine request, as vLLM counts pooling requests: its prompt
    tokens processed, none generated, finished "stop", with its latency and queue time (no first token).
    They were not counted at all."""
    live = make_server(response_cache_entries=0)
    body = {"input": ["Hello there", "x", [1, 2, 3]]}
    r = httpx.post(live.url + "/v1/embeddings", json=body, timeout=60)
    assert r.status_code == 200, r.text
    tokens = len(chat_llm.encode("Hello there")) + len(chat_llm.encode("x")) + 3
    assert r.json()["usage"]["prompt_tokens"] == tokens
    assert chat_llm.driver.wait_idle()
    m, _ = scrape(live)
    assert m[("vllm:prompt_tokens_total", ())] == tokens
    assert m[("vllm:generation_tokens_total", ())] == 0
    assert m[("vllm:request_success_total", (("finished_reason", "stop"),))] == 3
    assert m[("vllm:e2e_request_latency_seconds_count", ())] == 3
    assert m[("vllm:request_queue_time_seconds_count", ())] == 3
    assert (
        0 < m[("vllm:request_queue_time_seconds_sum", ())] < m[("vllm:e2e_request_latency_seconds_sum", ())]
    )
    assert m[("vllm:time_to_first_token_seconds_count", ())] == 0
    assert m[("vllm:time_per_output_token_seconds_count", ())] == 0
    assert (
        m[("http_requests_total", (("handler", "/v1/embeddings"), ("method", "POST"), ("status", "200")))]
        == 1
    )


def test_queue_time_is_the_wait_before_the_first_step(make_server, chat_llm):
    """vllm:request_queue_time_seconds, vLLM's histogram of the time from a request's submission to its
    first scheduled step: a request sent while the engine thread is held for 2 s waits most of that (less
    the time the request takes to arrive, which a loaded machine stretches); one sent to an idle engine,
    not. The server had no such series."""
    live = make_server(response_cache_entries=0)
    body = {"messages": HELLO, "max_tokens": 2}
    held = chat_llm.driver.between_steps(lambda: time.sleep(2.0))  # the engine takes nothing meanwhile
    assert httpx.post(live.url + CHAT, json=body, timeout=60).status_code == 200
    held.result(timeout=10)
    assert httpx.post(live.url + CHAT, json=body, timeout=60).status_code == 200
    assert chat_llm.driver.wait_idle()
    m, types = scrape(live)
    assert types["vllm:request_queue_time_seconds"] == "histogram"
    queue = {
        dict(labels).get("le"): v for (name, labels), v in m.items() if name.startswith("vllm:request_q")
    }
    assert queue["+Inf"] == m[("vllm:request_queue_time_seconds_count", ())] == 2
    assert queue["0.5"] == 1  # the one sent to an idle engine; the held one waited past 0.5 s
    assert (
        1.0 < m[("vllm:request_queue_time_seconds_sum", ())] < m[("vllm:time_to_first_token_seconds_sum", ())]
    )


def test_the_exposition_is_well_formed(server):
    """Every family has HELP and TYPE, names are valid, and each histogram's buckets rise to +Inf, which
    equals its _count."""
    httpx.post(server.url + CHAT, json={"messages": HELLO, "max_tokens": 2}, timeout=60)
    r = httpx.get(server.url + "/metrics")
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.text
    families = list(text_string_to_metric_families(text))
    for family in families:
        assert re.fullmatch(r"[a-zA-Z_:][a-zA-Z0-9_:]*", family.name), family.name
        # the 0.0.4 text format names a counter with its _total, which the parser strips
        name = family.name + ("_total" if family.type == "counter" else "")
        assert f"# TYPE {name} {family.type}\n" in text, name
        assert f"# HELP {name} " in text, name
        if family.type != "histogram":
            continue
        buckets = [(s.labels["le"], s.value) for s in family.samples if s.name.endswith("_bucket")]
        bounds = [float(le) for le, _ in buckets]
        assert bounds == sorted(bounds) and bounds[-1] == float("inf"), family.name
        counts = [v for _, v in buckets]
        assert counts == sorted(counts), family.name
        (count,) = [s.value for s in family.samples if s.name == family.name + "_count"]
        assert counts[-1] == count >= 1, family.name


def test_the_autoscalers_metric_is_one_the_server_exposes(server):
    """The GPU overlay's HPA scales on a custom metric that only prometheus-adapter's rule makes, from
    the series its seriesQuery names: were that name or its type not what /metrics exposes, the HPA
    would find no metric and never scale, with nothing failing loudly."""
    values = yaml.safe_load((DEPLOY / "k8s/overlays/gpu/prometheus-adapter-values.yaml").read_text())
    hpa = yaml.safe_load((DEPLOY / "k8s/overlays/gpu/hpa.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    series, matchers = re.fullmatch(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\{(.*)\}", rule["seriesQuery"]).groups()
    assert re.fullmatch(rule["name"]["matches"], series)
    assert hpa["spec"]["metrics"][0]["pods"]["metric"]["name"] == rule["name"]["as"]
    m, types = scrape(server)
    assert types[series] == "gauge"
    (labels,) = [dict(labels) for name, labels in m if name == series]
    # namespace and pod are the scrape target's labels (Prometheus adds them); a series that set them
    # itself would have them renamed exported_*, and the rule's matchers would find nothing
    matched = set(re.findall(r"([a-zA-Z_]\w*)\s*!?=", matchers))
    assert matched == {"namespace", "pod"} and not matched & set(labels)
    monitor = yaml.safe_load((DEPLOY / "k8s/components/servicemonitor/servicemonitor.yaml").read_text())
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"


def test_refused_requests_are_counted_by_route_and_status(make_server, chat_llm):
    """A 401, 400, 429 or a draining 503 reaches no engine, so no vllm:* series moves: without a count of
    answers by status, a storm of refusals (a bad key rolled out, a full queue) is invisible on /metrics."""
    live = make_server(response_cache_entries=0, api_key="k", max_queue=0)
    key = {"Authorization": "Bearer k"}
    ok = {"messages": HELLO, "max_tokens": 2}
    assert httpx.post(live.url + CHAT, json=ok, headers=key, timeout=60).status_code == 200
    assert httpx.post(live.url + CHAT, json=ok, timeout=60).status_code == 401
    assert httpx.post(live.url + "/v1/nothing", json=ok, timeout=60).status_code == 401
    for model in ("a", "b/c"):  # a route with a path parameter: its template, not a label for each path
        assert httpx.get(live.url + f"/v1/models/{model}").status_code == 401
    assert httpx.get(live.url + "/v1/models/tiny", headers=key).status_code == 200
    bad = {"messages": HELLO, "max_tokens": -1}
    assert httpx.post(live.url + CHAT, json=bad, headers=key, timeout=60).status_code == 400
    state = live.server.config.app.state.qwenkit
    state.active += 8  # what 8 running choices look like to the queue check (no real rows to race)
    try:
        full = httpx.post(live.url + CHAT, json=ok, headers=key, timeout=60)
    finally:
        state.active -= 8
    assert full.status_code == 429
    state.draining = True
    try:
        assert httpx.post(live.url + CHAT, json=ok, headers=key, timeout=60).status_code == 503
        assert httpx.get(live.url + "/health").status_code == 503
    finally:
        state.draining = False
    assert chat_llm.driver.wait_idle()
    m, types = scrape(live)
    assert types["http_requests"] == "counter"
    counted = {
        labels: value
        for (name, labels), value in m.items()
        if name == "http_requests_total" and dict(labels)["handler"] != "/health"
    }

    def at(handler: str, status: int, method: str = "POST") -> tuple:
        return (("handler", handler), ("method", method), ("status", str(status)))

    assert counted == {
        at(CHAT, 200): 1,
        at(CHAT, 401): 1,
        at("other", 401): 1,  # a path no route serves is not a label of its own
        at(CHAT, 400): 1,
        at(CHAT, 429): 1,
        at(CHAT, 503): 1,
        # refused before routing, labelled with the route's template as the answered one is (was "other")
        at("/v1/models/{model_id:path}", 401, "GET"): 2,
        at("/v1/models/{model_id:path}", 200, "GET"): 1,
    }
    assert m[("http_requests_total", (("handler", "/health"), ("method", "GET"), ("status", "503")))] == 1


def test_made_up_methods_share_one_label(server):
    """A method is a label, and any token is a method to the HTTP parser: each made-up one made a series
    of its own that /metrics kept for ever (the server's memory grew with what clients sent)."""
    for n in range(20):
        assert httpx.request(f"X{n}", server.url + "/v1/models").status_code == 405
    assert httpx.request("PATCH", server.url + "/v1/models").status_code == 405
    m, _ = scrape(server)
    methods = {
        dict(labels)["method"]: value
        for (name, labels), value in m.items()
        if name == "http_requests_total" and dict(labels)["handler"] == "/v1/models"
    }
    assert methods == {"other": 20, "PATCH": 1}
