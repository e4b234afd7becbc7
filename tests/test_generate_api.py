"""The Python API: text in, text out, streaming, stop strings, many prompts at once."""

from __future__ import annotations

import gc
import re
import threading
import time
import weakref

import numpy as np
import pytest
import torch

from qwenkit.engine import SamplingParams
from qwenkit.errors import ModelClosedError
from qwenkit.generate import LLM
from qwenkit.text_state import _partial_stop_suffix


@pytest.fixture(scope="module")
def llm(tiny_chat_model):
    return LLM.load(tiny_chat_model, dtype="float32", progress=False)


SAMPLED = SamplingParams(temperature=1.0, top_k=0, seed=11, max_tokens=24, ignore_eos=True)


def test_stream_concatenates_to_the_completion(llm):
    deltas = list(llm.stream("Once upon a time", SAMPLED))
    final = deltas[-1].completion
    assert final is not None and all(d.completion is None for d in deltas[:-1])
    assert "".join(d.text for d in deltas) == final.text
    assert [t for d in deltas for t in d.token_ids] == final.token_ids and len(final.token_ids) == 24
    assert final.text == llm.tokenizer.decode(final.token_ids, skip_special=True)
    assert final.finish_reason == "length"


def test_stop_string_cuts_the_text_and_ends_the_request(llm):
    full = llm.generate("Once upon a time", SAMPLED)[0].text
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    assert stop and stop in full
    cut = llm.generate("Once upon a time", SamplingParams(**{**SAMPLED.__dict__, "stop": (stop,)}))[0]
    assert cut.text == full[: full.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(
        d.text
        for d in llm.stream("Once upon a time", SamplingParams(**{**SAMPLED.__dict__, "stop": (stop,)}))
    )
    assert streamed == cut.text  # text held back while it could still become the stop string is never shown
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_many_prompts_equal_one_at_a_time(tiny_chat_model):
    """In bfloat16, where the CPU kernels run every linear layer and compute each row on its own. Not in
    float32: torch's float32 products promise no such thing, and on an Intel Xeon (2026-12-01) they
    rounded a prompt's rows differently with 17 rows in the step than with 5 (a sampled token changed
    at step 20; the bfloat16 model and greedy float32 gave equal tokens there)."""
    llm = LLM.load(tiny_chat_model, dtype="bfloat16", progress=False)
    prompts = ["Hello", "The capital of France", "def f(x):", "1 2 3 4"]
    together = llm.generate(prompts, SAMPLED)
    alone = [llm.generate(p, SAMPLED)[0] for p in prompts]
    assert [c.token_ids for c in together] == [c.token_ids for c in alone]
    assert [c.prompt_ids for c in together] == [llm.tokenizer.encode(p) for p in prompts]


def test_close_ends_requests_and_the_thread_and_frees_the_model(tiny_chat_model):
    """An LLM's driver thread holds its engine and model: after close() (or a with block) the thread is
    gone, a request still running ends with "abort", a new one raises, and the model is freed."""
    with LLM.load(tiny_chat_model, dtype="float32", progress=False) as llm:
        assert llm.generate("Hello", SAMPLED)[0].finish_reason == "length"
        thread = llm.driver._thread
        assert thread is not None and thread.is_alive()
        long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)  # seconds of steps
        running = llm.submit("Once upon a time", long)
        deltas = iter(running)  # held: a reader that drops its iterator aborts the request itself
        first = next(deltas)
        assert first.finish_reason is None and first.token_ids  # it runs
    assert not thread.is_alive()
    rest = list(deltas)
    assert rest[-1].finish_reason == "abort" and len(running.completion.token_ids) < 4000
    closed = r"^this model has been closed \(LLM.close\)"  # a QwenkitError: one line, not a RuntimeError
    with pytest.raises(ModelClosedError, match=closed):
        llm.generate("Hello", SAMPLED)
    with pytest.raises(ModelClosedError, match=closed):
        list(llm.stream("Hello", SAMPLED))
    with pytest.raises(ModelClosedError, match=closed):
        llm.submit("Hello", SAMPLED)
    running.abort()  # no-op: the request has ended
    model = weakref.ref(llm.model)
    del llm, running, deltas
    gc.collect()
    assert model() is None


