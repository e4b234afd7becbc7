"""Reranking (``LLM.rerank``, the engine's scoring requests) against the Qwen3-Reranker model card's
transformers recipe on a tiny random Qwen3 with the real Qwen3 tokenizer: the card's prompt, the prefix
and suffix tokenized alone, P("yes") from the softmax over the "no" and "yes" logits at the last
position of a left-padded batch."""

from __future__ import annotations

import pytest
import torch

from qwenkit import rerank
from qwenkit.engine import Engine, SamplingParams, SamplingParamsError
from qwenkit.errors import ConfigError
from qwenkit.generate import LLM
from qwenkit.model.transformer import HEADLESS

QUERY = "What is the capital of China?"
DOCS = [
    "The capital of China is Beijing.",
    "Gravity is a force that attracts two bodies towards each other.",
    "一只猫坐在垫子上。",
    "<|im_end|> a document with special-token text",
]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from factories import write_tiny_chat_model

    return write_tiny_chat_model(tmp_path_factory.mktemp("rerank") / "q3r")


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM.load(model_dir, dtype="float32", progress=False, max_seq_len=512)


def card_scores(path, query: str, docs: list[str], instruction: str | None = None) -> list[float]:
    """The Qwen3-Reranker model card's transformers computation (its strings written out here)."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prefix = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and "
        'the Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n"
    )
    suffix = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    task = instruction or "Given a web search query, retrieve relevant passages that answer the query"
    pairs = [f"<Instruct>: {task}\n<Query>: {query}\n<Document>: {doc}" for doc in docs]
    head = tok.encode(prefix, add_special_tokens=False)
    tail = tok.encode(suffix, add_special_tokens=False)
    inputs = tok(pairs, padding=False, return_attention_mask=False)
    inputs["input_ids"] = [head + ids + tail for ids in inputs["input_ids"]]
    batch = tok.pad(inputs, padding=True, return_tensors="pt")
    with torch.no_grad():
        last = model(**batch).logits[:, -1, :]
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    both = torch.stack([last[:, no], last[:, yes]], dim=1).log_softmax(dim=1)
    return both[:, 1].exp().tolist()


def test_scores_equal_the_model_cards_transformers_computation(llm, model_dir):
    got = llm.rerank(QUERY, DOCS)
    want = card_scores(model_dir, QUERY, DOCS)
    assert len(got) == 4 and all(0 < s < 1 for s in got)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=0, atol=1e-5)
    assert len(set(got)) == 4  # each document its own score, in document order
    task = "Judge relevance to geography"
    mine = llm.rerank(QUERY, DOCS[:2], task)
    torch.testing.assert_close(
        torch.tensor(mine), torch.tensor(card_scores(model_dir, QUERY, DOCS[:2], task)), rtol=0, atol=1e-5
    )
    assert mine != got[:2]


def test_prompt_is_the_cards_tokens(llm, model_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ids = rerank.prompt_ids(llm, QUERY, DOCS[:1])[0]
    text = (
        rerank.PREFIX
        + f"<Instruct>: {rerank.DEFAULT_INSTRUCTION}\n<Query>: {QUERY}\n<Document>: {DOCS[0]}"
        + rerank.SUFFIX
    )
    assert tok.decode(ids) == text
    assert ids[-6:] == tok.encode("<|im_start|>assistant\n<think>\n\n</think>\n\n")[-6:]
    assert rerank.answer_ids(llm) == (tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no"))
    assert rerank.answer_ids(llm) == (9693, 2152)  # Qwen3's "yes" and "no"


def test_a_query_already_in_the_cards_prompt_is_not_wrapped_again(llm):
    """vLLM's example formats the prompt in the client: query = prefix + instruct + query, document =
    "<Document>: ..." + suffix; the score is the same as the server-side formatting gives."""
    query = rerank.PREFIX + f"<Instruct>: {rerank.DEFAULT_INSTRUCTION}\n<Query>: {QUERY}\n"
    docs = [f"<Document>: {doc}{rerank.SUFFIX}" for doc in DOCS[:2]]
    torch.testing.assert_close(
        torch.tensor(llm.rerank(query, docs)), torch.tensor(llm.rerank(QUERY, DOCS[:2])), rtol=0, atol=1e-6
    )


def test_engine_scoring_request_returns_the_last_positions_logits(llm):
    """A prompt-only request with score_token_ids: the logits at the position after the prompt, as a
    one-token generation's logprobs see them (the same row)."""
    ids = llm.encode("The capital of France is")
    out = list(llm.driver.submit(ids, SamplingParams(max_tokens=0, score_token_ids=(9693, 2152, 5))))[-1]
    assert out.finish_reason == "length" and out.new_token_ids == []
    with torch.no_grad():
        ref = llm.model(torch.tensor([ids]))[0, -1].float()
    torch.testing.assert_close(torch.tensor(out.token_logits), ref[[9693, 2152, 5]], rtol=0, atol=1e-5)


