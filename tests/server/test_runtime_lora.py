"""vLLM's runtime LoRA routes (``--allow-runtime-lora``): ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` on a live server, its answers checked against adapters given at start, with
the official openai client for the requests that use them."""

from __future__ import annotations

import subprocess
import sys

import httpx
import openai
import pytest
from factories import hf_model, save_hf, write_lora_adapter
from live import LiveServer

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app
from qwenkit.server.adapters import RUNTIME_LORA_OFF

MESSAGES = [{"role": "user", "content": "Name three colours."}]
KEY = "secret"


@pytest.fixture(scope="module")
def adapters(tiny_chat_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("runtime-lora")
    return {
        name: str(write_lora_adapter(tiny_chat_model, root / name, seed, std=0.5))
        for name, seed in (("sql", 1), ("poet", 2))
    }


@pytest.fixture(scope="module")
def expected(tiny_chat_model, adapters):
    """Each adapter's greedy answer where it was given at load time, and the base model's."""
    with LLM.load(tiny_chat_model, progress=False, adapters=adapters) as llm:
        ids = llm.tokenizer.apply_chat_template(MESSAGES, add_generation_prompt=True)
        return {
            name: llm.generate([ids], SamplingParams(temperature=0, max_tokens=12, adapter=name))[0].text
            for name in ("sql", "poet", None)
        }


@pytest.fixture
def live(tiny_chat_model):
    """A server of the base model alone, adapters loadable at run time, behind an API key."""
    llm = LLM.load(tiny_chat_model, max_batch_size=4, progress=False)
    config = ServerConfig(served_model_name="tiny", api_key=KEY, runtime_lora=True)
    with LiveServer(create_app(llm, config)) as server:
        yield server
    llm.close()


def post(live, route: str, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEY}"}
    return httpx.post(f"{live.url}/v1/{route}", json=body, headers=headers, timeout=60)


def ask(client, model: str) -> str:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=12, temperature=0)
    assert r.model == model
    return r.choices[0].message.content


def test_load_replace_and_unload_while_serving(live, adapters, expected):
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
    assert [m.id for m in client.models.list().data] == ["tiny"]
    r = post(live, "load_lora_adapter", lora_name="sql", lora_path=adapters["sql"])
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    cards = client.models.list().data
    assert [c.id for c in cards] == ["tiny", "sql"]
    assert cards[1].root == adapters["sql"] and cards[1].parent == "tiny"
    assert ask(client, "sql") == expected["sql"] != expected[None]
    assert ask(client, "tiny") == expected[None]
    metrics = httpx.get(f"{live.url}/metrics").text
    assert 'max_lora="1"' in metrics

    # vLLM's load_inplace: the name keeps serving, on the new weights; the response cache held the old
    # answer of "sql" (greedy, asked just now) and must not give it again
    r = post(live, "load_lora_adapter", lora_name="sql", lora_path=adapters["poet"], load_inplace=True)
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' added successfully.")
    assert ask(client, "sql") == expected["poet"] != expected["sql"]
    assert client.models.list().data[1].root == adapters["poet"]

    r = post(live, "unload_lora_adapter", lora_name="sql")
    assert (r.status_code, r.text) == (200, "Success: LoRA adapter 'sql' removed successfully.")
    with pytest.raises(
        openai.NotFoundError, match="the model 'sql' does not exist; this server serves 'tiny'"
    ):
        ask(client, "sql")
    assert [m.id for m in client.models.list().data] == ["tiny"]
    # a freed slot taken by the next adapter
    assert post(live, "load_lora_adapter", lora_name="poet", lora_path=adapters["poet"]).status_code == 200
    assert ask(client, "poet") == expected["poet"]


