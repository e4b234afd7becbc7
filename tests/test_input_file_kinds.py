"""An input file that is there but is not a regular file (a named pipe, /dev/null, a loop of symbolic links,
a link to a missing path) is named as what it is: the readers said "does not exist" or "no such file"
for all of them, sending the user looking for a path that is there."""

from __future__ import annotations

import os

import pytest

from qwenkit.cli import main
from qwenkit.paths import not_a_file


@pytest.fixture
def odd_paths(tmp_path):
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)
    loop = tmp_path / "loop.jsonl"
    os.symlink(tmp_path / "loop2.jsonl", loop)
    os.symlink(loop, tmp_path / "loop2.jsonl")
    dangling = tmp_path / "link.jsonl"
    os.symlink(tmp_path / "gone.jsonl", dangling)
    return {
        fifo: "is a named pipe (FIFO), not a regular file",
        loop: "is a loop of symbolic links",
        dangling: f"is a symbolic link to {tmp_path / 'gone.jsonl'}, which does not exist",
        "/dev/null": "is a device, not a regular file",
    }


def test_not_a_file_words(tmp_path, odd_paths):
    for path, words in odd_paths.items():
        assert not_a_file(path) == words
    (tmp_path / "f.txt").write_text("x")
    assert not_a_file(tmp_path / "f.txt") is None
    assert not_a_file(tmp_path) == "is a directory"
    assert not_a_file(tmp_path / "missing") == "does not exist"
    assert not_a_file(tmp_path / "f.txt" / "under") == "does not exist"


def test_filter_and_finetune_data(tmp_path, odd_paths, capsys, tiny_chat_model):
    for path, words in odd_paths.items():
        assert main(["filter", str(path), str(tmp_path / "out.jsonl")]) == 2
        assert capsys.readouterr().err == f"error: {path} {words}\n"
        for nproc in ("1", "2"):  # one process reads the data; several are refused before they start
            argv = ["finetune", str(tiny_chat_model), str(path), str(tmp_path / "ft"), "--nproc", nproc]
            assert main([*argv, "--no-progress"]) == 2
            assert capsys.readouterr().err.splitlines()[-1] == f"error: {path} {words}"
    assert not (tmp_path / "out.jsonl").exists() and not (tmp_path / "ft").exists()
    assert main(["filter", str(tmp_path / "none.jsonl"), str(tmp_path / "out.jsonl")]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path / 'none.jsonl'}: no such file\n"  # as before


def test_perplexity_data(tmp_path, odd_paths, capsys):
    for path, words in odd_paths.items():
        argv = ["eval", str(tmp_path / "no-model"), "--task", "ppl", "--data", str(path), "--no-progress"]
        assert main(argv) == 2
        assert capsys.readouterr().err == f"error: perplexity needs a text file: {path} {words}\n"


def test_calibration_file(tmp_path, odd_paths):
    from qwenkit.quant.pipeline import QuantizationError, _read_calibration

    for path, words in odd_paths.items():
        with pytest.raises(QuantizationError) as e:
            _read_calibration(path)
        assert str(e.value) == f"calibration file {path} {words}"


def test_model_path_that_is_a_broken_link(tmp_path, odd_paths, capsys):
    for path, words in list(odd_paths.items())[1:3]:  # the loop and the dangling link
        assert main(["info", str(path)]) == 2
        assert capsys.readouterr().err == f"error: {path} {words}\n"
