"""`qwenkit eval --endpoint` keeps a Qwen3 reply's thinking, as a local run does. The server splits the
``<think>`` block off into ``reasoning_content``/``reasoning``; the endpoint backend read only ``content``,
so an endpoint run's samples had no ``thinking`` (and an ``output`` without it) where a local run's had.

A steered tiny Qwen3 (``tools/scripted.py``) writes the replies, behind `qwenkit serve`'s app on
127.0.0.1; the server's split, the backend, the plan and the samples file all run for real."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tools"))
sys.path.insert(0, str(Path(__file__).parents[1] / "server"))  # live.py

from scripted import ScriptedModel, steer_next_request, steered_server

from qwenkit.evaluate.backends import LocalBackend
from qwenkit.evaluate.endpoint import EndpointBackend, whole_turn
from qwenkit.evaluate.runner import Settings, rescore_dir, run
from qwenkit.generate import LLM

QUESTION = {"question": "What is 6 times 7?", "answer": "6*7=42\n#### 42"}
REPLY = "<think>\n6 times 7: 42.\n</think>\n\nThe answer is 42."


@pytest.fixture
def gsm8k_data(tmp_path) -> Path:
    data = tmp_path / "test.jsonl"
    data.write_text(json.dumps(QUESTION) + "\n")
    return data


def samples(backend, data: Path, out: Path, max_new_tokens: int = 64) -> tuple[dict, list[dict]]:
    settings = Settings(task="gsm8k", method="generate", data=str(data), max_new_tokens=max_new_tokens)
    results = run(backend, settings, out, progress=False)
    return results, [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_an_endpoint_run_records_the_thinking_a_local_run_records(tiny_chat_model, gsm8k_data, tmp_path):
    loaded = LLM.load(tiny_chat_model, dtype="float32", max_batch_size=1, progress=False)
    model = ScriptedModel(loaded.model, loaded.tokenizer.added_tokens["<|im_end|>"])
    local_llm = LLM(model, loaded.tokenizer, max_batch_size=1, max_seq_len=2048)
    pending = steer_next_request(local_llm, model)
    pending.append(local_llm.tokenizer.encode(REPLY, allow_special=True))
    local_results, local = samples(LocalBackend(local_llm, batch_size=1), gsm8k_data, tmp_path / "local")
    assert local[0]["thinking"] == "6 times 7: 42."

    with steered_server(tiny_chat_model) as (live, llm, pending):
        pending.append(llm.tokenizer.encode("hi", allow_special=True))  # the run's system_fingerprint ask
        pending.append(llm.tokenizer.encode(REPLY, allow_special=True))
        results, remote = samples(EndpointBackend(live.url, concurrency=1), gsm8k_data, tmp_path / "endpoint")
    assert results["record"]["backend"] == "endpoint"
    assert remote[0]["thinking"] == "6 times 7: 42."
    for here, there in zip(local, remote, strict=True):
        for key in ("output", "scored_text", "extracted", "correct"):
            assert there[key] == here[key], key
    assert remote[0]["output"] == REPLY  # the turn as the model wrote it, as locally
    assert remote[0]["scored_text"] == "The answer is 42." and remote[0]["correct"] is True
    assert results["scores"]["acc"] == local_results["scores"]["acc"] == 1.0
    assert rescore_dir(tmp_path / "endpoint")["scores"]["acc"] == 1.0  # the saved reply splits again


@pytest.mark.parametrize(
    ("reasoning", "content", "finish", "turn"),
    [
        ("Hm.", "42", "stop", "<think>\nHm.\n</think>\n\n42"),
        ("Hm.", "", "stop", "<think>\nHm.\n</think>\n\n"),  # an empty answer after the thinking
        ("Step one", "", "length", "<think>\nStep one"),  # cut off while thinking: no </think> came
        ("", "42", "stop", "42"),  # the server split nothing off
    ],
)
def test_the_turn_is_rebuilt_as_qwen3_writes_it(reasoning, content, finish, turn):
    assert whole_turn(reasoning, content, finish) == turn
