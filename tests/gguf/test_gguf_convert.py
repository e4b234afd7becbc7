"""Conversion: a GGUF converted to a Hugging Face directory computes what transformers computes from the
GGUF itself, and the directory is written all at once or not at all."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from factories import hf_model
from gguf_files import Q, tiny_vocab

from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
from qwenkit.errors import CheckpointError

PROMPT = [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2, 198, 1, 4093, 198, 19556, 905, 28, 216, 18645]


@pytest.fixture(scope="module")
def smollm_hf_dir(smollm_path, tmp_path_factory):
    return convert_gguf_to_hf(smollm_path, tmp_path_factory.mktemp("conv") / "smollm2")


@pytest.mark.slow
def test_gguf_convert_smollm2_logits_equal_transformers_gguf(smollm_hf_dir, hf_smollm) -> None:
    converted = transformers.AutoModelForCausalLM.from_pretrained(smollm_hf_dir, dtype=torch.float32).eval()
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        ours, theirs = converted(ids).logits, hf_smollm(ids).logits
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


@pytest.mark.slow
def test_gguf_convert_smollm2_files(smollm_hf_dir, smollm, smollm_path, hf_smollm_tokenizer) -> None:
    names = sorted(p.name for p in smollm_hf_dir.iterdir())
    assert names == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "tokenizer.json", "tokenizer_config.json"]  # fmt: skip
    card = (smollm_hf_dir / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n---\n")  # the GGUF's general.license, kept
    from qwenkit.license import find_license

    found = find_license(smollm_hf_dir)
    assert (found.name, found.source) == ("apache-2.0", "README.md") and "Apache License 2.0" in found.terms
    assert not list(smollm_hf_dir.parent.glob(".smollm2.*"))  # no temporary directory left behind
    config = json.loads((smollm_hf_dir / "config.json").read_text())
    assert config == {**smollm.hf_config, "torch_dtype": "float32"}
    generation = json.loads((smollm_hf_dir / "generation_config.json").read_text())
    # the ids, and the sampling the file runs with (the bundled model's publisher's): without do_sample the
    # directory would decode greedily where the file sampled
    assert generation == {
        "bos_token_id": 1,
        # <|im_end|>, the file's eos, <|endoftext|> and <reponame> (a fill-in-the-middle token): llama.cpp's
        "eos_token_id": [2, 0, 4],
        "pad_token_id": 2,
        "do_sample": True,
        "top_k": 0,
        "temperature": 0.2,
        "top_p": 0.9,
        "max_new_tokens": 512,
    }
    sampled = transformers.GenerationConfig.from_pretrained(smollm_hf_dir)
    assert (sampled.do_sample, sampled.temperature, sampled.top_p, sampled.top_k) == (True, 0.2, 0.9, 0)
    from qwenkit.generate import LLM

    params = LLM.load(smollm_hf_dir, dtype="float32").default_params()
    assert (params.temperature, params.top_p, params.top_k, params.max_tokens) == (0.2, 0.9, 0, 512)

    tok = transformers.AutoTokenizer.from_pretrained(smollm_hf_dir)
    assert tok.chat_template == hf_smollm_tokenizer.chat_template
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    # qwenkit names the same eos, for the file and the directory (/tokenizer_info once gave the lowest id's)
    from qwenkit.generate import tokenizer_for

    assert tokenizer_for(smollm_hf_dir).eos_token == tokenizer_for(smollm_path).eos_token == tok.eos_token
    for text in ["Hello world!", "def f(x):\n\treturn x  # 123", "你好 😀 <|im_end|>", "  a   b  "]:
        assert tok(text)["input_ids"] == hf_smollm_tokenizer(text)["input_ids"], text
    messages = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(messages, tokenize=False) == hf_smollm_tokenizer.apply_chat_template(
        messages, tokenize=False
    )


def test_gguf_convert_refuses_existing_dir_unless_overwrite(tmp_path, gguf_writer) -> None:
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    path = gguf_writer(tmp_path / "t.gguf", "qwen2", model.config.to_dict(),
                       {n: p.detach() for n, p in model.named_parameters()}, Q.F16)  # fmt: skip
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match="already exists"):
        convert_gguf_to_hf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    convert_gguf_to_hf(path, out, overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "t.gguf"]


def test_gguf_convert_refuses_to_overwrite_the_directory_holding_the_gguf(tmp_path, gguf_writer) -> None:
    """--overwrite onto the GGUF's own directory would delete the source file with the old directory."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    path = gguf_writer(tmp_path / "t.gguf", "qwen2", model.config.to_dict(),
                       {n: p.detach() for n, p in model.named_parameters()}, Q.F16)  # fmt: skip
    before = path.read_bytes()
    with pytest.raises(CheckpointError, match=f"output {tmp_path} would replace the source {path}"):
        convert_gguf_to_hf(path, tmp_path, overwrite=True)
    assert path.read_bytes() == before


