"""Text embeddings (``LLM.embed``, the engine's embed requests) against transformers' ``AutoModel``,
computed as the Qwen3-Embedding model card does: left-padded batch, last token's hidden state,
L2-normalized."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from qwenkit.engine import Engine, SamplingParams, SamplingParamsError
from qwenkit.errors import ConfigError, GenerationError
from qwenkit.generate import LLM

TEXTS = ["What is the capital of China?", "Explain gravity", "hi", "一只猫坐在垫子上。" * 5]
TASK = "Given a web search query, retrieve relevant passages that answer the query"


@pytest.fixture(scope="module")
def headless(tmp_path_factory):
    """Qwen3-Embedding-8B's layout: untied, and no lm_head in the file."""
    from factories import write_tiny_embedding_model

    return write_tiny_embedding_model(tmp_path_factory.mktemp("embed") / "q3e-headless")


@pytest.fixture(scope="module")
def tied(tmp_path_factory):
    """Qwen3-Embedding-0.6B's layout: tied embeddings, so the head is the embedding matrix."""
    from factories import write_tiny_embedding_model

    return write_tiny_embedding_model(tmp_path_factory.mktemp("embed") / "q3e-tied", tie_word_embeddings=True)


@pytest.fixture(scope="module")
def llm(headless):
    return LLM.load(headless, dtype="float32", progress=False)