def test_a_request_closed_inside_a_step_longer_than_close_waits_still_ends_with_abort(
    tiny_chat_model, monkeypatch
):
    """close() waits a while (10 s) for the step under way, then returns; its thread stopped after that
    step without ending the open requests, so their readers (a generate() in another thread) waited
    forever."""
    from qwenkit.engine import driver

    monkeypatch.setattr(driver, "SHUTDOWN_WAIT_SECONDS", 0.2)
    llm = LLM.load(tiny_chat_model, dtype="float32", progress=False)
    real_step, slow = llm.engine.step, threading.Event()

    def step():
        if slow.is_set():
            slow.clear()
            time.sleep(1.5)
        return real_step()

    llm.engine.step = step
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)
    deltas = iter(llm.submit("Once upon a time", long))
    assert next(deltas).finish_reason is None  # it runs
    read: list = []
    reader = threading.Thread(target=lambda: read.extend(d.finish_reason for d in deltas), daemon=True)
    reader.start()
    slow.set()
    while slow.is_set():  # the slow step has begun
        time.sleep(0.01)
    llm.close()
    assert llm.driver._thread.is_alive()  # close() returned inside the step
    reader.join(timeout=10)
    assert not reader.is_alive() and read[-1] == "abort"
    assert not llm.driver._thread.is_alive() and not llm.driver._open_ids


def test_a_kept_stream_left_by_break_is_read_on_by_the_next_for_and_stopped_by_close(llm):
    """As the README says: llm.stream()'s stream kept in a variable is a generator, paused by ``break``;
    the next ``for`` reads on from there, and close() stops its request."""
    alone = llm.generate("Once upon a time", SAMPLED)[0].token_ids
    stream = llm.stream("Once upon a time", SAMPLED)
    got = []
    for delta in stream:
        got += delta.token_ids
        break
    got += [t for delta in stream for t in delta.token_ids]
    assert got == alone
    kept = llm.stream("Once upon a time", SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True))
    for _ in kept:
        break
    assert llm.engine.has_unfinished()
    kept.close()
    assert llm.driver.wait_idle(timeout=5) and llm.engine.blocks.usage == 0


def test_partial_stop_suffix():
    assert _partial_stop_suffix("abc<|en", ("<|end|>",)) == 4
    assert _partial_stop_suffix("abc", ("xyz",)) == 0


def test_interleaved_streams_each_get_their_own_tokens(llm):
    """Two readers of one LLM, read in turns: each gets exactly its own tokens (one driver routes them)."""
    short = SamplingParams(**{**SAMPLED.__dict__, "max_tokens": 2})
    alone_a = llm.generate("Once upon a time", SAMPLED)[0].token_ids
    alone_b = llm.generate("The sky is", short)[0].token_ids
    a, b = llm.stream("Once upon a time", SAMPLED), llm.stream("The sky is", short)
    got_a, got_b = next(a).token_ids, next(b).token_ids
    got_a += [t for d in a for t in d.token_ids]
    got_b += [t for d in b for t in d.token_ids]
    assert (got_a, got_b) == (alone_a, alone_b)


def test_a_bad_prompt_in_a_batch_starts_nothing(llm):
    from qwenkit.engine import SamplingParamsError

    with pytest.raises(SamplingParamsError, match="outside the vocabulary"):
        llm.generate(["Hello", [10**9]], SAMPLED)
    assert llm.driver.wait_idle() and not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        (["Hello", "", "Hi"], "prompts[1]: the prompt is empty: give at least one token"),
        (
            [[1, 2], [3, 10**9]],
            "prompts[1]: prompt token id 1000000000 is outside the vocabulary (0..151935)",
        ),
        (
            ["Hello", "Hi " * 9000],
            "prompts[1]: the prompt has 9001 tokens; the context window is 8192, and a ",
        ),
    ],
)
def test_a_refused_prompt_of_several_is_named_by_its_index(llm, prompts, message):
    """One empty or too long prompt among a thousand was refused as "the prompt is empty", naming none
    (as embed and rerank name theirs, ``input[i]``)."""
    from qwenkit.engine import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        llm.generate(prompts, SAMPLED)
    assert str(raised.value).startswith(message)
    assert llm.driver.wait_idle() and not llm.engine.has_unfinished()