def test_gguf_convert_to_float16_refuses_a_value_it_would_make_inf(tmp_path, gguf_writer) -> None:
    """--dtype float16 once wrote inf for a weight of 1e6 without a word (``--to qwen2`` refused it)."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach().clone() for n, p in model.named_parameters()}
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    path = gguf_writer(tmp_path / "t.gguf", "qwen2", model.config.to_dict(), state, Q.F32)
    with pytest.raises(CheckpointError) as e:
        convert_gguf_to_hf(path, tmp_path / "out", dtype="float16")
    assert str(e.value) == (
        "model.layers.0.mlp.up_proj.weight holds 1e+06, which overflows float16; "
        "convert to bfloat16 or float32"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]
    convert_gguf_to_hf(path, tmp_path / "out", dtype="bfloat16")  # bfloat16 holds it


def test_gguf_convert_failure_leaves_nothing(tmp_path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf")
    with pytest.raises(CheckpointError):
        convert_gguf_to_hf(bad, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.gguf"]


def test_gguf_convert_qwen2_q8_0_logits_equal_transformers_gguf(tmp_path, gguf_writer) -> None:
    """A quantized Qwen2 (with biases) converted in bfloat16 and float32 matches transformers' GGUF import."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    path = gguf_writer(tmp_path / "q.gguf", "qwen2", model.config.to_dict(),
                       {n: p.detach() for n, p in model.named_parameters()}, Q.Q8_0)  # fmt: skip
    direct = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path, gguf_file=path.name, dtype=torch.float32
    )
    ids = torch.tensor([[5, 80, 200, 3, 17, 99, 1, 2]])
    with torch.no_grad():
        expected = direct.eval()(ids).logits

    out = convert_gguf_to_hf(path, tmp_path / "f32")
    converted = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(converted).__name__ == "Qwen2ForCausalLM"
    with torch.no_grad():
        assert torch.equal(converted(ids).logits, expected)

    out16 = convert_gguf_to_hf(path, tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((out16 / "config.json").read_text())["torch_dtype"] == "bfloat16"
    converted16 = transformers.AutoModelForCausalLM.from_pretrained(out16, dtype="auto").eval()
    assert converted16.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        assert torch.allclose(converted16(ids).logits.float(), expected, atol=0.1, rtol=0.05)


def test_gguf_convert_refuses_a_tokenizer_it_cannot_build_before_writing_weights(
    tmp_path, gguf_writer, monkeypatch
):
    """The tokenizer is built before any weight is decoded: a file whose tokenizer is refused costs no
    conversion (a 7B file's weights take minutes) and leaves nothing behind."""
    import gguf

    import qwenkit.convert.gguf_to_hf as conv

    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))

    def pre(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop("tokenizer.ggml.pre")
        w.add_tokenizer_pre("deepseek-llm")

    path = gguf_writer(tmp_path / "t.gguf", "qwen2", model.config.to_dict(),
                       {n: p.detach() for n, p in model.named_parameters()}, Q.F16, extra=pre)  # fmt: skip
    saved: list[str] = []
    monkeypatch.setattr(conv, "save_sharded", lambda tensors, *a, **k: saved.extend(n for n, _ in tensors))
    with pytest.raises(CheckpointError, match="pre-tokenizer 'deepseek-llm'"):
        convert_gguf_to_hf(path, tmp_path / "out")
    assert saved == [] and sorted(p.name for p in tmp_path.iterdir()) == ["t.gguf"]


def test_gguf_convert_keeps_the_sampling_the_file_names(tmp_path, gguf_writer) -> None:
    """llama.cpp's convert_hf_to_gguf.py writes generation_config.json's temperature, top_p, top_k, min_p
    and repetition_penalty as ``general.sampling.*`` (float32), and llama.cpp samples with them; the
    directory made back from such a file named qwenkit's fallback sampling instead (temperature 0.7,
    top_k 20, repetition_penalty 1.05 where the file said 1.1 and top_k 0)."""
    import gguf

    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))

    def sampling(w: gguf.GGUFWriter) -> None:
        w.add_sampling_top_k(0)
        w.add_sampling_top_p(0.8)
        w.add_sampling_penalty_repeat(1.1)
        w.add_sampling_min_p(0.05)

    state = {n: p.detach() for n, p in model.named_parameters()}
    path = gguf_writer(tmp_path / "t.gguf", "qwen2", model.config.to_dict(), state, Q.F16, extra=sampling)
    out = convert_gguf_to_hf(path, tmp_path / "out")
    generation = json.loads((out / "generation_config.json").read_text())
    sampled = {k: v for k, v in generation.items() if not k.endswith("token_id")}
    assert sampled == {"do_sample": True, "top_k": 0, "top_p": 0.8, "repetition_penalty": 1.1, "min_p": 0.05}
    read = transformers.GenerationConfig.from_pretrained(out)
    assert (read.top_k, read.top_p, read.repetition_penalty, read.min_p) == (0, 0.8, 1.1, 0.05)