def card_embeddings(path, texts: list[str]) -> torch.Tensor:
    """The Qwen3-Embedding model card's transformers recipe."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path, padding_side="left")
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    assert bool(batch["attention_mask"][:, -1].all())  # left padding: the last column is every last token
    return torch.nn.functional.normalize(hidden[:, -1], p=2, dim=1)


def test_qwen3_embedding_layout_equals_the_model_cards_recipe(llm, headless):
    queries = [f"Instruct: {TASK}\nQuery:{q}" for q in TEXTS[:2]]
    want = card_embeddings(headless, queries + TEXTS)
    got = torch.tensor(llm.embed([*TEXTS[:2]], prompt_name="query") + llm.embed(TEXTS))
    assert got.shape == want.shape == (6, 32)
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert torch.allclose(got.norm(dim=1), torch.ones(6))
    # the text is tokenized as tokenizer(text): the post-processor's <|endoftext|> is its last token
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(headless)
    for text in [*queries, *TEXTS, "<|im_start|>a"]:
        assert llm.encode(text) == tok(text)["input_ids"]
    assert llm.encode("hi")[-1] == 151643


def test_headless_checkpoint_refuses_to_generate_by_name(llm):
    assert llm.model.lm_head.__class__.__name__ == "MissingHead"
    with pytest.raises(SamplingParamsError, match="no output head .* it computes embeddings, not text"):
        llm.generate("hi")


def test_tied_layout_loads_its_head_and_embeds(tied):
    llm = LLM.load(tied, dtype="float32", progress=False)
    assert llm.model.lm_head.weight is llm.model.model.embed_tokens.weight
    torch.testing.assert_close(
        torch.tensor(llm.embed(TEXTS)), card_embeddings(tied, TEXTS), rtol=0, atol=2e-6
    )
    assert len(llm.generate("hi", SamplingParams(max_tokens=3, ignore_eos=True))[0].token_ids) == 3


def test_plain_qwen2_directory_pools_the_last_token_normalized(tmp_path):
    """No sentence-transformers files (gte-Qwen2 without them, any decoder): last token, normalized."""
    import transformers
    from factories import write_tiny_chat_model

    path = write_tiny_chat_model(tmp_path / "qwen2", family="qwen2")
    llm = LLM.load(path, dtype="float32", progress=False)
    ids = [[3838, 374, 279, 6722], [9707]]
    model = transformers.AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        want = [model(torch.tensor([i])).last_hidden_state[0, -1] for i in ids]
    want = torch.nn.functional.normalize(torch.stack(want), dim=1)
    torch.testing.assert_close(torch.tensor(llm.embed(ids)), want, rtol=0, atol=2e-6)
    assert llm.embed(ids[0]) == llm.embed([ids[0]])  # one list of ids is one input
    assert llm.embed([list(np.array(ids[0]))]) == llm.embed([ids[0]])  # numpy ints, as generate takes them


def test_dimensions_truncate_then_renormalize(llm):
    full = torch.tensor(llm.embed(TEXTS[:2]))
    cut = torch.tensor(llm.embed(TEXTS[:2], dimensions=8))
    torch.testing.assert_close(cut, torch.nn.functional.normalize(full[:, :8], dim=1), rtol=0, atol=1e-6)
    for bad in (0, 33, 1.5, True):
        with pytest.raises(SamplingParamsError, match=r"dimensions must be an integer in \[1, 32\]"):
            llm.embed("hi", dimensions=bad)


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ("", r"input\[0\] is an empty string"),
        ([], "input must be a non-empty"),
        (["a", []], r"input\[1\] must be a non-empty string or a non-empty list of token ids"),
        ([5, 151936], r"prompt token id 151936 is outside the vocabulary \(0..151935\)"),
        (["ok", [1, -1]], r"input\[1\]: prompt token id -1 is outside the vocabulary"),
        ([[1] * 513], "the prompt has 513 tokens; the context window is 512"),
        ("word " * 600, "the context window is 512"),
    ],
)
def test_bad_input_is_one_line_before_anything_runs(llm, inputs, message):
    with pytest.raises(SamplingParamsError, match=message) as caught:
        llm.embed(inputs)
    assert "\n" not in str(caught.value)
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_unknown_prompt_name_names_the_known_ones(llm):
    with pytest.raises(
        SamplingParamsError, match=r"prompt_name 'passage' is not one of .*\(document, query\)"
    ):
        llm.embed("x", prompt_name="passage")


def test_full_context_text_is_embedded(llm):
    """An embedding generates nothing, so its text may fill the whole window (512 tokens here)."""
    assert len(llm.embed([[7] * 512])[0]) == 32


def test_other_pooling_is_refused_by_name(tmp_path, headless):
    path = tmp_path / "mean"
    shutil.copytree(headless, path)
    pooling = json.loads((path / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    llm = LLM.load(path, dtype="float32", progress=False)
    with pytest.raises(
        ConfigError, match="pooling mean_tokens is not supported; qwenkit pools the last token"
    ):
        llm.embed("hi")


def test_without_a_normalize_module_the_hidden_state_is_returned_as_is(tmp_path, headless):
    path = tmp_path / "raw"
    shutil.copytree(headless, path)
    modules = json.loads((path / "modules.json").read_text())[:2]  # Transformer, Pooling
    (path / "modules.json").write_text(json.dumps(modules))
    raw = torch.tensor(LLM.load(path, dtype="float32", progress=False).embed(TEXTS))
    torch.testing.assert_close(
        torch.nn.functional.normalize(raw, dim=1), card_embeddings(headless, TEXTS), rtol=0, atol=2e-6
    )
    assert not torch.allclose(raw.norm(dim=1), torch.ones(len(TEXTS)))


def _embed_alone(engine: Engine, ids: list[int]) -> torch.Tensor:
    rid = engine.add_request(ids, SamplingParams(max_tokens=0, embed=True))
    found = None
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == rid and out.finish_reason is not None:
                found = out.embedding
    return found


def test_engine_batches_embeddings_with_generation(tied):
    """Embed requests share steps with generating ones (chunked prompts, decode rows, the prefix cache,
    a one-token prompt beside decode-only steps): neither changes the other's numbers."""
    from qwenkit.checkpoint import load_model

    model, _ = load_model(tied, dtype="float32", progress=False)
    engine = Engine(model, max_batch_size=4, prefill_chunk=8, cuda_graphs=True)
    prompts = [[3838 + i for i in range(20)], [9707], list(range(100, 140))]
    alone = [_embed_alone(engine, p) for p in prompts]
    gen = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request([1, 2, 3], gen)
    tokens_alone: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens_alone += out.new_token_ids
    mixed: dict[object, object] = {}
    g = engine.add_request([1, 2, 3], gen)
    tokens = [t for out in engine.step() for t in out.new_token_ids]  # decoding when the others arrive
    ids = [engine.add_request(p, SamplingParams(max_tokens=0, embed=True)) for p in prompts]
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == g:
                tokens += out.new_token_ids
                assert out.embedding is None
            elif out.finish_reason is not None:
                assert out.new_token_ids == [] and out.finish_reason == "length"
                mixed[out.request_id] = out.embedding
    assert len(tokens) == 6 and tokens == tokens_alone
    for rid, want in zip(ids, alone, strict=True):
        torch.testing.assert_close(mixed[rid], want, rtol=0, atol=1e-5)
    # the first prompt again, its blocks now in the prefix cache: the last token is still computed
    torch.testing.assert_close(_embed_alone(engine, prompts[2]), alone[2], rtol=0, atol=1e-5)
    assert engine.blocks.prefix_hits > 0