@pytest.mark.parametrize(
    ("prompts", "message"),
    [
        ([[1.5, 2]], "prompt token ids must be integers, got 1.5"),  # used to run as token 1
        ([[2, True]], "prompt token ids must be integers, got True"),  # used to run as token 1
        (None, "prompts must be a string or a list of prompts, got None"),
        (5, "prompts must be a string or a list of prompts, got 5"),
        (["Hello", None], "prompts[1]: a prompt must be a string or a list of token ids, got None"),
    ],
)
def test_a_prompt_that_is_not_token_ids_is_refused_by_name(llm, prompts, message):
    from qwenkit.engine import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        llm.generate(prompts, SAMPLED)
    assert str(raised.value) == message
    with pytest.raises(SamplingParamsError, match="prompt_ids must be a list of token ids, got 'Hello'"):
        llm.engine.validate("Hello", SAMPLED)
    with pytest.raises(SamplingParamsError, match=r"^params must be a SamplingParams, got \{'max_tokens'"):
        llm.generate("Hello", {"max_tokens": 2})
    with pytest.raises(SamplingParamsError, match=r"^params must be a SamplingParams"):
        llm.submit("Hello", {"max_tokens": 2})
    assert llm.driver.wait_idle() and not llm.engine.has_unfinished()
    ids = llm.tokenizer.encode("Hello")
    numpy_ids = [np.int64(t) for t in ids]  # integers of another type are token ids all the same
    assert llm.generate([numpy_ids], SAMPLED)[0].token_ids == llm.generate([ids], SAMPLED)[0].token_ids
    assert llm.generate(numpy_ids, SAMPLED)[0].token_ids == llm.generate(ids, SAMPLED)[0].token_ids  # one


@pytest.mark.parametrize("prompt", [b"Hello", bytearray(b"Hello")])
def test_a_bytes_prompt_is_refused_not_run_as_its_byte_values(llm, prompt):
    """bytes are a sequence of ints: b"Hello" ran silently as the token ids [72, 101, 108, 108, 111]."""
    from qwenkit.engine import SamplingParamsError

    message = f"^a prompt must be a string or a list of token ids, got {re.escape(repr(prompt))}$"
    for call in (
        lambda: llm.generate(prompt, SAMPLED),
        lambda: llm.submit(prompt, SAMPLED),
        lambda: list(llm.stream(prompt, SAMPLED)),
        lambda: llm.router_stats(prompt),
    ):
        with pytest.raises(SamplingParamsError, match=message):
            call()
    with pytest.raises(SamplingParamsError, match=message.replace("^", r"^prompts\[1\]: ")):
        llm.generate(["Hello", prompt], SAMPLED)
    assert llm.driver.wait_idle() and not llm.engine.has_unfinished()


@pytest.mark.parametrize("params", [0, {}, "", []])
def test_falsy_params_that_are_not_sampling_params_are_refused_not_replaced_by_the_defaults(llm, params):
    """``params or default_params()`` ran 0, {} or "" silently on the model's defaults; ``chat`` and
    ``infill`` failed on a missing attribute."""
    from qwenkit.chat import build_prompt, chat
    from qwenkit.engine import SamplingParamsError

    message = f"^params must be a SamplingParams, got {re.escape(repr(params))}$"
    hi = [{"role": "user", "content": "Hi"}]
    for call in (
        lambda: llm.generate("Hello", params),
        lambda: llm.submit("Hello", params),
        lambda: list(llm.stream("Hello", params)),
        lambda: chat(llm, hi, params),
        lambda: build_prompt(llm, hi, params),
        lambda: chat(llm, hi, {"temperature": 0}),
    ):
        with pytest.raises(SamplingParamsError, match=message.replace(re.escape(repr(params)), ".*")):
            call()
    with pytest.raises(SamplingParamsError, match=message):
        llm.generate("Hello", params)
    assert llm.driver.wait_idle() and not llm.engine.has_unfinished()
    assert llm.params_or_default(None) == llm.default_params()


