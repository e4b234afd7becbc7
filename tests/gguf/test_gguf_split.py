"""GGUF models split into parts by llama.cpp's llama-gguf-split load as the one file they were cut from:
the same tensors (Q4_1/Q8_0 blocks run in their own precision), the same logits bit for bit, the same
greedy tokens from the CLI; and each way a split can be broken is one line naming the file and the cause."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from factories import hf_model
from gguf.quants import quantize
from gguf_files import tiny_vocab, write_quantized_qwen2
from test_gguf_quant import random_weight

from qwenkit.checkpoint import load_model
from qwenkit.checkpoint.files import files_sha256
from qwenkit.checkpoint.gguf import GGUFError, read_gguf
from qwenkit.checkpoint.gguf_split import model_stem, part_files
from qwenkit.checkpoint.prepared_cache import _identity
from qwenkit.cli import main

Q = gguf.GGMLQuantizationType
SPLIT = gguf.Keys.Split


@pytest.fixture(scope="module")
def whole(tmp_path_factory) -> Path:
    """A two-layer Qwen2 GGUF: Q4_1 projections, a Q8_0 embedding and head, F32 norms and biases."""
    model = hf_model("qwen2", vocab_size=len(tiny_vocab()[0]), hidden_size=128, intermediate_size=256,
                     num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                     tie_word_embeddings=False)  # fmt: skip

    def blocks_for(name: str, weight: torch.Tensor, seed: int) -> tuple[np.ndarray, Q]:
        qtype = Q.Q8_0 if name in ("model.embed_tokens.weight", "lm_head.weight") else Q.Q4_1
        return quantize(random_weight(*weight.shape, seed=seed), qtype), qtype

    also = ("model.embed_tokens.weight", "lm_head.weight")
    path, _ = write_quantized_qwen2(tmp_path_factory.mktemp("whole") / "tiny.gguf", model, blocks_for, also)
    return path


def write_parts(
    src: Path, out: Path, sizes: list[int], first_alignment: int | None = None, **changes
) -> list[Path]:
    """``src`` cut as llama-gguf-split cuts it: ``out``-0000i-of-0000n.gguf, the first part holding every
    key of ``src`` then split.no, split.count and split.tensors.count, the others only those three; part
    i the next ``sizes[i]`` tensors, raw blocks copied. ``first_alignment``: the first part's
    general.alignment (llama-gguf-split copies a source's; the others keep the default, 32).
    ``changes``: {(part, key): value} overrides (None drops the key) and ``extra_tensors`` {part: [name]},
    tensors of other parts written again, to break it."""
    reader = gguf.GGUFReader(src)
    tensors = list(reader.tensors)
    assert sum(sizes) == len(tensors)
    n, paths, start = len(sizes), [], 0
    overrides, extra = changes.get("overrides", {}), changes.get("extra_tensors", {})
    for i, size in enumerate(sizes):
        path = out.with_name(f"{out.name}-{i + 1:05d}-of-{n:05d}.gguf")
        w = gguf.GGUFWriter(str(path), "qwen2")
        w.kv_data[0].clear()  # the writer's own general.architecture: a later part has none
        if i == 0:
            for field in reader.fields.values():
                if field.name.startswith("GGUF."):
                    continue
                sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
                w.add_key_value(field.name, field.contents(), field.types[0], sub_type=sub)
            if first_alignment is not None:
                w.add_custom_alignment(first_alignment)
        keys = {SPLIT.LLM_KV_SPLIT_NO: (i, "uint16"), SPLIT.LLM_KV_SPLIT_COUNT: (n, "uint16"),
                SPLIT.LLM_KV_SPLIT_TENSORS_COUNT: (len(tensors), "int32")}  # fmt: skip
        for key, (value, kind) in keys.items():
            value = overrides.get((i, key), value)
            if value is not None:
                getattr(w, f"add_{kind}")(key, value)
        mine = tensors[start : start + size] + [t for t in tensors if t.name in extra.get(i, [])]
        for t in mine:
            raw = None if t.tensor_type in (Q.F32, Q.F16) else t.tensor_type
            w.add_tensor(t.name, np.asarray(t.data), raw_dtype=raw)
        start += size
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def parts(whole, tmp_path_factory) -> list[Path]:
    n = len(gguf.GGUFReader(whole).tensors)
    return write_parts(whole, tmp_path_factory.mktemp("split") / "tiny", [5, n - 9, 4], first_alignment=64)


def _error(path: Path) -> str:
    with pytest.raises(GGUFError) as e:
        read_gguf(path)
    return str(e.value)


def test_parts_hold_the_tensors_and_metadata_as_llama_gguf_split_writes_them(whole, parts):
    first, *others = (gguf.GGUFReader(p) for p in parts)
    assert [p.name for p in parts] == [f"tiny-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert first.fields["split.count"].contents() == 3 and first.fields["general.architecture"]
    for i, r in enumerate(others, start=1):
        assert {k for k in r.fields if not k.startswith("GGUF.")} == {
            SPLIT.LLM_KV_SPLIT_NO, SPLIT.LLM_KV_SPLIT_COUNT, SPLIT.LLM_KV_SPLIT_TENSORS_COUNT
        }  # fmt: skip
        assert r.fields["split.no"].contents() == i
    assert first.alignment == 64 and all(r.alignment == 32 for r in others)


def test_split_model_reads_the_same_tensors_in_their_own_precision(whole, parts):
    one, split = read_gguf(whole), read_gguf(parts[0])
    assert split.parts == parts and split.path == parts[0]
    assert split.tensor_types == one.tensor_types
    assert {"Q4_1", "Q8_0", "F32"} <= set(split.tensor_types.values())
    assert split.hf_config == one.hf_config and split.stored_bytes == one.stored_bytes
    got, want = dict(split.tensors(keep_quantized=True)), dict(one.tensors(keep_quantized=True))
    assert list(got) == list(want)
    for name, w in want.items():
        if isinstance(w, torch.Tensor):
            assert torch.equal(got[name], w), name
        else:
            assert (got[name].bits, got[name].group_size) == (w.bits, w.group_size), name
            for field in ("codes", "scale", "shift"):
                assert torch.equal(getattr(got[name], field), getattr(w, field)), (name, field)
    assert split.tokenizer.encode("the cat").ids == one.tokenizer.encode("the cat").ids


@pytest.mark.parametrize("dequantize", [False, True], ids=["in-precision", "dequantized"])
def test_split_model_gives_the_single_files_logits_bit_for_bit(whole, parts, dequantize):
    ids = torch.tensor([[5, 9, 17, 33, 2, 40, 41, 7]])
    logits = []
    for path in (whole, parts[0]):
        model, _ = load_model(path, dtype="float32", progress=False, dequantize=dequantize)
        with torch.no_grad():
            logits.append(model(ids).float())
    assert torch.equal(logits[0], logits[1])
    assert logits[0].abs().max() > 0


def test_generate_from_the_first_part_prints_the_single_files_tokens(whole, parts, capsys):
    greedy = ["--prompt-ids", "5,9,17", "--temperature", "0", "--max-new-tokens", "6", "--json"]
    outputs = []
    for path in (whole, parts[0]):
        assert main(["generate", str(path), *greedy]) == 0
        outputs.append(json.loads(capsys.readouterr().out)["output_token_ids"])
    assert len(outputs[0]) == 6 and outputs[0] == outputs[1]


def test_chat_from_the_first_part_answers_as_the_single_file(whole, parts, capsys):
    greedy = ["-p", "the cat", "--temperature", "0", "--max-new-tokens", "6"]
    answers = []
    for path in (whole, parts[0]):
        assert main(["chat", str(path), *greedy]) == 0
        answers.append(capsys.readouterr().out)
    assert answers[0] and answers[0] == answers[1]


def test_a_first_part_without_tensors_loads(whole, tmp_path):
    """llama-gguf-split --no-tensor-first-split: the first part holds only the metadata."""
    paths = write_parts(whole, tmp_path / "e", [0, len(gguf.GGUFReader(whole).tensors)])
    one, split = read_gguf(whole), read_gguf(paths[0])
    assert len(gguf.GGUFReader(paths[0]).tensors) == 0
    got, want = dict(split.tensors()), dict(one.tensors())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_convert_to_hf_from_the_first_part_writes_the_single_files_weights(whole, parts, tmp_path, capsys):
    from safetensors.torch import load_file

    for path, out in ((whole, tmp_path / "one"), (parts[0], tmp_path / "split")):
        assert main(["convert", str(path), str(out), "--to", "hf", "--no-progress"]) == 0
    capsys.readouterr()
    one, split = (
        load_file(tmp_path / "one" / "model.safetensors"),
        load_file(tmp_path / "split" / "model.safetensors"),
    )
    assert one.keys() == split.keys() and all(torch.equal(one[k], split[k]) for k in one)
    assert json.loads((tmp_path / "split" / "config.json").read_text()) == json.loads(
        (tmp_path / "one" / "config.json").read_text()
    )


def test_the_cache_keys_cover_every_part(parts):
    """The prepared model and a run's record of its model are keyed by all parts: a rewritten part 3
    (a fresh download) misses the prepared model built from the old one."""
    assert part_files(parts[0]) == parts and part_files(parts[1]) == [parts[1]]
    before, sha = _identity(parts[0]), files_sha256(parts[0])
    st = parts[2].stat()
    os.utime(parts[2], ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert _identity(parts[0]) != before
    data = bytearray(parts[2].read_bytes())
    data[-1] ^= 1
    parts[2].write_bytes(bytes(data))
    try:
        assert files_sha256(parts[0]) != sha
    finally:
        data[-1] ^= 1
        parts[2].write_bytes(bytes(data))


def test_model_names_drop_the_part_numbers():
    assert (
        model_stem(Path("Qwen2.5-72B-Instruct-q4_k_m-00001-of-00012.gguf")) == "Qwen2.5-72B-Instruct-q4_k_m"
    )
    assert model_stem(Path("qwen2.5-0.5b-instruct-q4_k_m.gguf")) == "qwen2.5-0.5b-instruct-q4_k_m"


# ---- broken splits: one line each, naming the file and the cause ----------------------------------------


def test_a_later_part_is_refused_naming_the_first_as_llama_cpp_does(parts):
    assert _error(parts[1]) == (
        f"{parts[1]}: part 2 of a GGUF split into 3 files; pass the first part: tiny-00001-of-00003.gguf, "
        "as llama.cpp needs it (it names the model and finds the other parts)"
    )


def test_a_missing_part_is_named(whole, tmp_path):
    paths = write_parts(whole, tmp_path / "m", [5, len(gguf.GGUFReader(whole).tensors) - 5])
    paths[1].rename(tmp_path / "elsewhere.gguf")
    assert _error(paths[0]) == (
        f"{paths[1]}: no such file: part 2 of the 2 parts of m-00001-of-00002.gguf is missing"
    )


def test_a_first_part_under_another_name_is_refused(whole, tmp_path):
    first = write_parts(whole, tmp_path / "r", [5, len(gguf.GGUFReader(whole).tensors) - 5])[0]
    renamed = first.rename(tmp_path / "model.gguf")
    assert _error(renamed) == (
        f"{renamed}: the first part of a GGUF split into 2 files, but not named ...-00001-of-00002.gguf as "
        "llama-gguf-split names it, so its other parts cannot be found; give the parts their names back"
    )


def test_a_part_that_is_not_a_gguf_file_is_named(whole, tmp_path):
    paths = write_parts(whole, tmp_path / "g", [5, len(gguf.GGUFReader(whole).tensors) - 5])
    paths[1].write_bytes(b"<html>404 Not Found</html>")
    assert _error(paths[0]) == (
        f"{paths[1]}: part 2 of 2 of a split GGUF: not a GGUF file (it starts with b'<htm', not b'GGUF')"
    )


@pytest.mark.parametrize(
    ("overrides", "extra", "message"),
    [
        ({(1, "split.count"): 4}, {},
         "{p1}: split.count says the model is split into 4 files, but its first part says 3"),
        ({(2, "split.no"): 1}, {}, "{p2}: split.no says it is part 2, but it is named part 3 of 3"),
        ({(1, "split.no"): None}, {},
         "{p1}: not a part of a split GGUF (no split.no key), yet named part 2 of 3"),
        ({}, {2: ["token_embd.weight"]},
         "{p2}: tensor token_embd.weight is also in s-00001-of-00003.gguf; each tensor of a split GGUF is in "
         "one part only"),
        ({(0, "split.tensors.count"): 99}, {},
         "{p0}: split.tensors.count says the 3 parts hold 99 tensors, but they hold {n}; download the parts "
         "again"),
    ],
    ids=["count-mismatch", "wrong-part-number", "no-part-number", "tensor-in-two-parts", "tensor-count"],
)  # fmt: skip
def test_parts_that_disagree_are_refused(whole, tmp_path, overrides, extra, message):
    n = len(gguf.GGUFReader(whole).tensors)
    paths = write_parts(whole, tmp_path / "s", [5, n - 9, 4], overrides=overrides, extra_tensors=extra)
    assert _error(paths[0]) == message.format(p0=paths[0], p1=paths[1], p2=paths[2], n=n)


def test_info_on_the_first_part_shows_the_whole_model(whole, parts, capsys):
    """`info` reads the metadata of part 1 and counts the tensors (and their stored bytes) of all parts."""
    shown = []
    for path in (whole, parts[0]):
        assert main(["info", str(path)]) == 0
        first, *rest = capsys.readouterr().out.splitlines()
        assert first == f"model: {path}"
        shown.append(rest)
    assert shown[0] == shown[1]
    assert any("Q4_1 x14" in line for line in shown[1]) and any("as stored" in line for line in shown[1])


def test_serve_from_the_first_part_names_the_model_without_the_part_numbers(parts, whole, capsys):
    """`qwenkit serve` given part 1 serves the whole model, under the name the parts share; its greedy
    completion is the single file's."""
    import socket
    import subprocess
    import sys
    import time

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "QWENKIT_MODEL": str(parts[0]), "QWENKIT_PORT": str(port)}
    proc = subprocess.Popen([sys.executable, "-m", "qwenkit.cli", "serve"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)  # fmt: skip
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + 120
    try:
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (
                proc.stdout.read() if proc.poll() else ""
            )
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["tiny"]
        body = {"model": "tiny", "prompt": [5, 9, 17], "max_tokens": 4, "temperature": 0}
        answer = httpx.post(url + "/v1/completions", json=body, timeout=60).json()["choices"][0]["text"]
    finally:
        proc.terminate()
        proc.wait(60)
    assert main(["generate", str(whole), "--prompt-ids", "5,9,17", "--temperature", "0",
                 "--max-new-tokens", "4", "--json"]) == 0  # fmt: skip
    assert answer == json.loads(capsys.readouterr().out)["text"]
