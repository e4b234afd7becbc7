"""A text prompt to a model whose tokenizer adds a BOS (Llama) is read as transformers reads
`tokenizer(text)`: the BOS first, and the same next-token distribution as transformers' model on those ids."""

from __future__ import annotations

import pytest
import torch
from llama_tokenizers import write_tiny_llama

from qwenkit.engine import SamplingParams
from qwenkit.generate import LLM

TEXT = "The quick brown fox"


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return write_tiny_llama(tmp_path_factory.mktemp("llama"))


def test_text_prompts_get_the_bos_and_transformers_next_token(llama_dir):
    import transformers

    reference_tok = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    reference = transformers.AutoModelForCausalLM.from_pretrained(str(llama_dir), dtype=torch.float32).eval()
    expected_ids = reference_tok(TEXT)["input_ids"]
    with torch.no_grad():
        expected = torch.log_softmax(reference(torch.tensor([expected_ids])).logits[0, -1], -1)
    llm = LLM.load(llama_dir, dtype="float32", progress=False)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=1, logprobs=5)
        got = llm.generate(TEXT, params)[0]
        assert got.prompt_ids == expected_ids == [1, *llm.tokenizer.encode(TEXT)]
        top = got.logprobs[0].top
        assert [t for t, _ in top] == expected.topk(5).indices.tolist()
        assert [v for _, v in top] == pytest.approx(expected.topk(5).values.tolist(), abs=1e-4)
        assert llm.tokenizer.sequence_special_ids == ((1,), ())
        ids = llm.tokenizer.encode(TEXT)  # token ids are used as given, without a BOS added
        assert llm.generate([ids], params)[0].prompt_ids == ids
    finally:
        llm.close()
