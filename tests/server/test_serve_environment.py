"""Every `qwenkit serve` option can come from the environment as QWENKIT_<OPTION>, as the README and the
container images promise: an option the environment cannot set would be silently ignored in a Deployment."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwenkit.cli.serve import build_parser, environment_names


def sample_value(action) -> str:
    """A value for the option's variable that differs from its default."""
    if action.nargs == 0:  # a switch
        return "1"
    if action.choices:
        return next(c for c in action.choices if c != action.default)
    return "7"


def options() -> list:
    return [a for a in build_parser()._actions if a.dest != "help"]


@pytest.mark.parametrize("action", options(), ids=lambda a: a.dest)
def test_every_serve_option_is_read_from_its_environment_variable(action, monkeypatch):
    (name,) = [n for n, dest in environment_names().items() if dest == action.dest]
    unset = getattr(build_parser().parse_args([]), action.dest)
    monkeypatch.setenv(name, sample_value(action))
    assert getattr(build_parser().parse_args([]), action.dest) != unset, name


def test_variable_names_follow_the_option_names():
    names = environment_names()
    assert names["QWENKIT_MODEL"] == "model" and names["QWENKIT_API_KEY_FILE"] == "api_key_file"
    assert names["QWENKIT_NO_CUDA_GRAPHS"] == "cuda_graphs"  # the flag's name, not its dest
    assert names["QWENKIT_NO_PREFIX_CACHING"] == "no_prefix_caching"
    assert "QWENKIT_HELP" not in names


def test_max_context_and_max_model_len_are_one_limit(monkeypatch):
    """`serve` takes vLLM's --max-model-len and the other commands' --max-context for the same limit; it
    ignored --max-context before (the model's whole context was planned)."""
    from qwenkit.cli.serve import max_seq_len

    parser = build_parser()
    assert max_seq_len(parser.parse_args(["--max-context", "4096"])) == 4096
    assert max_seq_len(parser.parse_args(["--max-model-len", "2048"])) == 2048
    assert max_seq_len(parser.parse_args([])) is None
    monkeypatch.setenv("QWENKIT_MAX_CONTEXT", "1024")
    assert max_seq_len(build_parser().parse_args([])) == 1024


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--max-context", "4096", "--max-model-len", "2048"], {}, "give --max-model-len or --max-context"),
        ([], {"QWENKIT_THREADS": "four"}, "QWENKIT_THREADS must be an integer, got 'four'"),
        ([], {"QWENKIT_MAX_MODEL_LEN": "4k"}, "QWENKIT_MAX_MODEL_LEN must be an integer, got '4k'"),
        ([], {"QWENKIT_MAX_CONTEXT": "1"}, "--max-context must be at least 2, got 1"),
    ],
)
def test_bad_length_and_thread_options_exit_2_with_one_line(args, env, message):
    import os

    r = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "serve", "--port", "1", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=60,  # refused before the model loads, or this would serve on port 1
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_lora_modules_from_the_environment_keep_vllms_json_items_whole(monkeypatch):
    """QWENKIT_LORA_MODULES takes what --lora-modules takes: NAME=DIR items and vLLM's JSON objects, which
    json.dumps writes with spaces (split on whitespace, one used to be refused as '{"name":' is not JSON)."""
    sql = json.dumps({"name": "sql", "path": "/adapters/sql", "base_model_name": "qwen"})
    monkeypatch.setenv("QWENKIT_LORA_MODULES", f' {sql}\n poet=/adapters/poet {{"name":"x","path":"/x"}}')
    assert build_parser().parse_args([]).lora_modules == [
        sql,
        "poet=/adapters/poet",
        '{"name":"x","path":"/x"}',
    ]
    monkeypatch.setenv("QWENKIT_LORA_MODULES", '{"name": broken} sql=/a')  # not JSON: the check names it
    assert build_parser().parse_args([]).lora_modules == ['{"name":', "broken}", "sql=/a"]
