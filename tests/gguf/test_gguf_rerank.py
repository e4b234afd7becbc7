"""A Qwen3-Reranker GGUF as llama.cpp's converter writes it (pooling rank, output labels "yes"/"no",
``cls.output.weight`` = the head's rows of those two tokens; an untied model's lm_head not written),
written here with gguf-py from the tiny random reranker tests/test_rerank.py checks against the model
card: its scores are those of the same model loaded from its Hugging Face directory, from the two rows
alone (no full-vocabulary head is built), and every other request is refused in one line."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import gguf
import pytest
import torch
from gguf_files import write_qwen3_reranker_gguf

from qwenkit.checkpoint.gguf import GGUFError
from qwenkit.engine import SamplingParams, SamplingParamsError
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.generate import LLM
from qwenkit.model.score_head import RANK_ONLY
from qwenkit.model.transformer import is_headless

QUERY = "What is the capital of China?"
DOCS = ["The capital of China is Beijing.", "Gravity attracts bodies.", "一只猫坐在垫子上。", "hi"]
Q = gguf.GGMLQuantizationType
TOLERANCE = {Q.F32: 1e-6, Q.F16: 3e-5, Q.Q8_0: 5e-4}  # 9e-6 and 1.6e-4 here; Q8_0: int8 codes run


@pytest.fixture(scope="module", params=[True, False], ids=["tied", "untied"])
def model_dir(request, tmp_path_factory):
    from factories import write_tiny_chat_model

    path = tmp_path_factory.mktemp("rerankgguf") / "q3r"
    return write_tiny_chat_model(path, tie_word_embeddings=request.param)


def load(path):
    return LLM.load(path, dtype="float32", progress=False, max_seq_len=256, max_batch_size=2)


@pytest.fixture(scope="module")
def want(model_dir) -> dict[str | None, list[float]]:
    llm = load(model_dir)
    return {None: llm.rerank(QUERY, DOCS), "task": llm.rerank(QUERY, DOCS, "Find geography facts")}


@pytest.mark.parametrize("qtype", list(TOLERANCE), ids=lambda q: q.name)
def test_scores_equal_the_hugging_face_directorys_from_the_two_rows(model_dir, want, tmp_path, qtype):
    llm = load(write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf", qtype=qtype))
    model, ids = llm.model, (llm.tokenizer.token_to_id("yes"), llm.tokenizer.token_to_id("no"))
    assert is_headless(model) and model.score_head.token_ids == ids
    assert tuple(model.score_head.weight.shape) == (2, 32)  # no (151936, 32) head beside it
    assert not any(p.shape[0] == 151936 for n, p in model.named_parameters() if "embed" not in n)
    got = llm.rerank(QUERY, DOCS)
    assert len(set(got)) == 4
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want[None]), rtol=0, atol=TOLERANCE[qtype])
    task = llm.rerank(QUERY, DOCS, "Find geography facts")
    torch.testing.assert_close(torch.tensor(task), torch.tensor(want["task"]), rtol=0, atol=TOLERANCE[qtype])


def test_text_and_embeddings_are_refused_in_one_line(model_dir, tmp_path):
    llm = load(write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf"))
    with pytest.raises(SamplingParamsError, match=re.escape(RANK_ONLY)):
        llm.generate("hi", SamplingParams(max_tokens=2))
    with pytest.raises(
        ConfigError, match=re.escape(f"qwen3.pooling_type is 4 (rank), a reranker's file: {RANK_ONLY}")
    ):
        llm.embed("hi")
    with pytest.raises(SamplingParamsError, match=re.escape(RANK_ONLY)):
        llm.engine.validate([1, 2], SamplingParams(max_tokens=0, embed=True))
    with pytest.raises(SamplingParamsError, match="score token id 5 is none of this reranker's"):
        llm.engine.validate([1, 2], SamplingParams(max_tokens=0, score_token_ids=(5,)))


@pytest.mark.parametrize(
    "labels, rows, message",
    [
        (
            ("no", "yes"),
            None,
            "qwen3.classifier.output_labels are ['no', 'yes']; qwenkit reranks with the yes/no",
        ),
        (("yes", "no", "maybe"), ("yes", "no", "a"), "output_labels are ['yes', 'no', 'maybe']"),
        (("yes", "no"), (), 'without cls.output.weight, the rows of "yes" and "no"'),
        (("yes", "no"), ("yes",), "cls.output.weight has shape (1, 32), not (2, 32)"),
    ],
)
def test_a_rank_file_qwenkit_cannot_score_is_refused_by_name(model_dir, tmp_path, labels, rows, message):
    path = write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf", labels=labels, rows=rows)
    with pytest.raises(GGUFError, match=f"r.gguf: .*{re.escape(message)}"):
        load(path)


def test_a_cls_output_in_a_file_of_another_pooling_is_refused_by_name(model_dir, tmp_path):
    path = write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf", pooling=gguf.PoolingType.LAST)
    with pytest.raises(GGUFError, match=re.escape("cls.output.weight is a reranker's tensor") + ".* is 3$"):
        load(path)


def test_convert_and_quantize_refuse_a_reranker_gguf_and_write_nothing(model_dir, tmp_path):
    """Their directories have no place for a head of two rows: one loaded as nothing (an unexpected
    tensor) and said it pooled for embeddings."""
    from qwenkit.convert.gguf_to_hf import convert_gguf_to_hf
    from qwenkit.quant.pipeline import quantize_checkpoint

    path = write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf")
    refused = re.escape(f"{path} is a reranker's GGUF (pooling rank): it holds only the head's rows")
    with pytest.raises(CheckpointError, match=refused + ".*Hugging Face causal LM's directory"):
        convert_gguf_to_hf(path, tmp_path / "hf")
    with pytest.raises(CheckpointError, match=refused + ".*GPTQ causal LM's directory"):
        quantize_checkpoint(path, tmp_path / "q", bits=8, method="rtn")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.gguf"]


CONVERTER = (
    Path.home()
    / ".cache/qwenkit/bench_vs_llamacpp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py"
)


@pytest.mark.skipif(not CONVERTER.is_file(), reason=f"llama.cpp's converter is not unpacked at {CONVERTER}")
def test_llama_cpps_own_converter_writes_what_scores_as_the_directory(model_dir, want, tmp_path):
    """The converter takes a directory named like Qwen3-Reranker for one (``_is_qwen3_reranker``)."""
    source = tmp_path / "Qwen3-Reranker-tiny"
    shutil.copytree(model_dir, source)
    out = tmp_path / "r.gguf"
    env = {"PYTHONPATH": str(CONVERTER.parent / "gguf-py"), "PATH": "/usr/bin:/bin"}
    cmd = [sys.executable, str(CONVERTER), str(source), "--outtype", "f32", "--outfile", str(out)]
    subprocess.run(cmd, check=True, capture_output=True, env=env)
    llm = load(out)
    assert llm.model.score_head.token_ids == (9693, 2152)  # "yes", "no"
    torch.testing.assert_close(
        torch.tensor(llm.rerank(QUERY, DOCS)), torch.tensor(want[None]), rtol=0, atol=1e-6
    )


def test_info_says_the_file_reranks_only(model_dir, tmp_path):
    from qwenkit.cli.info import describe

    text = describe(str(write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf")))
    row = r"output head +none: the rows of \"yes\" and \"no\" \(cls\.output\): it reranks only\n"
    assert re.search(row, text)


@pytest.mark.parametrize(
    "command",
    [
        ["generate", "{m}", "-p", "hi"],
        ["chat", "{m}", "-p", "hi"],
        ["profile", "{m}"],
        ["eval", "{m}", "--task", "ppl", "--data", "{t}"],
        ["finetune", "{m}", "{d}", "{o}", "--max-steps", "1"],
    ],
    ids=lambda c: c[0],
)
def test_text_commands_refuse_the_file_before_loading_it(model_dir, tmp_path, command, capsys, monkeypatch):
    """Fine-tuning and eval failed at its first logits with a traceback (MissingHead's ValueError)."""
    from qwenkit.cli import main

    def never(*args, **kwargs):
        raise AssertionError("the weights were loaded")

    path = write_qwen3_reranker_gguf(model_dir, tmp_path / "r.gguf")
    monkeypatch.setattr(LLM, "load", never)
    monkeypatch.setattr("qwenkit.profile.profile", never)
    (tmp_path / "t.txt").write_text("some text to score\n")
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "d.jsonl").write_text(json.dumps({"messages": chat}) + "\n")
    names = {"t": "t.txt", "d": "d.jsonl", "o": "out"}
    argv = [a.format(m=path, **{k: str(tmp_path / n) for k, n in names.items()}) for a in command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == f"error: {path}: {RANK_ONLY}; serve it (`qwenkit serve`) and ask POST /v1/rerank"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl", "r.gguf", "t.txt"]
