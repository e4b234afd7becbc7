"""A Llama 3.2 Instruct GGUF, as llama.cpp's converter writes it, names one eos (``<|eot_id|>``); llama.cpp
ends a generation on every end-of-generation token the vocabulary has (``<|eom_id|>`` and
``<|end_of_text|>`` too), as the Hugging Face release's eos list [128001, 128008, 128009] does."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from gguf_files import write_llama32_gguf
from llama_tokenizers import LLAMA32_EOS, write_llama32_chat_model
from safetensors.torch import load_file, save_file

from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM, tokenizer_for

EOM = 128008
CHAT = [{"role": "user", "content": "Hi there"}]


def greedy(model_dir, ids: list[int]) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    # greedy, ending on its generation_config eos (a converted one also asks for a repetition penalty)
    out = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False, repetition_penalty=1.0)
    return out[0, len(ids) :].tolist()


@pytest.fixture(scope="module")
def llama32(tmp_path_factory):
    """(HF directory, its GGUF, chat prompt ids, transformers' greedy reply): the reply's fourth token is
    <|eom_id|>, whose embedding row is made a larger copy of the token the model chose there."""
    hf_dir = write_llama32_chat_model(tmp_path_factory.mktemp("llama32") / "hf")
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ids = tok.apply_chat_template(CHAT, add_generation_prompt=True, date_string="26 Jul 2024")["input_ids"]
    chosen = greedy(hf_dir, ids)[3]
    weights = hf_dir / "model.safetensors"
    state = load_file(str(weights))
    state["model.embed_tokens.weight"][EOM] = state["model.embed_tokens.weight"][chosen] * 1.5
    save_file(state, str(weights), metadata={"format": "pt"})
    reply = greedy(hf_dir, ids)
    assert len(reply) == 4 and reply[-1] == EOM
    gguf_path = write_llama32_gguf(hf_dir, hf_dir.parent / "llama32.gguf")
    return hf_dir, gguf_path, ids, reply


@pytest.mark.parametrize("source", ["gguf", "hf"])
def test_gguf_stops_on_eom_as_llama_cpp_and_the_hf_release(llama32, source):
    """Before, a GGUF stopped only on <|eot_id|>: past <|eom_id|> the reply ran on to max_tokens. The
    Hugging Face directory (its generation_config's eos list) stops there as transformers does."""
    hf_dir, gguf_path, ids, reply = llama32
    llm = LLM.load(gguf_path if source == "gguf" else hf_dir, dtype="float32", progress=False)
    try:
        params = SamplingParams(temperature=0.0, repetition_penalty=1.0, max_tokens=24)
        got = llm.generate([ids], params)[0]
        assert (got.token_ids, got.finish_reason) == (reply, "stop")
        assert llm.eos_token_ids == {*LLAMA32_EOS}
        # the template's <|begin_of_text|> is the one BOS of a chat prompt, as transformers renders it
        rendered = llm.tokenizer.apply_chat_template(
            CHAT, add_generation_prompt=True, date_string="26 Jul 2024"
        )
        assert rendered == ids and rendered.count(128000) == 1
    finally:
        llm.close()


def test_converted_directory_stops_there_too(llama32, tmp_path):
    _, gguf_path, ids, reply = llama32
    out = convert_gguf_to_hf(gguf_path, tmp_path / "converted")
    generation = json.loads((out / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [128009, 128001, 128008]  # the file's eos first
    assert greedy(out, ids) == reply


def test_gguf_tokenizer_takes_a_whole_word_token_as_llama_cpp(llama32):
    """llama.cpp reads a llama-bpe vocabulary with ignore_merges, as Llama 3's tokenizer.json says: a piece
    that is a whole token is that token. The GGUF's tokenizer merged its letters instead, so a prompt's ids
    differed from llama.cpp's and the release's for such words."""
    hf_dir, gguf_path, _, _ = llama32
    text = "Hello zqaaab world zqaabc."
    reference = transformers.AutoTokenizer.from_pretrained(hf_dir)
    expected = reference(text)["input_ids"]
    assert reference.convert_tokens_to_ids(["Ġzqaaab", "Ġzqaabc"]) == [expected[2], expected[4]]
    assert [128000, *tokenizer_for(gguf_path).encode(text)] == expected


def test_a_llama3_gguf_without_add_bos_token_still_adds_the_bos(llama32, tmp_path):
    """llama.cpp adds the BOS to a Llama 3 vocabulary's text (llama-bpe) unless the file says otherwise; a
    file without tokenizer.ggml.add_bos_token got prompts without <|begin_of_text|>."""
    hf_dir, _, _, _ = llama32
    path = write_llama32_gguf(hf_dir, tmp_path / "no-key.gguf", add_bos_key=False)
    text = "Hello world"
    expected = transformers.AutoTokenizer.from_pretrained(hf_dir)(text)["input_ids"]
    assert expected[0] == 128000
    assert tokenizer_for(path).encode_prompt(text) == expected