def test_bad_loads_and_unloads_are_refused_as_vllm_does(
    live, adapters, tiny_chat_model, tmp_path, monkeypatch
):
    def error(r: httpx.Response) -> tuple[int, str]:
        return r.status_code, r.json()["error"]["message"]

    assert post(live, "load_lora_adapter", lora_name="sql", lora_path=adapters["sql"]).status_code == 200
    both = "Both 'lora_name' and 'lora_path' must be provided."
    assert error(post(live, "load_lora_adapter", lora_name="x")) == (400, both)
    assert error(post(live, "load_lora_adapter", lora_path=adapters["sql"])) == (400, both)
    assert error(post(live, "load_lora_adapter", lora_name="sql", lora_path=adapters["poet"])) == (
        400,
        "The lora adapter 'sql' has already been loaded.",
    )
    status, message = error(post(live, "load_lora_adapter", lora_name="x", lora_path=str(tmp_path / "none")))
    assert status == 404 and "is not an adapter directory" in message
    status, message = error(post(live, "load_lora_adapter", lora_name="tiny", lora_path=adapters["sql"]))
    assert status == 400 and "is the base model's name" in message
    # an adapter of another model's shape, and one of a module served adapters cannot adapt
    other = save_hf(hf_model("qwen3", hidden_size=48, intermediate_size=64), tmp_path / "other")
    wrong = write_lora_adapter(other, tmp_path / "wrong", seed=3, r=2, targets=("o_proj",))
    status, message = error(post(live, "load_lora_adapter", lora_name="w", lora_path=str(wrong)))
    assert status == 400 and "adapter 'w' is for another model shape" in message
    head = write_lora_adapter(tiny_chat_model, tmp_path / "head", seed=4, r=2, targets=("q_proj", "lm_head"))
    status, message = error(post(live, "load_lora_adapter", lora_name="h", lora_path=str(head)))
    assert status == 400 and "adapter 'h' adapts lm_head" in message
    assert error(post(live, "unload_lora_adapter", lora_name="x")) == (
        404,
        "The lora adapter 'x' cannot be found.",
    )
    assert error(post(live, "unload_lora_adapter"))[0] == 400
    # an adapter that would not fit in the free memory: 507, not retried by clients
    from qwenkit import memory

    monkeypatch.setattr(memory, "free_bytes", lambda device: 0)
    status, message = error(post(live, "load_lora_adapter", lora_name="poet", lora_path=adapters["poet"]))
    assert status == 507 and "not enough free RAM to serve adapter 'poet'" in message
    monkeypatch.undo()
    # the API key guards them as it guards every /v1 route
    r = httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "sql"}, timeout=10)
    assert r.status_code == 401
    # nothing refused changed what is served
    models = httpx.get(f"{live.url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert [m["id"] for m in models["data"]] == ["tiny", "sql"]


def test_the_routes_are_off_unless_turned_on(chat_llm, adapters):
    with LiveServer(create_app(chat_llm, ServerConfig(served_model_name="tiny"))) as live:
        for route, body in (
            ("load_lora_adapter", {"lora_name": "sql", "lora_path": adapters["sql"]}),
            ("unload_lora_adapter", {"lora_name": "sql"}),
        ):
            r = httpx.post(f"{live.url}/v1/{route}", json=body, timeout=10)
            assert r.status_code == 404 and r.json()["error"]["message"] == RUNTIME_LORA_OFF
        assert "--allow-runtime-lora" in RUNTIME_LORA_OFF


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--allow-runtime-lora", "--adapter", "."], {}, "rather than --adapter"),
        (["--allow-runtime-lora", "--tensor-parallel", "2"], {}, "give --max-loras N"),
        ([], {"QWENKIT_ALLOW_RUNTIME_LORA": "maybe"}, "QWENKIT_ALLOW_RUNTIME_LORA must be 1/true"),
        (["--max-lora-rank", "8"], {}, "give --max-loras too"),
        (["--max-loras", "2"], {}, "give --lora-modules or --allow-runtime-lora too"),
        (["--allow-runtime-lora", "--max-loras", "0"], {}, "--max-loras must be at least 1, got 0"),
        (["--allow-runtime-lora", "--max-loras", "2", "--max-lora-rank", "-1"], {}, "at least 1, got -1"),
        ([], {"QWENKIT_MAX_LORAS": "many"}, "QWENKIT_MAX_LORAS must be an integer, got 'many'"),
        ([], {"QWENKIT_MAX_BATCH": "16.5"}, "QWENKIT_MAX_BATCH must be an integer, got '16.5'"),
        ([], {"QWENKIT_GRACEFUL_TIMEOUT": "soon"}, "QWENKIT_GRACEFUL_TIMEOUT must be a number"),
    ],
)
def test_bad_runtime_lora_options_exit_2_with_one_line(args, env, message):
    import os

    r = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "serve", "--port", "1", *args],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
    )
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