def test_a_non_finite_hidden_state_is_an_error_not_a_vector(tmp_path, headless):
    """A vector of NaN (float16 overflow, a corrupt checkpoint) came back as the embedding, and
    ``/v1/embeddings`` and ``qwenkit embed`` printed it; it fails as NaN/inf logits do, by name."""
    from factories import with_nan_norm

    llm = LLM.load(with_nan_norm(headless, tmp_path / "nan"), dtype="float32", progress=False)
    with pytest.raises(GenerationError) as caught:
        llm.embed(TEXTS)
    assert (
        str(caught.value)
        == "the model produced NaN/inf hidden state in float32: the checkpoint may be corrupt"
    )
    assert llm.driver.wait_idle() and llm.engine.blocks.usage == 0


def test_embed_params_generate_nothing():
    with pytest.raises(SamplingParamsError, match="max_tokens must be 0 and prompt_logprobs None"):
        SamplingParams(max_tokens=4, embed=True)
    with pytest.raises(SamplingParamsError, match="max_tokens must be 0 and prompt_logprobs None"):
        SamplingParams(max_tokens=0, embed=True, prompt_logprobs=1)
    with pytest.raises(SamplingParamsError, match="embed must be true or false"):
        SamplingParams(max_tokens=0, embed=1)


def test_bidirectional_config_is_refused_by_name(tmp_path, headless):
    path = tmp_path / "bidirectional"
    shutil.copytree(headless, path)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "is_causal": False}))
    llm = LLM.load(path, dtype="float32", progress=False)
    with pytest.raises(ConfigError, match="is_causal false asks for bidirectional attention"):
        llm.embed("hi")


def test_a_model_whose_embeddings_come_from_its_own_code_is_refused_by_name(tmp_path, headless):
    """gte-Qwen2 was trained with bidirectional attention, which its own modeling_qwen.py runs and its
    config.json does not say: a causal run of its weights would give other vectors, silently."""
    path = tmp_path / "gte"
    shutil.copytree(headless, path)
    config = json.loads((path / "config.json").read_text())
    auto_map = {
        "AutoModel": "modeling_qwen.Qwen2Model",
        "AutoModelForCausalLM": "modeling_qwen.Qwen2ForCausalLM",
    }
    (path / "config.json").write_text(json.dumps({**config, "auto_map": auto_map}))
    llm = LLM.load(path, dtype="float32", progress=False)
    with pytest.raises(ConfigError, match="auto_map AutoModel 'modeling_qwen.Qwen2Model'"):
        llm.embed("hi")


def test_a_quantized_copy_keeps_its_pooling_and_loads_headless(tmp_path, headless):
    """``qwenkit quantize`` of Qwen3-Embedding-8B's layout writes our names and no head: the copy keeps the
    sentence-transformers files, so it loads (its head missing by design) and pools as the original."""
    from qwenkit.quant.pipeline import quantize_checkpoint

    out = tmp_path / "int8"
    quantize_checkpoint(headless, out, bits=8, method="rtn", group_size=32, progress=False)
    assert (out / "modules.json").is_file() and (out / "1_Pooling" / "config.json").is_file()
    copy = LLM.load(out, dtype="float32", progress=False)
    on_load = LLM.load(headless, dtype="float32", quantize="int8", progress=False)
    assert copy.embedding_setup == on_load.embedding_setup and copy.embedding_setup.prompts
    got, want = torch.tensor(copy.embed(TEXTS)), torch.tensor(on_load.embed(TEXTS))
    assert torch.nn.functional.cosine_similarity(got, want).min() > 0.999
    with pytest.raises(SamplingParamsError, match="no output head"):
        copy.generate("hi")


def test_a_headless_model_is_served_from_the_prepared_cache(tmp_path, headless, capfd):
    """The second load reads the model the first prepared (bfloat16, the CPU kernels' layout); a headless
    one was refused there for its head's sizes and rebuilt at every start, with a line saying so."""
    from qwenkit.checkpoint import prepared_cache

    path = tmp_path / "copy"
    shutil.copytree(headless, path)  # a path of its own: an entry of its own
    first = LLM.load(path, dtype="bfloat16", progress=False)
    assert list((prepared_cache.cache_root_or_none() / "prepared").glob("*.pt"))
    second = LLM.load(path, dtype="bfloat16", progress=False)
    assert "rebuilding the prepared-model cache" not in capfd.readouterr().err
    assert second.model.lm_head.__class__.__name__ == "MissingHead"
    assert second.embed(TEXTS) == first.embed(TEXTS)
