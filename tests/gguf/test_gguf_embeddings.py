"""Embeddings of a GGUF as llama.cpp's converter writes an embedding model (``{arch}.pooling_type`` from
the sentence-transformers Pooling, ``tokenizer.ggml.add_eos_token`` from the tokenizer's post-processor,
no ``output.weight``): equal to those of its safetensors source, and to llama.cpp's ``llama-embedding``
where that is built."""

from __future__ import annotations

import json
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from qwenkit.engine import SamplingParamsError
from qwenkit.errors import ConfigError
from qwenkit.generate import LLM

CACHE = Path.home() / ".cache/qwenkit/bench_vs_llamacpp"
CONVERTER = CACHE / "llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
LLAMA_EMBEDDING = CACHE / "build/bin/llama-embedding"  # cmake --build build --target llama-embedding
TEXTS = ["What is the capital of China?", "Explain gravity", "hi", "一只猫坐在垫子上。" * 5]
TOLERANCE = {"f32": 2e-6, "f16": 1e-3}  # f16 weights: 1.5e-4 apart here

pytestmark = pytest.mark.skipif(
    not CONVERTER.is_file(), reason=f"llama.cpp's converter is not unpacked at {CONVERTER.parent}"
)


def convert(source: Path, outtype: str) -> Path:
    out = source.parent / f"{source.name}.{outtype}.gguf"
    env = {"PYTHONPATH": str(CONVERTER.parent / "gguf-py"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(CONVERTER), str(source), "--outtype", outtype, "--outfile", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    return out


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """Qwen3-Embedding-8B's layout (untied, no lm_head): a GGUF of it holds no output.weight."""
    from factories import write_tiny_embedding_model

    return write_tiny_embedding_model(tmp_path_factory.mktemp("embedgguf") / "q3e")


@pytest.fixture(scope="module")
def ggufs(source) -> dict[str, Path]:
    return {outtype: convert(source, outtype) for outtype in TOLERANCE}


@pytest.fixture(scope="module")
def want(source) -> torch.Tensor:
    return torch.tensor(LLM.load(source, dtype="float32", progress=False).embed(TEXTS))


@pytest.mark.parametrize("outtype", list(TOLERANCE))
def test_gguf_embeddings_equal_the_safetensors_sources(ggufs, source, want, outtype):
    from qwenkit.checkpoint.gguf import read_gguf

    ckpt = read_gguf(ggufs[outtype])
    assert ckpt.metadata["qwen3.pooling_type"] == 3  # last
    assert ckpt.metadata["tokenizer.ggml.add_eos_token"] is True
    assert ckpt.metadata["tokenizer.ggml.eos_token_id"] == 151643  # the post-processor's <|endoftext|>
    assert "output.weight" not in ckpt.tensor_shapes
    llm = LLM.load(ggufs[outtype], dtype="float32", progress=False)
    ref = LLM.load(source, dtype="float32", progress=False)
    for text in TEXTS:
        assert llm.encode(text) == ref.encode(text)
    assert llm.encode("hi")[-1] == 151643  # the EOS add_eos_token asks for, as transformers appends it
    got = torch.tensor(llm.embed(TEXTS))
    torch.testing.assert_close(got, want, rtol=0, atol=TOLERANCE[outtype])
    assert torch.allclose(got.norm(dim=1), torch.ones(len(TEXTS)))  # llama.cpp's default: L2
    head = torch.tensor(llm.embed(TEXTS, dimensions=8))
    torch.testing.assert_close(head, torch.nn.functional.normalize(got[:, :8], dim=1), rtol=0, atol=1e-6)


def test_headless_gguf_embeds_and_refuses_to_generate_by_name(ggufs):
    """No output.weight: tied as llama.cpp reads it, or none as in Qwen3-Embedding-8B; the file cannot
    say which, so an embedding model's GGUF makes up no head (it wrote the embeddings' logits before)."""
    llm = LLM.load(ggufs["f32"], dtype="float32", progress=False)
    assert llm.model.lm_head.__class__.__name__ == "MissingHead"
    with pytest.raises(SamplingParamsError, match="no output head .* it computes embeddings, not text"):
        llm.generate("hi")


def set_pooling(path: Path, value: int) -> None:
    """Rewrite the file's qwen3.pooling_type (a uint32 value after its key) in place."""
    data = bytearray(path.read_bytes())
    key = b"qwen3.pooling_type"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 4  # GGUF's UINT32
    struct.pack_into("<I", data, at + 4, value)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("value, named", [(1, "1 (mean)"), (2, "2 (cls)"), (0, "0 (none)")])
def test_other_gguf_pooling_is_refused_by_name(tmp_path, ggufs, value, named):
    path = tmp_path / "other.gguf"
    shutil.copy(ggufs["f32"], path)
    set_pooling(path, value)
    llm = LLM.load(path, dtype="float32", progress=False)
    message = f"qwen3.pooling_type is {named}; qwenkit pools the last token (3, last)"
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        llm.embed("hi")


def test_rank_pooling_without_a_rerankers_labels_and_rows_is_refused_as_the_file_opens(tmp_path, ggufs):
    """Rank is a reranker's pooling (tests/gguf/test_gguf_rerank.py): an embedding file marked so has
    neither its labels nor its cls.output rows."""
    from qwenkit.checkpoint.gguf import GGUFError

    path = tmp_path / "rank.gguf"
    shutil.copy(ggufs["f32"], path)
    set_pooling(path, 4)
    message = "a reranker's file (qwen3.pooling_type 4, rank) whose qwen3.classifier.output_labels are None"
    with pytest.raises(GGUFError, match=re.escape(message)):
        LLM.load(path, dtype="float32", progress=False)


def test_mean_pooling_as_the_converter_writes_it_is_refused(tmp_path, source):
    mean = tmp_path / "mean"
    shutil.copytree(source, mean)
    pooling = json.loads((mean / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    (mean / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    llm = LLM.load(convert(mean, "f32"), dtype="float32", progress=False)
    with pytest.raises(ConfigError, match=r"qwen3.pooling_type is 1 \(mean\)"):
        llm.embed("hi")


@pytest.mark.skipif(
    not LLAMA_EMBEDDING.is_file(),
    reason=f"llama.cpp's llama-embedding is not built in {LLAMA_EMBEDDING.parent} "
    "(cmake --build BUILD --target llama-embedding)",
)
def test_gguf_embeddings_equal_llamacpps(ggufs, want):
    """llama.cpp's embedding example on the same file, with the file's pooling (last), its EOS and its
    default L2 normalization (printed to 7 decimals)."""
    cmd = [str(LLAMA_EMBEDDING), "-m", str(ggufs["f32"]), "-p", "\n".join(TEXTS), "--embd-output-format"]
    out = subprocess.run([*cmd, "json", "-t", "2"], check=True, capture_output=True, text=True).stdout
    theirs = torch.tensor([d["embedding"] for d in json.loads(out)["data"]])
    llm = LLM.load(ggufs["f32"], dtype="float32", progress=False)
    ours = torch.tensor(llm.embed(TEXTS))
    assert ours.shape == theirs.shape == (len(TEXTS), 32)
    # llama.cpp's CPU kernels: 0.9e-4 to 1.3e-4 apart here (their f32 logits are 2e-4 to 1.3e-3 apart
    # from transformers': benchmarks/check_llamacpp_reads.py); qwenkit's equal its safetensors' exactly
    torch.testing.assert_close(ours, theirs, rtol=0, atol=3e-4)
    torch.testing.assert_close(want, theirs, rtol=0, atol=3e-4)
    assert bool(((ours * theirs).sum(dim=1) > 1 - 1e-6).all())  # cosine similarity


@pytest.mark.parametrize("pooling", [3, 1])
def test_a_directory_converted_from_an_embedding_gguf_pools_as_the_file(tmp_path, ggufs, want, pooling):
    """``convert --to hf`` writes the file's pooling as sentence-transformers files (a mean-pooling file's
    directory pooled its last token, silently) and no head (its directory generated from the tied
    embeddings the file never had)."""
    from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf

    path = tmp_path / "p.gguf"
    shutil.copy(ggufs["f32"], path)
    set_pooling(path, pooling)
    out = convert_gguf_to_hf(path, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    llm = LLM.load(out, dtype="float32", progress=False)
    assert llm.model.lm_head.__class__.__name__ == "MissingHead"
    if pooling == 1:
        with pytest.raises(ConfigError, match="pooling mean_tokens is not supported"):
            llm.embed("hi")
        return
    torch.testing.assert_close(torch.tensor(llm.embed(TEXTS)), want, rtol=0, atol=2e-6)
    import transformers  # the model card's recipe reads the directory too

    model = transformers.AutoModel.from_pretrained(out, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok("hi")["input_ids"] == llm.encode("hi")
    with torch.no_grad():
        hidden = model(**tok(TEXTS[0], return_tensors="pt")).last_hidden_state[0, -1]
    torch.testing.assert_close(torch.nn.functional.normalize(hidden, dim=0), want[0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("pooling", [3, 1])
def test_a_quantized_copy_of_an_embedding_gguf_pools_as_the_file(tmp_path, ggufs, want, pooling):
    """``quantize`` from the file keeps its pooling and no head, as ``convert --to hf`` does."""
    from qwenkit.quant.pipeline import quantize_checkpoint

    path = tmp_path / "p.gguf"
    shutil.copy(ggufs["f32"], path)
    set_pooling(path, pooling)
    out = tmp_path / "int8"
    quantize_checkpoint(path, out, bits=8, group_size=32, method="rtn", progress=False)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False
    llm = LLM.load(out, dtype="float32", progress=False)
    assert llm.model.lm_head.__class__.__name__ == "MissingHead"
    if pooling == 1:
        with pytest.raises(ConfigError, match="pooling mean_tokens is not supported"):
            llm.embed("hi")
        return
    torch.testing.assert_close(torch.tensor(llm.embed(TEXTS)), want, rtol=0, atol=2e-2)  # int8 weights


def test_served_gguf_embeds_refuses_generation_and_other_pooling_in_one_line(tmp_path, ggufs, want):
    import httpx

    from qwenkit.server import ServerConfig, create_app

    sys.path.insert(0, str(Path(__file__).parent.parent / "server"))
    from live import LiveServer

    mean = tmp_path / "mean.gguf"
    shutil.copy(ggufs["f32"], mean)
    set_pooling(mean, 1)
    for path in (ggufs["f32"], mean):
        llm = LLM.load(path, dtype="float32", progress=False)
        app = create_app(llm, ServerConfig(served_model_name="q3e", response_cache_entries=0))
        with LiveServer(app) as live:
            r = httpx.post(f"{live.url}/v1/embeddings", json={"model": "q3e", "input": TEXTS})
            gen = httpx.post(
                f"{live.url}/v1/completions", json={"model": "q3e", "prompt": "hi", "max_tokens": 2}
            )
        assert gen.status_code == 400 and "no output head" in gen.json()["error"]["message"]
        if path == mean:
            message = r.json()["error"]["message"]
            assert r.status_code == 400 and "\n" not in message
            assert message.endswith(
                "qwen3.pooling_type is 1 (mean); qwenkit pools the last token (3, last), "
                "as decoder embedding models do"
            )
            continue
        assert r.status_code == 200, r.text
        got = torch.tensor([d["embedding"] for d in r.json()["data"]])
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)


def test_embed_command_prints_the_files_embeddings_and_refuses_other_pooling(tmp_path, ggufs, capsys):
    """``qwenkit embed FILE.gguf``, llama.cpp's ``llama-embedding -m FILE.gguf``: ``LLM.embed``'s vectors."""
    from qwenkit.cli import main

    assert main(["embed", str(ggufs["f32"]), *TEXTS, "--dtype", "float32"]) == 0
    printed = [json.loads(line)["embedding"] for line in capsys.readouterr().out.splitlines()]
    assert printed == LLM.load(ggufs["f32"], dtype="float32", max_batch_size=1, progress=False).embed(TEXTS)
    mean = tmp_path / "mean.gguf"
    shutil.copy(ggufs["f32"], mean)
    set_pooling(mean, 1)
    assert main(["embed", str(mean), "hi"]) == 2
    assert capsys.readouterr() == (
        "",
        f"error: {mean}: qwen3.pooling_type is 1 (mean); qwenkit pools the last token (3, last), "
        "as decoder embedding models do\n",
    )