def test_a_request_id_in_use_is_refused_at_submit_and_never_taken_by_a_generated_one(llm):
    """A caller's id already running used to be accepted and its request to end in "error" when the
    engine's thread met it; a caller's "req-N" made the N-th unnamed request fail that way."""
    from qwenkit.engine import SamplingParamsError

    long = SamplingParams(**{**SAMPLED.__dict__, "max_tokens": 40})
    named = llm.submit("Once upon a time", long, request_id="x")
    with pytest.raises(SamplingParamsError, match="^request id 'x' is already in use$"):
        llm.submit("The sky is", SAMPLED, request_id="x")
    taken = [llm.submit("Hi", long, request_id=f"req-{n}") for n in range(40)]  # every id it may try next
    unnamed = llm.submit("The sky is", SAMPLED)
    assert unnamed.request_id not in {s.request_id for s in taken}
    assert list(unnamed)[-1].finish_reason == "length" and len(unnamed.completion.token_ids) == 24
    assert list(named)[-1].finish_reason == "length" and len(named.completion.token_ids) == 40
    again = llm.submit("The sky is", SAMPLED, request_id="x")  # free again once its request has ended
    assert list(again)[-1].finish_reason == "length"
    assert again.completion.token_ids == unnamed.completion.token_ids
    for s in taken:
        s.abort()
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_a_late_abort_never_stops_a_later_request_under_the_same_id(llm):
    """An abort its stream sent just as its request ended (a stop string found as the engine finished it)
    reached the driver after the caller had reused the id, and stopped the new request."""
    first = llm.submit("Once upon a time", SAMPLED, request_id="y")
    assert list(first)[-1].finish_reason == "length"
    again = llm.submit("The sky is", SAMPLED, request_id="y")
    first._stream.finished = False  # as if its reader had not yet seen the end when it aborted
    first._stream.abort()
    assert list(again)[-1].finish_reason == "length" and len(again.completion.token_ids) == 24
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_a_request_aborted_before_its_batch_is_sent_never_runs(llm):
    """Inside together() the batch goes to the engine at the end: an abort before then reached the engine
    before the request, and the request ran to its end."""
    with llm.driver.together():
        stream = llm.submit("Once upon a time", SAMPLED)
        stream.abort()
    assert list(stream)[-1].finish_reason == "abort" and stream.completion.token_ids == []
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


@pytest.mark.parametrize("request_id", [["a"], {"a": 1}, ("a", [1])])
def test_a_request_id_that_cannot_be_hashed_is_refused_by_name(llm, request_id):
    """It failed with a bare ``TypeError: unhashable type: 'list'`` from the driver's id set."""
    from qwenkit.engine import SamplingParamsError

    message = f"^request_id must be hashable \\(a string or an int\\), got {re.escape(repr(request_id))}$"
    with pytest.raises(SamplingParamsError, match=message):
        llm.submit("Hello", SAMPLED, request_id=request_id)
    assert llm.driver.wait_idle() and not llm.engine.has_unfinished()
    assert list(llm.submit("Hello", SAMPLED, request_id=7))[-1].finish_reason == "length"


@pytest.mark.parametrize("loop", ["yes", True])
def test_a_loop_that_is_not_an_event_loop_is_refused_at_submit_and_the_engine_runs_on(llm, loop):
    """It was accepted, and the engine's thread died on its first output (``'str' object has no attribute
    'call_soon_threadsafe'``): every request of that LLM then waited for ever."""
    from qwenkit.engine import SamplingParamsError

    own = LLM(llm.model, llm.tokenizer, max_batch_size=2)  # a thread that dies takes only this one
    try:
        running = own.submit("Once upon a time", SAMPLED)
        with pytest.raises(
            SamplingParamsError, match=f"^loop must be an asyncio event loop or None, got {loop!r}$"
        ):
            own.submit("Hello", SAMPLED, loop=loop)
        assert list(running)[-1].finish_reason == "length" and len(running.completion.token_ids) == 24
        assert running.completion.token_ids == llm.generate("Once upon a time", SAMPLED)[0].token_ids
    finally:
        own.close()


