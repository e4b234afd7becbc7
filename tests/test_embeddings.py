"""Text embeddings (``LLM.embed``, the engine's embed requests) against transformers' ``AutoModel``,
computed as the Qwen3-Embedding model card does: left-padded batch, last token's hidden state,
L2-normalized."""

from __future__ import annotations

import json
import re
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


def test_embed_iter_computes_a_chunk_at_a_time_after_checking_every_input(llm, monkeypatch):
    """The vectors are ``embed``'s; each chunk runs only once the one before is read, and a bad input
    at the end is refused before the first chunk runs."""
    from qwenkit import embedding

    chunks: list[int] = []
    run = embedding.run
    monkeypatch.setattr(
        embedding, "run", lambda llm, ids, adapter=None: chunks.append(len(ids)) or run(llm, ids)
    )
    texts = [f"text number {i}" for i in range(5)]
    with pytest.raises(SamplingParamsError, match=r"input\[4\] is an empty string"):
        llm.embed_iter([*texts[:4], ""], chunk_size=2)
    assert chunks == []
    vectors = llm.embed_iter(texts, chunk_size=2)
    first = next(vectors)
    assert chunks == [2]
    # float32 rows batched otherwise differ in the last bits (the batch's matmul blocking)
    torch.testing.assert_close(
        torch.tensor([first, *vectors]), torch.tensor(llm.embed(texts)), rtol=0, atol=2e-6
    )
    assert chunks == [2, 2, 1, 5]
    for bad in (0, -1, 1.5, True):
        with pytest.raises(SamplingParamsError, match="chunk_size must be a positive integer or None"):
            llm.embed_iter(texts, chunk_size=bad)


def test_unknown_prompt_name_names_the_known_ones(llm):
    with pytest.raises(
        SamplingParamsError, match=r"prompt_name 'passage' is not one of .*\(document, query\)"
    ):
        llm.embed("x", prompt_name="passage")


def _with_st_config(source, path, **extra):
    """A copy of ``source`` whose config_sentence_transformers.json has ``extra`` over its own."""
    shutil.copytree(source, path)
    st = json.loads((path / "config_sentence_transformers.json").read_text())
    (path / "config_sentence_transformers.json").write_text(json.dumps({**st, **extra}))
    return path


def test_default_prompt_name_is_used_where_none_is_named(tmp_path, headless, llm):
    """sentence-transformers' encode puts the default_prompt_name's prompt before each text where no
    prompt is named; naming another (the empty "document") goes without it. qwenkit left it out."""
    path = _with_st_config(headless, tmp_path / "default", default_prompt_name="query")
    queries = [f"Instruct: {TASK}\nQuery:{q}" for q in TEXTS[:2]]
    with_default = LLM.load(path, dtype="float32", progress=False)
    got = torch.tensor(with_default.embed(TEXTS[:2]))
    torch.testing.assert_close(got, card_embeddings(headless, queries), rtol=0, atol=2e-6)
    torch.testing.assert_close(
        got, torch.tensor(llm.embed(TEXTS[:2], prompt_name="query")), rtol=0, atol=2e-6
    )
    plain = torch.tensor(with_default.embed(TEXTS[:2], prompt_name="document"))
    torch.testing.assert_close(plain, torch.tensor(llm.embed(TEXTS[:2])), rtol=0, atol=2e-6)


def test_a_default_prompt_name_naming_no_prompt_is_refused_by_name(tmp_path, headless):
    path = _with_st_config(headless, tmp_path / "bad", default_prompt_name="passage")
    with pytest.raises(
        ConfigError, match=r"default_prompt_name 'passage' is not one of its prompts \(document, query\)$"
    ):
        LLM.load(path, dtype="float32", progress=False).embed("hi")


def test_a_null_prompt_is_the_empty_one(tmp_path, headless, llm):
    """sentence-transformers reads a null prompt as "" (qwenkit put the text "None" before each input)."""
    path = _with_st_config(headless, tmp_path / "null", prompts={"document": None})
    got = LLM.load(path, dtype="float32", progress=False).embed(TEXTS[:2], prompt_name="document")
    torch.testing.assert_close(torch.tensor(got), torch.tensor(llm.embed(TEXTS[:2])), rtol=0, atol=2e-6)


