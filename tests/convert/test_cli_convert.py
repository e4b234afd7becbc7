"""``qwenkit convert`` end to end through the CLI entry points."""

from __future__ import annotations

import json
import re

import pytest
from v1_sources import CHAT_GENERATION, write_source

import qwenkit.cli
import qwenkit.convert.gguf_to_hf
from qwenkit.cli.convert import main


def test_cli_converts_and_verifies(tmp_path, capsys):
    src = write_source(tmp_path / "src", shards=3, generation=CHAT_GENERATION)
    out = tmp_path / "out"
    assert main([str(src), str(out), "--to", "qwen2", "--shard-size", "200KB", "--verify"]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert lines[0].startswith(
        f"wrote {out} (Qwen1.5 / qwen2 layout): 27 tensors, 0.00 GB in 4 shard(s), float32"
    )
    assert "other files: config.json, generation_config.json, LICENSE, NOTICE" in captured.out
    assert (
        "note: the source uses dynamic NTK RoPE and LogN attention scaling, which Qwen2 does not have"
        in captured.out
    )
    assert "verify: 3 prompts, max |logit difference| 0 (tolerance" in captured.out
    assert "greedy tokens agree 24/24" in captured.out
    assert (
        "verify: past the trained length: at 64 tokens (twice the trained 32) the next-token logits differ"
        in captured.out
    )
    assert lines[-1] == "verify: OK, the converted model computes the same function as its source"
    assert "converting" in captured.err and "tensors=27" in captured.err  # the progress bar
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 4
    assert json.loads((out / "config.json").read_text())["model_type"] == "qwen2"


def test_cli_defaults_to_qwen2_for_a_directory_and_keeps_dtype(tmp_path, capsys):
    src = write_source(tmp_path / "src", shards=1)
    assert main([str(src), str(tmp_path / "out"), "--no-progress", "--dtype", "float16"]) == 0
    captured = capsys.readouterr()
    assert (
        "float16" in captured.out.splitlines()[0] and "float32 -> float16 rounds the weights" in captured.out
    )
    assert captured.err == ""


def test_cli_info_shows_the_license_of_the_output(tmp_path, capsys):
    src = write_source(tmp_path / "src", shards=1)
    assert qwenkit.cli.main(["convert", str(src), str(tmp_path / "out"), "--no-progress"]) == 0
    assert qwenkit.cli.main(["info", str(tmp_path / "out")]) == 0
    assert "tongyi-qianwen: Tongyi Qianwen License" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("make", "args", "message"),
    [
        ("existing", [], r"error: .*out already exists; pass --overwrite to replace it"),
        ("qwen2", [], r"error: .* is not a Qwen v1 checkpoint: config.json has model_type 'qwen2'"),
        ("missing-shard", [], r"error: model.safetensors.index.json lists shard\(s\) missing"),
        ("ok", ["--to", "hf"], r"error: --to hf converts a .gguf file; .* is not one"),
        ("ok", ["--shard-size", "lots"], r"error: cannot read size 'lots'"),
        ("gguf", ["--to", "qwen2"], r"error: .*model.gguf is a GGUF file; convert it with --to hf"),
        ("gguf", ["--verify"], r"error: --verify is available for --to qwen2 only"),
    ],
)
def test_cli_errors_are_one_line_and_exit_2(tmp_path, capsys, make, args, message):
    src = write_source(tmp_path / "src", shards=3)
    out = tmp_path / "out"
    if make == "existing":
        out.mkdir()
    elif make == "qwen2":
        cfg = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**cfg, "model_type": "qwen2"}))
    elif make == "missing-shard":
        (src / "model-00001-of-00003.safetensors").unlink()
    elif make == "gguf":
        src = tmp_path / "model.gguf"
        src.write_bytes(b"GGUF")
    assert qwenkit.cli.main(["convert", str(src), str(out), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert re.match(message, err), err


def test_cli_dispatches_gguf_to_the_gguf_converter(tmp_path, capsys, monkeypatch):
    calls = []

    def fake(gguf_path, out_dir, dtype="float32", overwrite=False, shard_bytes=0):
        calls.append((gguf_path, out_dir, dtype, overwrite, shard_bytes))
        return out_dir

    monkeypatch.setattr(qwenkit.convert.gguf_to_hf, "convert_gguf_to_hf", fake)
    gguf = tmp_path / "m.gguf"
    assert main([str(gguf), str(tmp_path / "hf"), "--overwrite", "--shard-size", "2GB"]) == 0
    assert calls == [(str(gguf), str(tmp_path / "hf"), "float32", True, 2 * 10**9)]
    assert main([str(gguf), str(tmp_path / "hf"), "--to", "hf", "--dtype", "bfloat16"]) == 0
    assert calls[-1][2] == "bfloat16"
    assert "(Hugging Face layout)" in capsys.readouterr().out


def test_cli_refuses_an_output_on_a_filesystem_of_no_size(tmp_path, capsys):
    """/proc reports 0 bytes in all: refused before any work, not after as a "disk full" at 0.00 GB."""
    src = write_source(tmp_path / "src", shards=1)
    out = "/proc/qwenkit-never/out"
    assert qwenkit.cli.main(["convert", str(src), out, "--no-progress"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: cannot write {out}: /proc is on a filesystem that holds no files\n"
    )
