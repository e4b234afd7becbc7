"""An embedding model's GGUF as llama.cpp's converter lays it out (``{arch}.pooling_type``, the EOS its
tokenizer appends, no ``output.weight``), written here with gguf-py so it runs on every machine:
tests/gguf/test_gguf_embeddings.py runs llama.cpp's own converter and ``llama-embedding`` where the
llama-cpp-python sdist is unpacked."""

from __future__ import annotations

import json
import re

import gguf
import pytest
import torch
from factories import hf_model
from gguf_files import tiny_vocab

from qwenkit.engine import SamplingParamsError
from qwenkit.errors import ConfigError
from qwenkit.generate import LLM

TEXTS = ["the cat sat", "hi", "a b c d e"]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return hf_model("qwen3", vocab_size=len(tiny_vocab()[0]), tie_word_embeddings=False).eval()


def write(tmp_path, gguf_writer, model, pooling: int):
    """The bare decoder's tensors (no lm_head, as Qwen3-Embedding-8B's files), pooling ``pooling``, and
    add_eos_token with the EOS id 2 of the tiny vocabulary."""

    def embedding_keys(w) -> None:
        w.add_pooling_type(gguf.PoolingType(pooling))
        w.add_add_eos_token(True)

    state = {n: p.detach() for n, p in model.named_parameters() if n != "lm_head.weight"}
    path = tmp_path / f"pool{pooling}.gguf"
    return gguf_writer(
        path, "qwen3", model.config.to_dict(), state, gguf.GGMLQuantizationType.F32, extra=embedding_keys
    )


def test_a_last_pooling_gguf_embeds_as_transformers_runs_its_weights(tmp_path, gguf_writer, model):
    """Each text's ids end in the EOS add_eos_token asks for; its embedding is the final-norm hidden state
    of that last token, L2-normalized, as transformers' bare Qwen3Model computes it."""
    llm = LLM.load(write(tmp_path, gguf_writer, model, 3), dtype="float32", progress=False)
    got = torch.tensor(llm.embed(TEXTS))
    for text, vector in zip(TEXTS, got, strict=True):
        ids = llm.encode(text)
        assert ids[-1] == 2 and ids[:-1] == llm.tokenizer.encode(text)
        with torch.no_grad():
            hidden = model.model(torch.tensor([ids])).last_hidden_state[0, -1]
        torch.testing.assert_close(vector, torch.nn.functional.normalize(hidden, dim=0), rtol=0, atol=2e-6)
    with pytest.raises(SamplingParamsError, match="no output head .* it computes embeddings, not text"):
        llm.generate("hi")


@pytest.mark.parametrize("value, named", [(1, "1 (mean)"), (2, "2 (cls)")])
def test_another_pooling_in_the_file_is_refused_by_name(tmp_path, gguf_writer, model, value, named):
    llm = LLM.load(write(tmp_path, gguf_writer, model, value), dtype="float32", progress=False)
    with pytest.raises(ConfigError, match=re.escape(f"qwen3.pooling_type is {named}")):
        llm.embed("hi")


def test_text_commands_refuse_a_headless_gguf_before_loading_it(
    tmp_path, gguf_writer, model, capsys, monkeypatch
):
    """No output.weight: it computes embeddings only, and fine-tuning failed at its first logits with
    a traceback (MissingHead's ValueError), generate after loading it."""
    from qwenkit.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    path = write(tmp_path, gguf_writer, model, 3)
    monkeypatch.setattr(LLM, "load", never)
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    for argv in (
        ["generate", str(path), "-p", "hi"],
        ["finetune", str(path), str(tmp_path / "d.jsonl"), str(tmp_path / "o")],
    ):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err.startswith(f"error: {path} has no output head (an embedding model's bare decoder)"), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "pool3.gguf"]