def test_do_lower_case_lowercases_the_prompt_and_the_text(tmp_path, headless, llm):
    """sentence-transformers (and vLLM) lowercase what is tokenized, the prompt before the text too,
    where sentence_bert_config.json says do_lower_case; it was ignored."""
    path = tmp_path / "lower"
    shutil.copytree(headless, path)
    config = json.loads((path / "sentence_bert_config.json").read_text())
    (path / "sentence_bert_config.json").write_text(json.dumps({**config, "do_lower_case": True}))
    lower = LLM.load(path, dtype="float32", progress=False)
    prompt = llm.embedding_setup.prompts["query"]
    got = torch.tensor(lower.embed(TEXTS, prompt_name="query"))
    want = torch.tensor(llm.embed([(prompt + text).lower() for text in TEXTS]))
    torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
    assert any(prompt + t != (prompt + t).lower() for t in TEXTS)  # the case changes the vectors
    assert not torch.allclose(got, torch.tensor(llm.embed(TEXTS, prompt_name="query")), atol=1e-4)
    ids = llm.encode("Hello")  # token ids are used as given
    assert lower.embed([ids]) == llm.embed([ids])
    (path / "sentence_bert_config.json").write_text(json.dumps({**config, "do_lower_case": "yes"}))
    with pytest.raises(ConfigError, match="do_lower_case must be true or false, got 'yes'"):
        LLM.load(path, dtype="float32", progress=False).embed("hi")