def test_load_refuses_an_unknown_device_or_an_empty_batch_by_name(tiny_chat_model):
    """device="tpu" failed inside torch (a list of twenty device types); max_batch_size=0 was reported
    as "the KV cache holds 0 tokens"."""
    from qwenkit.engine import SamplingParamsError
    from qwenkit.errors import ConfigError

    with pytest.raises(ConfigError, match=r"^unknown device 'tpu'; choose cpu or cuda \(cuda:N\)$"):
        LLM.load(tiny_chat_model, device="tpu", progress=False)
    with pytest.raises(SamplingParamsError, match="^max_batch_size must be at least 1, got 0$"):
        LLM.load(tiny_chat_model, dtype="float32", max_batch_size=0, progress=False)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("max_seq_len", "100", "max_seq_len must be an integer, got '100'"),
        ("max_seq_len", 100.5, "max_seq_len must be an integer, got 100.5"),
        ("max_batch_size", "2", "max_batch_size must be an integer, got '2'"),
        ("kv_cache_memory", "1GB", "kv_cache_memory must be an integer, got '1GB'"),
    ],
)
def test_load_refuses_sizes_that_are_not_integers_by_name(tiny_chat_model, option, value, message):
    """A str or float size failed with a bare TypeError ("'<' not supported between instances of 'str'
    and 'int'"; 100.5 only after the weights had loaded)."""
    from qwenkit.errors import ConfigError

    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        LLM.load(tiny_chat_model, dtype="float32", progress=False, **{option: value})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"path": 5}, "path must be a model directory or a .gguf file (a str or Path), got 5"),
        ({"adapter": 5}, "adapter must be a path to a LoRA adapter (a str or Path) or None, got 5"),
        ({"adapters": ["a"]}, "adapters must map names to adapter paths, got ['a']"),
        ({"adapters": {"a": 5}}, "adapters must map names to adapter paths, got {'a': 5}"),
        ({"max_loras": "2"}, "max_loras must be an integer, got '2'"),
        ({"max_lora_rank": "8"}, "max_lora_rank must be an integer, got '8'"),
        ({"prefix_caching": "no"}, "prefix_caching must be True or False, got 'no'"),
        ({"dequantize": "yes"}, "dequantize must be True or False, got 'yes'"),
        ({"cuda_graphs": "no"}, "cuda_graphs must be True, False or None, got 'no'"),
        ({"kv_cache_memory": 0}, "kv_cache_memory must be a positive number of bytes, got 0"),
        ({"kv_cache_memory": -1}, "kv_cache_memory must be a positive number of bytes, got -1"),
        (
            {"device": 5, "dtype": "auto", "kv_cache_memory": 10**6},
            "unknown device 5; choose cpu or cuda (cuda:N)",
        ),
        *[
            ({"dtype": dtype}, f"dtype {dtype} cannot run a model; choose auto, float32, bfloat16, float16")
            for dtype in (torch.int8, torch.bool, torch.float8_e4m3fn)
        ],
    ],
)
def test_load_refuses_arguments_of_the_wrong_type_by_name(tiny_chat_model, kwargs, message):
    """A path of 5 failed in pathlib (``expected str, bytes or os.PathLike object``), adapters as a
    list in dict(), a str max_loras in a comparison after the weights had loaded; "no" turned prefix
    caching or CUDA graphs on. kv_cache_memory=0 was "the KV cache holds 1 tokens"; a device of 5 with
    kv_cache_memory an AttributeError; dtype=torch.int8 loaded, then failed every step in a kernel."""
    from qwenkit.errors import ConfigError

    args = {"path": tiny_chat_model, "dtype": "float32", "progress": False, **kwargs}
    with pytest.raises(ConfigError) as raised:
        LLM.load(args.pop("path"), **args)
    assert str(raised.value) == message


