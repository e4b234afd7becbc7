"""The parsed GGUF header is cached per file version: reused while the file is unchanged, rebuilt when it
changes or the entry is damaged, and never needed (a read-only cache directory still loads)."""

from __future__ import annotations

import os

import pytest
import torch
from factories import hf_model

from qwenkit.checkpoint import gguf_index
from qwenkit.checkpoint.gguf import read_gguf


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("QWENKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_index, "MIN_CACHED_BYTES", 0)
    return tmp_path / "cache" / "gguf-index"


@pytest.fixture
def model_file(tmp_path, gguf_writer):
    model = hf_model("qwen2")
    config = model.config.to_dict()
    return gguf_writer(tmp_path / "m.gguf", "qwen2", config, model.state_dict())


def parses(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = gguf_index._parse

    def counting(path):
        calls.append(1)
        return real(path)

    monkeypatch.setattr(gguf_index, "_parse", counting)
    return calls


def weights(path) -> dict[str, torch.Tensor]:
    return dict(read_gguf(path).tensors())


def test_second_open_reads_the_cache_and_gets_the_same_checkpoint(cache, model_file, monkeypatch):
    calls = parses(monkeypatch)
    first = read_gguf(model_file)
    assert len(calls) == 1 and len(list(cache.glob("*.json"))) == 1
    second = read_gguf(model_file)
    assert len(calls) == 1  # not parsed again
    assert second.metadata == first.metadata and second.hf_config == first.hf_config
    assert second.tokenizer.to_str() == first.tokenizer.to_str()
    a, b = weights(model_file), weights(model_file)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_changed_file_is_parsed_again(cache, model_file, gguf_writer, monkeypatch):
    calls = parses(monkeypatch)
    read_gguf(model_file)
    other = hf_model("qwen2", num_hidden_layers=1)
    gguf_writer(model_file, "qwen2", other.config.to_dict(), other.state_dict())  # same path, new file
    st = model_file.stat()
    os.utime(model_file, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert read_gguf(model_file).hf_config["num_hidden_layers"] == 1
    assert len(calls) == 2 and len(list(cache.glob("*.json"))) == 2


def test_a_damaged_entry_is_rebuilt(cache, model_file, monkeypatch):
    read_gguf(model_file)
    (entry,) = cache.glob("*.json")
    entry.write_text('{"metadata": {"general.architecture": "qw')  # cut short, as by a crash
    calls = parses(monkeypatch)
    assert read_gguf(model_file).architecture == "qwen2"
    assert len(calls) == 1
    assert read_gguf(model_file).architecture == "qwen2" and len(calls) == 1  # rewritten whole
    assert not list(cache.glob("*.tmp"))


def test_an_unwritable_cache_still_loads(tmp_path, model_file, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("QWENKIT_CACHE", str(blocker))
    monkeypatch.setattr(gguf_index, "MIN_CACHED_BYTES", 0)
    assert read_gguf(model_file).architecture == "qwen2"