def test_sentence_transformers_5_4_files_embed_as_the_older_ones(tmp_path, headless, llm):
    """Version 5.4 writes its modules under new names and the pooling as one pooling_mode string
    (vLLM #45995); they were refused as unsupported modules."""
    path = tmp_path / "st54"
    shutil.copytree(headless, path)
    modules = json.loads((path / "modules.json").read_text())
    for module, kind in zip(
        modules,
        [
            "sentence_transformers.base.modules.transformer.Transformer",
            "sentence_transformers.sentence_transformer.modules.pooling.Pooling",
            "sentence_transformers.base.modules.normalize.Normalize",
        ],
        strict=True,
    ):
        module["type"] = kind
    (path / "modules.json").write_text(json.dumps(modules))
    pooling = {"embedding_dimension": 32, "pooling_mode": "lasttoken", "include_prompt": True}
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    got = torch.tensor(LLM.load(path, dtype="float32", progress=False).embed(TEXTS))
    torch.testing.assert_close(got, torch.tensor(llm.embed(TEXTS)), rtol=0, atol=2e-6)
    (path / "1_Pooling" / "config.json").write_text(json.dumps({**pooling, "pooling_mode": "mean"}))
    with pytest.raises(ConfigError, match="pooling_mode 'mean' is not supported; qwenkit pools the last"):
        LLM.load(path, dtype="float32", progress=False).embed("hi")
    (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    modules[2]["type"] = "sentence_transformers.base.modules.dense.Dense"
    (path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(
        ConfigError, match=r"module 'sentence_transformers\.base\.modules\.dense\.Dense' is not supported"
    ):
        LLM.load(path, dtype="float32", progress=False).embed("hi")


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


def test_a_pooling_config_without_the_mean_flag_is_mean_pooling_too(tmp_path, headless):
    """sentence-transformers' Pooling turns mean pooling on where its flag is left out, so a config with
    pooling_mode_lasttoken alone pools both (2 x hidden values): it was embedded as last-token alone."""
    path = tmp_path / "no-mean-flag"
    shutil.copytree(headless, path)
    (path / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_lasttoken": True})
    )
    with pytest.raises(
        ConfigError, match="pooling mean_tokens is not supported; qwenkit pools the last token"
    ):
        LLM.load(path, dtype="float32", progress=False).embed("hi")


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


def test_load_estimate_leaves_out_the_head_a_headless_checkpoint_lacks(headless, tied, monkeypatch):
    """The memory check before loading counted an output head the bare decoder's files do not hold:
    vocab x hidden too many, 1.2 GB of Qwen3-Embedding-8B in bfloat16. It now equals the bytes the
    loaded parameters take; a tied checkpoint's head is its embedding, counted once as before."""
    from qwenkit.checkpoint import loader

    estimates = []
    real_check = loader.check_fits
    monkeypatch.setattr(
        loader, "check_fits", lambda *a, **k: estimates.append(k["weights"]) or real_check(*a, **k)
    )
    for path in (headless, tied):
        llm = LLM.load(path, dtype="float32", progress=False)
        loaded = sum(p.numel() * p.element_size() for p in llm.model.parameters())
        assert llm.model.lm_head.__class__.__name__ == ("MissingHead" if path == headless else "Linear")
        llm.close()
        if path == headless:
            assert estimates == [loaded] == [19_522_432]  # 151936 x 32 float32 embedding, 2 layers
    assert estimates[1:] == [None]  # the config's estimate, the embedding counted once


def test_qwen3_embedding_8b_weights_are_its_parameters_without_a_head():
    """Qwen3-Embedding-8B's config.json: 7,567,295,488 parameters in its files (Qwen3-8B's less its
    151665 x 4096 head), which bfloat16 takes twice in bytes."""
    from qwenkit.config import ModelConfig
    from qwenkit.memory import weight_bytes

    config = ModelConfig.from_hf(
        {
            "architectures": ["Qwen3ForCausalLM"],
            "model_type": "qwen3",
            "vocab_size": 151665,
            "hidden_size": 4096,
            "intermediate_size": 12288,
            "num_hidden_layers": 36,
            "num_attention_heads": 32,
            "num_key_value_heads": 8,
            "head_dim": 128,
            "tie_word_embeddings": False,
            "max_position_embeddings": 40960,
        }
    )
    assert weight_bytes(config, torch.bfloat16, headless=True) == 2 * 7_567_295_488
    assert weight_bytes(config, torch.bfloat16) - weight_bytes(config, torch.bfloat16, headless=True) == (
        2 * 151665 * 4096
    )
    # weight-only int4: the same layers quantized, the int8 head (there is none) not added
    head_int8 = weight_bytes(config, torch.bfloat16, "int4") - weight_bytes(
        config, torch.bfloat16, "int4", headless=True
    )
    assert head_int8 == 151665 * 4096 + 151665 * 7  # int8 codes and each row's group data


def test_info_counts_the_parameters_a_headless_checkpoint_holds(headless, tied):
    """``qwenkit info`` of the bare decoder: its parameters and memory without the head it lacks (the
    float32 row equals the float32 files as stored), and a line saying it computes embeddings only."""
    from qwenkit.cli.info import describe

    text = describe(str(headless))
    assert re.search(r"parameters +4,880,608 \(0\.00 B\)", text)
    assert re.search(r"output head +none in the files: it computes embeddings only", text)
    stored = re.search(r"as stored +(\S+ MiB)", text).group(1)
    assert re.search(rf"float32 +{re.escape(stored)}\n", text)
    assert "output head" not in describe(str(tied))


SERVE_IT = "embed texts with `qwenkit embed`, or serve it (`qwenkit serve`) and ask POST /v1/embeddings"
TRAIN = "fine-tuning trains its next-token loss, which needs one"


@pytest.mark.parametrize(
    ("command", "advice"),
    [
        (["generate", "{m}", "-p", "hi"], SERVE_IT),
        (["generate", "{m}", "--prompt-ids", "1,2"], SERVE_IT),
        (["chat", "{m}", "-p", "hi"], SERVE_IT),
        (["profile", "{m}"], SERVE_IT),
        (["eval", "{m}", "--task", "ppl", "--data", "{t}"], "the benchmarks score the text it writes or"),
        (["finetune", "{m}", "{d}", "{o}", "--max-steps", "1"], TRAIN),
        (["dpo", "{m}", "{p}", "{o}", "--max-steps", "1"], TRAIN),
    ],
)
def test_text_commands_refuse_a_headless_checkpoint_before_loading_it(
    headless, tmp_path, command, advice, capsys, monkeypatch
):
    """chat, generate, profile, eval, finetune and dpo of an embedding model's bare decoder: one line
    saying it computes embeddings only, before its weights load. They failed at its first logits (eval,
    finetune and dpo with a traceback, fine-tuning leaving its work directory behind; profile's child
    processes loaded it to fail, each)."""
    from qwenkit.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    monkeypatch.setattr(LLM, "load", never)
    monkeypatch.setattr("qwenkit.profile.profile", never)
    (tmp_path / "t.txt").write_text("some text to score\n")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": "hi", "chosen": "a", "rejected": "b"}) + "\n")
    names = {"t": "t.txt", "d": "d.jsonl", "p": "p.jsonl", "o": "out"}
    argv = [a.format(m=headless, **{k: str(tmp_path / n) for k, n in names.items()}) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(
        f"error: {headless} has no output head (an embedding model's bare decoder): it computes embeddings "
        f"only, not text; {advice}"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d.jsonl",
        "p.jsonl",
        "t.txt",
    ]  # no OUT, no work dir


def test_a_tied_embedding_model_still_generates(tied, capsys):
    """Qwen3-Embedding-0.6B's layout has a head (its tied embedding): text commands run it."""
    from qwenkit.cli import main

    assert main(["generate", str(tied), "--prompt-ids", "1,2", "--max-new-tokens", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["output_token_ids"]) == 2


def test_an_input_past_max_seq_length_is_refused_by_name(tmp_path, headless):
    """Qwen3-Embedding's sentence_bert_config.json says 8192: sentence-transformers cuts longer texts and
    vLLM caps its context there, so a vector of a longer one (qwenkit's window is 32K) is no reference's."""
    path = tmp_path / "short"
    shutil.copytree(headless, path)
    (path / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 4, "do_lower_case": False}))
    llm = LLM.load(path, dtype="float32", progress=False)
    fits = [t for t in ("hi", "a b c") if len(llm.encode(t)) <= 4]
    assert fits and len(llm.embed(fits)) == len(fits)
    long = "one two three four five six"
    with pytest.raises(SamplingParamsError) as caught:
        llm.embed(["hi", long])
    assert str(caught.value) == (
        f"input[1]: the input has {len(llm.encode(long))} tokens; this model embeds at most 4 "
        "(max_seq_length in its sentence_bert_config.json)"
    )