def test_load_takes_a_torch_device_as_its_name(tiny_chat_model):
    """device=torch.device("cpu") was refused as "unknown device device(type='cpu')"."""
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    args = {"dtype": "float32", "progress": False, "kv_cache_memory": 1 << 20}
    with LLM.load(tiny_chat_model, device="cpu", **args) as by_name:
        expected = by_name.generate("Hello", params)[0].token_ids
    with LLM.load(tiny_chat_model, device=torch.device("cpu"), **args) as by_device:
        assert by_device.model.model.norm.weight.device == torch.device("cpu")
        assert by_device.generate("Hello", params)[0].token_ids == expected


def test_load_with_no_path_is_the_bundled_model_as_the_commands_default():
    from qwenkit.default_model import default_model_path

    with LLM.load(max_seq_len=64, progress=False) as bundled:
        assert bundled.path == str(default_model_path())
        assert (bundled.model_config.hidden_size, bundled.model_config.num_hidden_layers) == (576, 30)
        assert bundled.tokenizer.encode("Hello") == [19556]


def test_load_adapter_refuses_a_path_of_the_wrong_type_by_name(llm):
    """None failed in pathlib: ``expected str, bytes or os.PathLike object, not NoneType``."""
    from qwenkit.errors import ConfigError

    with pytest.raises(ConfigError, match="^adapter path must be a str or Path, got None$"):
        llm.load_adapter("sql", None)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_batch_size": "2"}, "max_batch_size must be an integer, got '2'"),  # was "at least 1, got '2'"
        ({"max_seq_len": "100"}, "max_seq_len must be an integer or None, got '100'"),
        ({"kv_cache_tokens": 1.5}, "kv_cache_tokens must be an integer or None, got 1.5"),
        ({"prefill_chunk": "64"}, "prefill_chunk must be an integer, got '64'"),
        ({"prefill_chunk": 0}, "prefill_chunk must be at least 1, got 0"),  # a request never started
    ],
)
def test_an_llm_made_from_a_model_refuses_bad_engine_sizes_by_name(llm, kwargs, message):
    """``LLM(model, tokenizer, ...)`` (and ``Engine``) took these unchecked: a str max_seq_len failed
    in the pool's arithmetic, and prefill_chunk=0 left every request waiting for ever."""
    from qwenkit.engine import SamplingParamsError

    with pytest.raises(SamplingParamsError) as raised:
        LLM(llm.model, llm.tokenizer, **kwargs)
    assert str(raised.value) == message


def test_a_stream_read_the_wrong_way_says_how_and_ends_its_request(llm):
    """An assert (an AssertionError, and under python -O a failure on a None queue) said which way to
    read; now a QwenkitError does, and the request is aborted, its KV memory freed."""
    import asyncio

    from qwenkit.engine.driver import StreamKindError

    async def both() -> None:
        with pytest.raises(StreamKindError, match=r"^this stream was opened for asyncio \(loop=...\)"):
            list(llm.submit("Hello", SAMPLED, loop=asyncio.get_running_loop()))
        with pytest.raises(StreamKindError, match="^this stream was opened without an event loop"):
            async for _ in llm.submit("Hello", SAMPLED):
                pass

    asyncio.run(both())
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_stop_token_ids_are_not_in_the_text(llm):
    """A non-special stop token ends the request but is not shown, as in the OpenAI API."""
    full = llm.generate("Once upon a time", SAMPLED)[0]
    stop_id = full.token_ids[5]
    cut = llm.generate(
        "Once upon a time", SamplingParams(**{**SAMPLED.__dict__, "stop_token_ids": (stop_id,)})
    )[0]
    first = full.token_ids.index(stop_id)
    assert cut.token_ids == full.token_ids[: first + 1] and cut.finish_reason == "stop"
    assert cut.text == llm.tokenizer.decode(full.token_ids[:first], skip_special=True)