def test_a_served_adapter_above_the_max_lora_rank_is_refused_naming_its_rank(tiny_chat_model, tmp_path):
    """The message names the adapter's rank, not the padded rank of the fused projection that holds it
    (it said "qkv_proj holds rank 48 where 8 asks for 32" for a rank-16 adapter)."""
    from factories import write_lora_adapter

    from qwenkit.errors import ConfigError

    wide = write_lora_adapter(tiny_chat_model, tmp_path / "wide", seed=5, r=16)
    with pytest.raises(ConfigError) as error:
        LLM.load(tiny_chat_model, progress=False, adapters={"wide": str(wide)}, max_loras=2, max_lora_rank=8)
    assert (
        str(error.value)
        == "adapter 'wide' has rank 16, above --max-lora-rank 8: give --max-lora-rank 16 or more"
    )


def test_past_the_reserved_adapter_slots_a_load_gets_400_naming_the_flag(tiny_chat_model, adapters, expected):
    """``--max-loras 1``: the first adapter takes the slot, a second is refused (400) until the first is
    unloaded, and replacing the one served reuses its slot."""
    llm = LLM.load(tiny_chat_model, max_batch_size=4, progress=False, max_loras=1, max_lora_rank=16)
    config = ServerConfig(served_model_name="tiny", api_key=KEY, runtime_lora=True)
    with llm, LiveServer(create_app(llm, config)) as live:
        assert post(live, "load_lora_adapter", lora_name="sql", lora_path=adapters["sql"]).status_code == 200
        r = post(live, "load_lora_adapter", lora_name="poet", lora_path=adapters["poet"])
        assert r.status_code == 400 and "the 1 reserved (--max-loras 1)" in r.json()["error"]["message"]
        r = post(live, "load_lora_adapter", lora_name="sql", lora_path=adapters["poet"], load_inplace=True)
        assert r.status_code == 200 and llm.model.adapters.names == ["sql"]
        assert post(live, "unload_lora_adapter", lora_name="sql").status_code == 200
        assert (
            post(live, "load_lora_adapter", lora_name="poet", lora_path=adapters["poet"]).status_code == 200
        )
        client = openai.OpenAI(base_url=f"{live.url}/v1", api_key=KEY, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["tiny", "poet"]
        assert ask(client, "poet") == expected["poet"]


def test_an_answer_made_on_weights_since_replaced_is_never_given_again():
    """The response cache's side of a replaced adapter: what was stored is dropped, and an answer that
    was under way during the change (its key made before it) is stored where no later request looks."""
    from qwenkit.generate import Completion
    from qwenkit.server.response_cache import ResponseCache

    cache = ResponseCache()
    on = {name: SamplingParams(temperature=0, adapter=name) for name in ("sql", "poet")}
    for params in on.values():
        cache.put(cache.key([1, 2], params), Completion([1, 2], [7], "old", "stop"))
    under_way = cache.key([3], on["sql"])
    cache.forget("sql")
    cache.put(under_way, Completion([3], [8], "old", "stop"))
    assert cache.get(cache.key([1, 2], on["sql"])) is None and cache.get(cache.key([3], on["sql"])) is None
    assert cache.get(cache.key([1, 2], on["poet"])).text == "old"  # other adapters' answers stay
    cache.put(cache.key([1, 2], on["sql"]), Completion([1, 2], [9], "new", "stop"))
    assert cache.get(cache.key([1, 2], on["sql"])).text == "new"


def test_switches_from_the_environment_read_false_as_off(monkeypatch):
    """``QWENKIT_NO_PREFIX_CACHING=false`` (as a container's env file writes it) is off, not on."""
    from qwenkit.cli.serve import build_parser

    for value, on in (("false", False), ("0", False), ("", False), ("true", True), ("YES", True)):
        monkeypatch.setenv("QWENKIT_NO_PREFIX_CACHING", value)
        monkeypatch.setenv("QWENKIT_ALLOW_RUNTIME_LORA", value)
        args = build_parser().parse_args([])
        assert (args.no_prefix_caching, args.allow_runtime_lora) == (on, on)


def test_a_server_anyone_can_load_adapters_into_says_so():
    from qwenkit.cli.serve import runtime_lora_warning

    assert runtime_lora_warning(False, None) is None and runtime_lora_warning(True, "k") is None
    assert runtime_lora_warning(True, None).startswith("warning: --allow-runtime-lora without --api-key")


def test_each_adapter_has_its_own_system_fingerprint(live, adapters):
    """`qwenkit eval --endpoint --model NAME` refuses to resume when the fingerprint changed: every served
    name gave the base model's, so other weights under an adapter's name (a replaced adapter, a server
    restarted with another) resumed silently into the same run."""

    def fingerprint(model: str) -> str:
        body = {"model": model, "messages": MESSAGES, "max_tokens": 1, "temperature": 0}
        r = httpx.post(
            f"{live.url}/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        )
        return r.json()["system_fingerprint"]

    base = fingerprint("tiny")
    assert post(live, "load_lora_adapter", lora_name="a", lora_path=adapters["sql"]).status_code == 200
    sql = fingerprint("a")
    replaced = post(live, "load_lora_adapter", lora_name="a", lora_path=adapters["poet"], load_inplace=True)
    assert replaced.status_code == 200
    poet = fingerprint("a")
    assert post(live, "load_lora_adapter", lora_name="b", lora_path=adapters["sql"]).status_code == 200
    assert len({base, sql, poet}) == 3 and all(p.startswith("fp_qwenkit_") for p in (sql, poet))
    assert fingerprint("b") == sql and fingerprint("tiny") == base  # the same weights, the same print


def test_a_request_whose_adapter_is_unloaded_as_it_starts_is_told_the_model_is_gone(
    tiny_chat_model, adapters, monkeypatch
):
    """A request whose "model" was checked while its adapter was served, and which reaches the engine
    after an unload took the adapter away (the unload route's moment between the engine and its list of
    names, or a request validated just before the unload), gets vLLM's answer for a model not served
    (404 model_not_found), not a failed generation (500) or a bad request (400)."""
    llm = LLM.load(tiny_chat_model, max_batch_size=4, progress=False)
    config = ServerConfig(served_model_name="tiny", api_key=KEY, runtime_lora=True)
    with LiveServer(create_app(llm, config)) as server:
        assert (
            post(server, "load_lora_adapter", lora_name="sql", lora_path=adapters["sql"]).status_code == 200
        )
        llm.unload_adapter("sql")  # the engine's half of an unload: the route has not dropped the name yet
        for validated_before_the_unload in (False, True):
            if validated_before_the_unload:  # the engine refuses it only as it adds it, between steps
                monkeypatch.setattr(llm.engine, "validate", lambda prompt_ids, params: None)
            r = post(server, "chat/completions", model="sql", messages=MESSAGES, max_tokens=4)
            assert (r.status_code, r.json()["error"]["code"]) == (404, "model_not_found"), r.text
            assert r.json()["error"]["message"].startswith("the model 'sql' does not exist")
        assert (
            post(server, "chat/completions", model="tiny", messages=MESSAGES, max_tokens=4).status_code == 200
        )
    llm.close()


def test_max_lora_in_the_metrics_is_max_loras_where_given(tiny_chat_model):
    """vLLM's ``vllm:lora_requests_info`` labels ``max_lora`` with --max-loras (it was the number served,
    0 here); without the flag, where adapters are not bounded, the number served."""
    llm = LLM.load(tiny_chat_model, max_batch_size=4, progress=False, max_loras=3, max_lora_rank=16)
    config = ServerConfig(served_model_name="tiny", runtime_lora=True)
    with llm, LiveServer(create_app(llm, config)) as live:
        text = httpx.get(live.url + "/metrics").text
    line = next(line for line in text.splitlines() if line.startswith("vllm:lora_requests_info{"))
    assert 'max_lora="3"' in line


def test_a_path_the_server_cannot_read_is_a_400_naming_why_not_a_500(live, tmp_path):
    """An adapter path the OS refuses to look in (a name too long; for a server not run as root,
    another user's home, /proc/1/root) raised OSError out of the route: a 500 "internal error:
    OSError", which clients retry, and a traceback in the log."""
    long = str(tmp_path / ("a" * 300))
    r = post(live, "load_lora_adapter", lora_name="x", lora_path=long)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "lora_path"
    assert error["message"] == f"{long}: cannot read the adapter: File name too long"
