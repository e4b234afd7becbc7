"""``/v1/embeddings`` through served LoRA adapters (``--lora-modules``, ``/v1/load_lora_adapter``) of a
headless embedding model (Qwen3-Embedding-8B's layout): each adapter's vectors equal those of the model
with it merged, and peft's own on transformers' ``AutoModel`` for an adapter peft trained there (its
module names the bare decoder's: ``layers.N.*``, as sentence-transformers fine-tunes with peft)."""

from __future__ import annotations

import httpx
import numpy as np
import pytest
import torch
from factories import write_lora_adapter, write_tiny_embedding_model
from live import LiveServer

from qwenkit.engine import SamplingParamsError
from qwenkit.generate import LLM
from qwenkit.server import ServerConfig, create_app

TEXTS = ["What is the capital of China?", "Explain gravity", "hi"]


def write_peft_adapter(base, out):
    """A peft LoRA adapter (random, non-zero B) of transformers' ``Qwen3Model``: the bare decoder."""
    import peft
    import transformers

    torch.manual_seed(3)
    model = transformers.AutoModel.from_pretrained(base, dtype=torch.float32)
    config = peft.LoraConfig(
        task_type=peft.TaskType.FEATURE_EXTRACTION,
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "v_proj", "down_proj"],
        init_lora_weights=False,
    )
    peft.get_peft_model(model, config).save_pretrained(out)
    return out


def peft_embeddings(base, adapter, texts) -> torch.Tensor:
    """The Qwen3-Embedding card's recipe on transformers' AutoModel with peft's adapter."""
    import peft
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(base, padding_side="left")
    model = transformers.AutoModel.from_pretrained(base, dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, adapter).eval()
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state[:, -1]
    return torch.nn.functional.normalize(hidden, dim=1)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed-lora")
    base = write_tiny_embedding_model(root / "q3e")
    ours = write_lora_adapter(base, root / "ours", seed=1, std=0.5)
    return {"base": base, "ours": ours, "peft": write_peft_adapter(base, root / "peft")}


@pytest.fixture(scope="module")
def lora_llm(files):
    llm = LLM.load(files["base"], dtype="float32", progress=False, adapters={"ours": str(files["ours"])})
    yield llm
    llm.close()


@pytest.fixture(scope="module")
def live(files, lora_llm):
    llm = lora_llm
    config = ServerConfig(
        served_model_name="q3e",
        lora_modules=(("ours", str(files["ours"])),),
        runtime_lora=True,
        response_cache_entries=0,
    )
    with LiveServer(create_app(llm, config)) as server:
        yield server


def embed(live, model: str) -> torch.Tensor:
    r = httpx.post(f"{live.url}/v1/embeddings", json={"model": model, "input": TEXTS}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return torch.tensor(np.asarray([d["embedding"] for d in r.json()["data"]], dtype=np.float32))


def test_lora_module_embeds_as_the_merged_model(live, files):
    with LLM.load(files["base"], dtype="float32", progress=False) as base:
        plain = torch.tensor(base.embed(TEXTS))
    with LLM.load(files["base"], dtype="float32", progress=False, adapter=files["ours"]) as merged:
        want = torch.tensor(merged.embed(TEXTS))
    got = embed(live, "ours")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert (got - plain).abs().max() > 0.1  # the adapter changes them
    torch.testing.assert_close(embed(live, "q3e"), plain, rtol=0, atol=1e-6)


def test_llm_embed_through_a_served_adapter(lora_llm, files):
    """``LLM.embed(adapter=...)``: the Python API picks a served adapter as the server's ``model`` does."""
    with LLM.load(files["base"], dtype="float32", progress=False, adapter=files["ours"]) as merged:
        want = torch.tensor(merged.embed(TEXTS))
    torch.testing.assert_close(torch.tensor(lora_llm.embed(TEXTS, adapter="ours")), want, rtol=0, atol=1e-6)
    with pytest.raises(SamplingParamsError, match=r"^adapter 'nope' is not served here \(served: ours\)$"):
        lora_llm.embed(TEXTS, adapter="nope")


def test_runtime_loaded_peft_adapter_of_the_bare_decoder_embeds_as_peft(live, files):
    body = {"lora_name": "st", "lora_path": str(files["peft"])}
    r = httpx.post(f"{live.url}/v1/load_lora_adapter", json=body, timeout=60)
    assert r.status_code == 200, r.text
    try:
        want = peft_embeddings(files["base"], files["peft"], TEXTS)
        got = embed(live, "st")
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        assert (got - embed(live, "q3e")).abs().max() > 0.1
    finally:
        httpx.post(f"{live.url}/v1/unload_lora_adapter", json={"lora_name": "st"}, timeout=60)


def adapter_applied(files, name: str) -> torch.Tensor:
    """The texts' embeddings with adapter ``name`` applied: peft's for its own, qwenkit's for ours."""
    if name == "peft":
        return peft_embeddings(files["base"], files["peft"], TEXTS)
    with LLM.load(files["base"], dtype="float32", progress=False, adapter=files[name]) as llm:
        return torch.tensor(llm.embed(TEXTS))


@pytest.mark.parametrize("name", ["ours", "peft"])
def test_merge_of_a_headless_model_compares_hidden_states(files, name, tmp_path, capsys):
    """``qwenkit merge`` probes the headless model's hidden states (it has no logits to compare)."""
    from qwenkit.cli.merge import main

    assert main([str(files["base"]), str(files[name]), str(tmp_path / "merged")]) == 0
    err = capsys.readouterr().err
    assert "moves the probe's hidden states by up to" in err
    with LLM.load(tmp_path / "merged", dtype="float32", progress=False) as merged:
        assert merged.model.lm_head.__class__.__name__ == "MissingHead"
        got = torch.tensor(merged.embed(TEXTS))
    torch.testing.assert_close(got, adapter_applied(files, name), rtol=0, atol=2e-6)