def test_default_params_follow_generation_config(tmp_path):
    """A generation_config.json that names no sampling values means transformers' defaults: greedy."""
    from factories import write_tiny_chat_model

    path = write_tiny_chat_model(tmp_path / "m", generation_config={"eos_token_id": 2})
    llm = LLM.load(path, dtype="float32", progress=False)
    params = llm.default_params()
    assert params.greedy and params.repetition_penalty == 1.0 and params.top_p == 1.0
    sampled = write_tiny_chat_model(
        tmp_path / "s", generation_config={"do_sample": True, "temperature": 0.6, "top_k": 20}
    )
    p2 = LLM.load(sampled, dtype="float32", progress=False).default_params(top_k=5)
    assert (p2.temperature, p2.top_k, p2.top_p, p2.repetition_penalty) == (0.6, 5, 1.0, 1.0)


def test_null_values_in_generation_config_are_unset_as_transformers_reads_them(tmp_path):
    """Nulls (as GenerationConfig writes for fields it leaves unset) failed the load with 'top_k must be
    an integer, got None'; transformers fills them with its defaults, and so does qwenkit."""
    import transformers
    from factories import write_tiny_chat_model

    config = {"do_sample": True, "temperature": None, "top_k": None, "top_p": 0.9, "max_new_tokens": None}
    path = write_tiny_chat_model(tmp_path / "m", generation_config=config)
    params = LLM.load(path, dtype="float32", progress=False).default_params()
    theirs = transformers.GenerationConfig.from_pretrained(path)
    defaults = theirs._get_default_generation_params()
    assert (params.temperature, params.top_k, params.top_p) == (
        defaults["temperature"],
        defaults["top_k"],
        0.9,
    )
    assert (params.temperature, params.top_k, params.max_tokens) == (1.0, 50, 512)


def test_generate_queues_its_prompts_together_so_the_engines_steps_do_not_depend_on_timing(llm, monkeypatch):
    """Tensor-parallel ranks each run the same `generate`: all its requests must be in the engine before
    its first step, however slowly the caller got to them (a driver thread racing the submissions could
    otherwise batch them differently on each rank)."""
    engine = llm.engine
    seen: list[int] = []
    step = engine.step

    def counting_step():
        seen.append(len(engine.requests))
        return step()

    monkeypatch.setattr(engine, "step", counting_step)
    slow_encode = llm.encode

    def encode(prompt):  # a slow caller: the driver thread would take the first request alone
        time.sleep(0.05)
        return slow_encode(prompt)

    monkeypatch.setattr(llm, "encode", encode)
    params = llm.default_params(max_tokens=3, temperature=0.0, ignore_eos=True)
    completions = llm.generate(["one", "two two", "three three three", "four"], params)
    assert [len(c.token_ids) for c in completions] == [3, 3, 3, 3]
    assert seen[0] == 4


def test_an_llm_no_longer_referenced_stops_its_thread_and_frees_the_model(tiny_chat_model):
    """Its engine thread held the model until the process exited: a notebook that loaded a model again
    into the same name kept both. A stream keeps its LLM alive while it is read."""
    deltas = list(LLM.load(tiny_chat_model, dtype="float32", progress=False).stream("Hello", SAMPLED))
    assert deltas[-1].finish_reason == "length"  # not "abort": the temporary LLM lived for its stream
    llm = LLM.load(tiny_chat_model, dtype="float32", progress=False)
    assert llm.generate("Hello", SAMPLED)[0].token_ids == [t for d in deltas for t in d.token_ids]
    thread, model = llm.driver._thread, weakref.ref(llm.model)
    assert thread is not None and thread.is_alive()
    del llm
    gc.collect()
    thread.join(timeout=10)
    assert not thread.is_alive() and model() is None


