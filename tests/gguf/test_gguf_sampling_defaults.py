"""A GGUF file's ``general.sampling.*`` keys (llama.cpp's converter writes them from generation_config.json,
and llama.cpp samples with them) are the model's default sampling, as a directory's generation_config.json
is: under the user's flags and a request's fields, over qwenkit's fallback."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import gguf
import httpx
import pytest
from factories import hf_model
from gguf_files import Q, tiny_vocab, write_gguf

from qwenkit.cli import chat as chat_cli
from qwenkit.cli import generate as generate_cli
from qwenkit.cli.info import describe
from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
from qwenkit.engine.sampling import SamplingParams
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
from live import LiveServer

# as llama.cpp's converter writes a generation_config.json of temperature 0.8, top_p 0.95, top_k 40,
# min_p 0.05 and repetition_penalty 1.1 (float32: 0.800000011920929 in the file)
NAMED = {"temperature": 0.8, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1}


def _write(path: Path, sampling=None) -> Path:
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}
    return write_gguf(path, "qwen2", model.config.to_dict(), state, Q.F16, extra=sampling)


def _all_keys(w: gguf.GGUFWriter) -> None:
    w.add_sampling_temp(0.8)
    w.add_sampling_top_p(0.95)
    w.add_sampling_top_k(40)
    w.add_sampling_min_p(0.05)
    w.add_sampling_penalty_repeat(1.1)


@pytest.fixture(scope="module")
def named_path(tmp_path_factory) -> Path:
    return _write(tmp_path_factory.mktemp("named") / "named.gguf", _all_keys)


@pytest.fixture(scope="module")
def named_llm(named_path) -> LLM:
    return LLM.load(named_path, dtype="float32", max_seq_len=64, progress=False)


def _sampling(p: SamplingParams) -> dict[str, object]:
    return {k: getattr(p, k) for k in (*NAMED, "max_tokens")}


def _info_row(path: Path) -> str:
    """The value of ``qwenkit info``'s sampling row."""
    (line,) = [line for line in describe(str(path)).splitlines() if "sampling (the file's)" in line]
    return line.split("sampling (the file's)", 1)[1].strip()


def test_the_files_sampling_is_the_default_and_a_flag_overrides_one(named_path, named_llm) -> None:
    raw = gguf.GGUFReader(named_path).fields["general.sampling.temp"]
    assert float(raw.parts[raw.data[0]][0]) == 0.800000011920929  # what the file holds
    assert _sampling(named_llm.default_params()) == {**NAMED, "max_tokens": 512}  # 512: transformers'
    assert _sampling(named_llm.default_params(top_k=5)) == {**NAMED, "top_k": 5, "max_tokens": 512}


def test_a_file_without_sampling_keys_keeps_the_fallback(tmp_path) -> None:
    llm = LLM.load(_write(tmp_path / "plain.gguf"), dtype="float32", max_seq_len=64, progress=False)
    expected = {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0, "repetition_penalty": 1.05}
    assert _sampling(llm.default_params()) == {**expected, "max_tokens": 512}
    assert _info_row(tmp_path / "plain.gguf") == "none named (qwenkit's defaults apply)"


def test_a_file_naming_some_runs_as_the_directory_made_from_it(tmp_path) -> None:
    """What the file leaves out is what its converted generation_config.json leaves out: transformers'
    default (top_p 1.0), or off (top_k), not qwenkit's fallback. That directory's min_p is read too (a
    generation_config.json's min_p was dropped)."""

    def some(w: gguf.GGUFWriter) -> None:
        w.add_sampling_temp(0.6)
        w.add_sampling_min_p(0.05)

    path = _write(tmp_path / "some.gguf", some)
    from_file = LLM.load(path, dtype="float32", max_seq_len=64, progress=False).default_params()
    converted = convert_gguf_to_hf(path, tmp_path / "hf")
    from_dir = LLM.load(converted, dtype="float32", max_seq_len=64, progress=False).default_params()
    assert from_file == from_dir
    expected = {"temperature": 0.6, "top_p": 1.0, "top_k": 0, "min_p": 0.05, "repetition_penalty": 1.0}
    assert _sampling(from_file) == {**expected, "max_tokens": 512}


def test_info_shows_the_files_sampling(named_path) -> None:
    row = "temperature 0.8, top_p 0.95, top_k 40, min_p 0.05, repetition_penalty 1.1"
    assert _info_row(named_path) == row


class _Asked(Exception):
    """Raised by a stand-in for LLM.generate: the params it was asked with are what is checked."""


def test_generate_and_chat_default_to_the_files_sampling(named_path, named_llm, monkeypatch, capsys) -> None:
    monkeypatch.setattr(generate_cli, "load_llm", lambda args, tensor_parallel=None: named_llm)
    seen: list[SamplingParams] = []

    def asked(self, prompt, params):
        seen.append(params)
        raise _Asked

    monkeypatch.setattr(LLM, "generate", asked)
    with pytest.raises(_Asked):
        generate_cli.main([str(named_path), "-p", "hi", "--json", "--temperature", "0.3"])
    assert _sampling(seen[0]) == {**NAMED, "temperature": 0.3, "max_tokens": 512}

    monkeypatch.setattr(chat_cli, "load_llm", lambda args: named_llm)
    monkeypatch.setattr(sys, "stdin", io.StringIO(":conf\n"))
    assert chat_cli.main([str(named_path), "--top-p", "0.5"]) == 0
    out = capsys.readouterr().out
    for line in ("temperature=0.8", "top_p=0.5", "top_k=40", "min_p=0.05", "repetition_penalty=1.1"):
        assert f"\n{line}\n" in out, out


def test_the_server_echoes_the_files_sampling(named_llm) -> None:
    app = create_app(named_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    with LiveServer(app) as live:
        body = {"model": "tiny", "input": "hi", "max_output_tokens": 2}
        got = httpx.post(f"{live.url}/v1/responses", json=body, timeout=60).json()
        assert (got["temperature"], got["top_p"]) == (0.8, 0.95)
        got = httpx.post(f"{live.url}/v1/responses", json={**body, "temperature": 0.2}, timeout=60).json()
        assert (got["temperature"], got["top_p"]) == (0.2, 0.95)


def test_a_sampling_key_of_the_wrong_type_is_refused_by_name(tmp_path) -> None:
    """As a generation_config.json's is: read as the default, a string temperature would fail every
    request as 'temperature must be a number', for an option never passed."""
    from qwenkit.checkpoint.gguf import GGUFError

    path = _write(tmp_path / "bad.gguf", lambda w: w.add_string("general.sampling.temp", "0.8"))
    message = r"bad.gguf: general.sampling.temp must be a number, not '0.8'$"
    with pytest.raises(GGUFError, match=message):
        LLM.load(path, dtype="float32", max_seq_len=64, progress=False)
    with pytest.raises(GGUFError, match=message):  # it wrote the string into generation_config.json
        convert_gguf_to_hf(path, tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]  # nothing half-written
