"""Files read_gguf must refuse, each with a one-line message naming the file and the problem."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
from factories import hf_model
from gguf_files import Q, tiny_vocab

from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.errors import CheckpointError


@pytest.fixture
def good_gguf(tmp_path, gguf_writer):
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}
    return gguf_writer(tmp_path / "good.gguf", "qwen2", model.config.to_dict(), state, Q.F16)


def _error(path) -> str:
    with pytest.raises(GGUFError) as info:
        read_gguf(path)
    message = str(info.value)
    assert str(path) in message and "\n" not in message
    return message


def test_gguf_error_is_a_value_error() -> None:
    assert issubclass(GGUFError, ValueError) and issubclass(GGUFError, CheckpointError)


def test_gguf_error_missing_file(tmp_path) -> None:
    assert "no such file" in _error(tmp_path / "absent.gguf")


def test_gguf_error_bad_magic(tmp_path) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    assert "not a GGUF file" in _error(path)
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    assert "not a GGUF file" in _error(empty)


@pytest.mark.parametrize("keep", [0.5, 0.999, 0.01], ids=["half", "last-byte", "header"])
def test_gguf_error_truncated(tmp_path, good_gguf, keep) -> None:
    data = good_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(8, int(len(data) * keep))])
    assert "truncated" in _error(cut)


def test_gguf_error_unsupported_architecture(tmp_path) -> None:
    path = tmp_path / "falcon.gguf"
    w = gguf.GGUFWriter(str(path), "falcon")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((8, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    message = _error(path)
    assert "unsupported architecture 'falcon'" in message and "qwen2" in message


def test_gguf_error_unsupported_quantization(tmp_path, gguf_writer) -> None:
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]), hidden_size=256, num_hidden_layers=1)
    state = {n: p.detach() for n, p in model.named_parameters() if not n.endswith("o_proj.weight")}
    block, size = gguf.GGML_QUANT_SIZES[Q.IQ2_XXS]

    def iq_tensor(w: gguf.GGUFWriter) -> None:
        w.add_tensor(
            "blk.0.attn_output.weight", np.zeros((256, 256 // block * size), np.uint8), raw_dtype=Q.IQ2_XXS
        )

    path = gguf_writer(tmp_path / "iq.gguf", "qwen2", model.config.to_dict(), state, Q.F16, extra=iq_tensor)
    message = _error(path)
    assert "unsupported quantization type IQ2_XXS" in message and "blk.0.attn_output.weight" in message


def test_gguf_error_unexpected_tensor(tmp_path, gguf_writer) -> None:
    model = hf_model("llama", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}

    def stray(w: gguf.GGUFWriter) -> None:
        w.add_tensor("blk.0.attn_extra.weight", np.ones(8, np.float32))

    path = gguf_writer(tmp_path / "x.gguf", "llama", model.config.to_dict(), state, Q.F16, extra=stray)
    assert "unexpected tensor blk.0.attn_extra.weight for architecture llama" in _error(path)


def test_gguf_error_no_tokenizer(tmp_path, gguf_writer) -> None:
    model = hf_model("qwen2", vocab_size=64)
    state = {n: p.detach() for n, p in model.named_parameters()}
    path = gguf_writer(tmp_path / "bare.gguf", "qwen2", model.config.to_dict(), state, Q.F16, tokenizer=False)
    ckpt = read_gguf(path)  # weights alone are fine
    assert ckpt.hf_config["vocab_size"] == 64 and "bos_token_id" not in ckpt.hf_config
    with pytest.raises(GGUFError, match="no tokenizer"):
        ckpt.tokenizer  # noqa: B018


def _with_key(tmp_path, gguf_writer, key: str, add) -> str:
    """A tiny qwen2 GGUF whose metadata key ``key`` is replaced by what ``add(writer, key)`` writes."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]))
    state = {n: p.detach() for n, p in model.named_parameters()}

    def extra(w: gguf.GGUFWriter) -> None:
        w.kv_data[0].pop(key, None)
        add(w, key)

    return gguf_writer(tmp_path / "odd.gguf", "qwen2", model.config.to_dict(), state, Q.F16, extra=extra)


@pytest.mark.parametrize(
    "key, add, message",
    [
        ("qwen2.attention.head_count", lambda w, k: w.add_uint32(k, 0),
         "qwen2.attention.head_count is 0, not a positive whole number"),
        ("qwen2.block_count", lambda w, k: w.add_string(k, "two"),
         "qwen2.block_count is 'two', not a positive whole number"),
        ("qwen2.context_length", lambda w, k: w.add_uint32(k, 0),
         "qwen2.context_length is 0, not a positive whole number"),
        ("qwen2.attention.head_count_kv", lambda w, k: w.add_array(k, [2, 4]),
         "qwen2.attention.head_count_kv differs between layers ([2, 4]); qwenkit runs one value for all"),
        ("qwen2.attention.layer_norm_rms_epsilon", lambda w, k: w.add_string(k, "1e-6"),
         "qwen2.attention.layer_norm_rms_epsilon is '1e-6', not a number"),
    ],
    ids=["zero-heads", "text-layers", "zero-context", "varying-kv-heads", "text-eps"],
)  # fmt: skip
def test_gguf_error_a_hyperparameter_that_cannot_be_read_is_named(tmp_path, gguf_writer, key, add, message):
    path = _with_key(tmp_path, gguf_writer, key, add)
    assert _error(path) == f"{path}: {message}"


def test_gguf_per_layer_head_counts_that_agree_are_read_as_llama_cpp_reads_them(tmp_path, gguf_writer):
    """llama.cpp takes head_count_kv as one value or one per layer; every layer's the same is that value."""
    path = _with_key(
        tmp_path, gguf_writer, "qwen2.attention.head_count_kv", lambda w, k: w.add_array(k, [2, 2])
    )
    config = read_gguf(path).hf_config
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)


@pytest.mark.parametrize("part", [0, 2])
def test_gguf_error_a_part_of_a_split_gguf_under_another_name_says_so(tmp_path, gguf_writer, part):
    """llama-gguf-split's parts (read whole by test_gguf_split): the first once failed as missing dozens of
    layer tensors, a later one as an 'unsupported architecture None' (only the first holds the metadata).
    Renamed, the first cannot find the others, and a later one is not where a model starts."""

    def split(w: gguf.GGUFWriter) -> None:
        w.add_uint16("split.no", part)
        w.add_uint16("split.count", 3)
        w.add_int32("split.tensors.count", 40)

    path = _with_key(tmp_path, gguf_writer, "split.no", lambda w, k: split(w))
    assert _error(path) == (
        f"{path}: the first part of a GGUF split into 3 files, but not named ...-00001-of-00003.gguf as "
        "llama-gguf-split names it, so its other parts cannot be found; give the parts their names back"
        if part == 0
        else f"{path}: part 3 of a GGUF split into 3 files; pass the first part, as llama.cpp needs it (it "
        "names the model and finds the other parts)"
    )
