"""Bad input is refused with a message naming the problem, and a failed conversion leaves nothing that
looks like a finished output directory."""

from __future__ import annotations

import errno
import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file
from v1_sources import write_source

import qwenkit.checkpoint.saver
import qwenkit.convert.v1_to_qwen2 as v1_to_qwen2
from qwenkit.checkpoint.sanitize import sanitize
from qwenkit.convert.v1_to_qwen2 import convert_v1_to_qwen2
from qwenkit.errors import CheckpointError, ConfigError


def leftovers(root):
    return sorted(p.name for p in root.iterdir() if p.name != "src")


def test_refuses_a_source_that_is_not_qwen_v1(tmp_path):
    src = write_source(tmp_path / "src")
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    with pytest.raises(
        CheckpointError, match=r"not a Qwen v1 checkpoint.*model_type 'qwen2' \(it is already in"
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_refuses_tied_embeddings(tmp_path):
    """The output always has its own lm_head (tie false), while the source, read as tied, uses wte:
    converting once gave logits 27 apart, and only --verify noticed."""
    src = write_source(tmp_path / "src", cfg={"tie_word_embeddings": True})
    with pytest.raises(ConfigError) as e:
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert str(e.value) == (
        "tie_word_embeddings: true is not a Qwen v1 setting (every release has its own lm_head); "
        "set it to false in config.json"
    )
    assert leftovers(tmp_path) == []


def test_refuses_a_directory_without_config(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(CheckpointError, match=r"has no config\.json"):
        convert_v1_to_qwen2(tmp_path / "src", tmp_path / "out", progress=False)


def test_refuses_a_missing_shard(tmp_path):
    src = write_source(tmp_path / "src", shards=3)
    (src / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(
        CheckpointError, match=r"lists shard\(s\) missing .*: model-00002-of-00003.safetensors"
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_refuses_a_shard_that_disagrees_with_the_index(tmp_path):
    src = write_source(tmp_path / "src", shards=3)
    shard = src / "model-00003-of-00003.safetensors"
    tensors = load_file(shard)
    save_file({**tensors, "transformer.h.0.ln_1.weight": torch.ones(64)}, str(shard))  # also in shard 1
    with pytest.raises(
        CheckpointError,
        match=r"model-00003-of-00003.safetensors holds tensor 'transformer.h.0.ln_1.weight', "
        r"but the index maps it to model-00001-of-00003.safetensors",
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_refuses_a_tensor_whose_shape_disagrees_with_config(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 160}))  # not doubled
    with pytest.raises(
        CheckpointError,
        match=r"'model.layers.0.mlp.\w+_proj.weight' has shape .*160.*, but config.json implies .*80",
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_refuses_a_source_missing_a_tensor(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    tensors = load_file(src / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks tensor\(s\) a qwen2 model needs: lm_head\.weight"):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_refuses_an_existing_output_unless_overwrite(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(CheckpointError, match=r"out already exists; pass --overwrite to replace it"):
        convert_v1_to_qwen2(src, out, progress=False)
    assert (out / "keep.txt").read_text() == "mine"
    convert_v1_to_qwen2(src, out, overwrite=True, progress=False)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert leftovers(tmp_path) == ["out"]


def test_refuses_to_write_over_its_source(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    with pytest.raises(CheckpointError, match="would replace the source"):
        convert_v1_to_qwen2(src, src, overwrite=True, progress=False)
    with pytest.raises(CheckpointError, match="would replace the source"):
        convert_v1_to_qwen2(src, tmp_path, overwrite=True, progress=False)
    assert (src / "model.safetensors").is_file()


def test_disk_full_midway_cleans_up(tmp_path, monkeypatch):
    """The second shard hits ENOSPC: the first is already on disk, in the temporary directory."""
    src = write_source(tmp_path / "src", shards=1)
    real_save = qwenkit.checkpoint.saver.write_safetensors
    calls = []

    def save_file_then_full(filename, tensors, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device", filename)
        real_save(filename, tensors, metadata=metadata)

    monkeypatch.setattr(qwenkit.checkpoint.saver, "write_safetensors", save_file_then_full)
    with pytest.raises(
        CheckpointError, match=r"disk full while writing .*out \(.* GB free\); the partial output was removed"
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", shard_bytes=100_000, progress=False)
    assert len(calls) == 2 and re.search(r"\.out\.partial-", str(calls[0]))
    assert leftovers(tmp_path) == []


def test_disk_full_with_overwrite_keeps_the_old_output(tmp_path, monkeypatch):
    src = write_source(tmp_path / "src", shards=1)
    out = tmp_path / "out"
    convert_v1_to_qwen2(src, out, progress=False)
    before = sorted(p.name for p in out.iterdir())

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(qwenkit.checkpoint.saver, "write_safetensors", full)
    with pytest.raises(CheckpointError, match="disk full"):
        convert_v1_to_qwen2(src, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == before
    assert leftovers(tmp_path) == ["out"]


def test_not_enough_free_space_is_refused_before_writing(tmp_path, monkeypatch):
    src = write_source(tmp_path / "src", shards=1)
    monkeypatch.setattr(
        v1_to_qwen2.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000, "total": 10**12})()
    )
    with pytest.raises(CheckpointError, match=r"not enough disk space .* needs about 0.00 GB, 0.00 GB free"):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_interrupt_cleans_up(tmp_path, monkeypatch):
    src = write_source(tmp_path / "src", shards=1)

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwenkit.checkpoint.saver, "write_safetensors", interrupted)
    with pytest.raises(KeyboardInterrupt):
        convert_v1_to_qwen2(src, tmp_path / "out", progress=False)
    assert leftovers(tmp_path) == []


def test_unknown_dtype(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    with pytest.raises(ConfigError, match="unknown dtype 'int8'"):
        convert_v1_to_qwen2(src, tmp_path / "out", dtype="int8", progress=False)


def test_verify_catches_a_wrong_conversion_and_writes_nothing(tmp_path, monkeypatch):
    """A converter bug (gate and up swapped) is caught by --verify before the output appears."""
    src = write_source(tmp_path / "src", shards=1)

    def swapped(config, tensors):
        for name, t in sanitize(config, tensors):
            yield (
                name.replace("gate_proj", "TMP").replace("up_proj", "gate_proj").replace("TMP", "up_proj"),
                t,
            )

    monkeypatch.setattr(v1_to_qwen2, "sanitize", swapped)
    with pytest.raises(
        CheckpointError,
        match=r"verification failed, nothing written to .*out: 3 prompts, max \|logit difference\| ",
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", verify=True, progress=False)
    assert leftovers(tmp_path) == []


def test_float16_overflow_is_refused(tmp_path):
    src = write_source(tmp_path / "src", shards=1)
    tensors = load_file(src / "model.safetensors")
    tensors["transformer.h.1.mlp.w1.weight"][3, 5] = -70000.0
    save_file(tensors, str(src / "model.safetensors"))
    with pytest.raises(
        CheckpointError, match=r"model.layers.1.mlp.up_proj.weight holds 70000, which overflows float16"
    ):
        convert_v1_to_qwen2(src, tmp_path / "out", dtype="float16", progress=False)
    assert leftovers(tmp_path) == []
    convert_v1_to_qwen2(src, tmp_path / "out", dtype="bfloat16", progress=False)  # bfloat16 has the range


def test_free_space_is_measured_where_a_new_output_goes(tmp_path, monkeypatch):
    """OUT under directories still to be made: the space is the disk of its nearest existing ancestor,
    not the working directory's (another, fuller disk refused a conversion that fits)."""
    src = write_source(tmp_path / "src", shards=1)
    (tmp_path / "big").mkdir()
    (tmp_path / "small").mkdir()
    asked = []

    def usage(path):
        asked.append(str(path))
        free = 10**12 if str(path).startswith(str(tmp_path / "big")) else 1000
        return type("U", (), {"free": free, "total": 10**12})()

    monkeypatch.setattr(v1_to_qwen2.shutil, "disk_usage", usage)
    monkeypatch.chdir(tmp_path / "small")
    result = convert_v1_to_qwen2(src, tmp_path / "big" / "new" / "out", progress=False)
    assert result.tensors > 0 and (tmp_path / "big" / "new" / "out" / "config.json").is_file()
    assert set(asked) == {str(tmp_path / "big")}  # never the working directory's disk