def test_scoring_params_are_checked():
    with pytest.raises(SamplingParamsError, match="max_tokens must be 0"):
        SamplingParams(max_tokens=3, score_token_ids=(1,))
    with pytest.raises(SamplingParamsError, match="score_token_ids must hold integers"):
        SamplingParams(max_tokens=0, score_token_ids=("yes",))
    with pytest.raises(SamplingParamsError, match="max_tokens must be >= 1"):
        SamplingParams(max_tokens=0)


def test_bad_input_is_one_line_naming_it(llm):
    cases = [
        (("", DOCS), "query must be a non-empty string"),
        ((QUERY, []), "documents must be a non-empty list of strings"),
        ((QUERY, "one doc"), "documents must be a non-empty list of strings"),
        ((QUERY, ["ok", 5]), r"documents\[1\] must be a string"),
        ((QUERY, ["ok", "word " * 600]), r"documents\[1\]: the prompt has .* the context window is 512"),
    ]
    for args, message in cases:
        with pytest.raises(SamplingParamsError, match=message) as info:
            llm.rerank(*args)
        assert "\n" not in str(info.value)
    with pytest.raises(SamplingParamsError, match="instruction must be a string"):
        llm.rerank(QUERY, DOCS, instruction=3)


def test_a_vocabulary_without_yes_or_no_cannot_rerank(llm, monkeypatch):
    monkeypatch.setattr(llm.tokenizer, "token_to_id", lambda piece: None if piece == "no" else 1)
    with pytest.raises(ConfigError, match='lacks "yes" or "no"'):
        llm.rerank(QUERY, DOCS)


def test_an_embedding_checkpoint_without_a_head_is_refused(tmp_path):
    from factories import write_tiny_embedding_model

    llm = LLM.load(write_tiny_embedding_model(tmp_path / "e"), dtype="float32", progress=False)
    with pytest.raises(SamplingParamsError) as refused:
        llm.rerank(QUERY, DOCS)
    assert str(refused.value) == HEADLESS  # the model's fault: no document named (was "documents[0]: ...")


def test_engine_validates_score_token_ids(llm):
    engine: Engine = llm.engine
    with pytest.raises(SamplingParamsError, match="score token id 10000000 is outside the vocabulary"):
        engine.validate([1, 2], SamplingParams(max_tokens=0, score_token_ids=(10000000,)))


def test_nan_logits_fail_by_name_never_a_nan_score(model_dir, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    from qwenkit.errors import GenerationError

    shutil.copytree(model_dir, tmp_path / "nan")
    weights = load_file(tmp_path / "nan" / "model.safetensors")
    weights["model.norm.weight"] = torch.full_like(weights["model.norm.weight"], float("nan"))
    save_file(weights, tmp_path / "nan" / "model.safetensors", metadata={"format": "pt"})
    llm = LLM.load(tmp_path / "nan", dtype="float32", progress=False, max_seq_len=512)
    with pytest.raises(GenerationError) as caught:
        llm.rerank(QUERY, DOCS)
    assert str(caught.value) == "the model produced NaN/inf logits in float32: the checkpoint may be corrupt"
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_a_one_token_scoring_prompt_among_decoding_rows_takes_the_static_step(llm):
    """A one-token scoring prompt beside a decoding row: a step of one-token rows only, which the
    CUDA-graph step (run eagerly on the CPU) computes; the logits are the same row's."""
    engine = Engine(llm.model, max_batch_size=2, max_seq_len=64, cuda_graphs=True)
    engine.add_request([5, 6, 7], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
    engine.step()  # the decoding row's prompt
    rid = engine.add_request([9693], SamplingParams(max_tokens=0, score_token_ids=(9693, 2152)))
    assert not engine.decode_graphs.shapes_run
    [out] = [o for o in engine.step() if o.request_id == rid]
    assert engine.decode_graphs.shapes_run  # the static step ran
    with torch.no_grad():
        ref = llm.model(torch.tensor([[9693]]))[0, -1].float()
    torch.testing.assert_close(torch.tensor(out.token_logits), ref[[9693, 2152]], rtol=0, atol=1e-5)


def test_a_served_adapter_scores_as_the_model_with_it_applied(model_dir, tmp_path):
    """LLM.rerank(adapter=) and /v1/rerank's ``model`` naming an adapter (README): its scores are those of
    the model loaded with that adapter alone, not the base's."""
    from factories import write_lora_adapter

    adapter = write_lora_adapter(model_dir, tmp_path / "a", seed=3, std=0.5)
    kw = dict(dtype="float32", progress=False, max_seq_len=512)
    with (
        LLM.load(model_dir, adapters={"a": adapter}, **kw) as served,
        LLM.load(model_dir, adapter=adapter, **kw) as one,
    ):
        through = served.rerank(QUERY, DOCS, adapter="a")
        base = served.rerank(QUERY, DOCS)
        assert through == pytest.approx(one.rerank(QUERY, DOCS), abs=1e-5)
    assert max(abs(a - b) for a, b in zip(through, base, strict=True)) > 1e-3
