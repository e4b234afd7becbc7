"""A GGUF's tokenizer.ggml.add_bos_token decides whether raw prompts get its BOS, as transformers' GGUF
import and llama.cpp read it; the bundled SmolLM2 file says false, so its prompts are unchanged."""

from __future__ import annotations

import pytest
import transformers
from factories import hf_model
from gguf_files import Q, tiny_vocab

from qwenkit.generate import tokenizer_for

TEXTS = ["the thin cat in a hat", " the<|im_end|>x <think> 12345 你好", "\n\n  a  ", ""]


@pytest.mark.parametrize("add_bos", [True, False])
def test_add_bos_token_matches_transformers(tmp_path, gguf_writer, add_bos) -> None:
    model = hf_model("llama", vocab_size=len(tiny_vocab()[0]))
    params = {n: p.detach() for n, p in model.named_parameters()}
    path = gguf_writer(
        tmp_path / "tiny.gguf", "llama", model.config.to_dict(), params, Q.F32, add_bos=add_bos
    )
    ours = tokenizer_for(path)
    reference = transformers.AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    bos = 0  # the file's tokenizer.ggml.bos_token_id
    assert ours.sequence_special_ids == (((bos,) if add_bos else ()), ())
    for text in TEXTS:  # special-token text parsed as transformers parses it; plain text by default
        assert ours.encode_prompt(text, allow_special=True) == reference(text)["input_ids"], text
        assert ours.encode_prompt(text) == [bos] * add_bos + ours.encode(text)


def test_smollm2_prompts_get_no_bos(smollm_path, hf_smollm_tokenizer) -> None:
    ours = tokenizer_for(smollm_path)
    assert ours.sequence_special_ids == ((), ())
    for text in ["Hello world", "The capital of France is", ""]:
        assert ours.encode_prompt(text) == ours.encode(text) == hf_smollm_tokenizer(text)["input_ids"]