def test_a_stop_string_that_is_a_special_tokens_text_stops_on_that_token(llm):
    """A special token's text never shows (skip_special_tokens), so a stop string spelling it (clients
    send ``stop: ["<|im_start|>"]``) is matched by the token itself, or it never ends the request."""
    im_start = llm.tokenizer.added_tokens["<|im_start|>"]
    assert im_start in llm.tokenizer.special_token_ids and im_start not in llm.eos_token_ids
    forced = {**SAMPLED.__dict__, "max_tokens": 8, "logit_bias": ((im_start, 100.0),)}
    forced["stop"] = ("<|im_start|>",)
    cut = llm.generate("Once upon a time", SamplingParams(**forced))[0]
    assert (cut.token_ids, cut.text, cut.finish_reason) == ([im_start], "", "stop")
    forced["include_stop_str_in_output"] = True
    kept = llm.generate("Once upon a time", SamplingParams(**forced))[0]
    assert (kept.token_ids, kept.text, kept.finish_reason) == ([im_start], "<|im_start|>", "stop")
    im_end = llm.tokenizer.added_tokens["<|im_end|>"]  # eos: it ends the reply as before, without its text
    eos = {**forced, "logit_bias": ((im_end, 100.0),), "stop": ("<|im_end|>",)}
    ended = llm.generate("Once upon a time", SamplingParams(**{**eos, "ignore_eos": False}))[0]
    assert (ended.token_ids, ended.text, ended.finish_reason) == ([im_end], "", "stop")
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_an_id_whose_reader_has_gone_stays_in_use_until_its_request_has_ended(llm, monkeypatch):
    """Outputs for a reader whose event loop has closed cannot be delivered, so the request is aborted;
    its id was freed at once while the engine still held the request until its next step, and a new
    request under that id in between was accepted, then ended in "error" ("already in use")."""
    import asyncio

    from qwenkit.engine import SamplingParamsError

    gone = asyncio.new_event_loop()
    gone.close()
    real_step, produced, seen = llm.engine.step, [], {}

    def step():  # runs in the engine's thread, between the driver's handling of two steps' outputs
        if produced and not seen:
            try:
                seen["accepted"] = llm.submit("Hi", SAMPLED, request_id="z")
            except SamplingParamsError as e:
                seen["refused"] = str(e)
        outputs = real_step()
        produced.extend(o for o in outputs if o.request_id == "z" and o.finish_reason is None)
        return outputs

    monkeypatch.setattr(llm.engine, "step", step)
    held = llm.submit("Once upon a time", SAMPLED, request_id="z", loop=gone)  # a dropped stream aborts
    assert llm.driver.wait_idle() and held.request_id == "z"
    assert seen == {"refused": "request id 'z' is already in use"}
    again = llm.submit("The sky is", SAMPLED, request_id="z")  # free once the engine let it go
    assert list(again)[-1].finish_reason == "length" and len(again.completion.token_ids) == 24
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_a_stream_dropped_unread_aborts_its_request_and_frees_its_kv_memory(llm):
    """``submit`` starts the request at once; a TextStream dropped before anything read it (a handler that
    returned early) can never be read, yet its request ran on to max_tokens holding its KV blocks. One
    whose iterator is still held runs on: only the stream's last reference stops it."""
    long = SamplingParams(temperature=0, max_tokens=4000, ignore_eos=True)  # seconds of steps
    llm.submit("Once upon a time", long)
    gc.collect()
    assert llm.driver.wait_idle(timeout=5) and llm.engine.blocks.usage == 0
    deltas = iter(llm.submit("Once upon a time", SAMPLED))  # the stream goes, its reader stays
    gc.collect()
    assert [t for d in deltas for t in d.token_ids] == llm.generate("Once upon a time", SAMPLED)[0].token_ids
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_a_stream_read_on_another_event_loop_than_its_own_says_so_and_ends_its_request(llm):
    """Outputs go to the loop given at submit; read under another one (a script's module-level
    ``asyncio.get_event_loop()``, then ``asyncio.run``) they never arrived and ``async for`` hung."""
    import asyncio

    from qwenkit.engine.driver import StreamKindError

    other = asyncio.new_event_loop()

    async def read() -> None:
        with pytest.raises(StreamKindError, match=r"^this stream was opened for another event loop"):
            await asyncio.wait_for(llm.submit("Hello", SAMPLED, loop=other).__aiter__().__anext__(), 10)

    try:
        asyncio.run(read())
    finally:
        other.close()
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0
