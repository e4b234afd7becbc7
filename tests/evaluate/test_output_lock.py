"""One writer per run directory: a second run (or a rescore) into a directory another process is writing
is refused, naming the holder's pid, and the lock goes with the process that held it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from qwenkit.cli import main as qwenkit_main
from qwenkit.evaluate.lock import OutputInUseError
from qwenkit.evaluate.runner import Settings, rescore_dir, run

HOLD = """
import sys
from pathlib import Path
from qwenkit.evaluate.lock import output_lock
with output_lock(Path(sys.argv[1])):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held(tmp_path):
    """A run directory whose lock another process holds until it is killed."""
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    yield out, holder
    holder.kill()
    holder.wait()


def test_a_second_run_into_a_held_directory_is_refused_until_the_holder_dies(
    local, held, tiny_chat_model, capsys
):
    out, holder = held
    message = (
        f"{out} is in use by another qwenkit eval (pid {holder.pid}); wait for it to finish or give "
        "another --output"
    )
    settings = Settings(task="gsm8k", limit=1, max_new_tokens=2)
    with pytest.raises(OutputInUseError) as refused:
        run(local, settings, out, progress=False)
    assert str(refused.value) == message
    assert not (out / "samples.jsonl").exists()
    # the command refuses before it loads the model
    assert qwenkit_main(["eval", str(tiny_chat_model), "--task", "gsm8k", "--output", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    holder.kill()  # killed, not cleaned up: the kernel releases its lock
    holder.wait()
    assert run(local, settings, out, progress=False)["scores"]["n"] == 1


def test_rescoring_a_held_directory_is_refused(local, tmp_path):
    out = tmp_path / "run"
    run(local, Settings(task="gsm8k", limit=1, max_new_tokens=2), out, progress=False)
    before = (out / "samples.jsonl").read_text()
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(OutputInUseError, match=f"pid {holder.pid}"):
            rescore_dir(out, "lmeval-flexible")
    finally:
        holder.kill()
        holder.wait()
    assert (out / "samples.jsonl").read_text() == before
    assert json.loads((out / "results.json").read_text())["record"]["extractor"] == "qwen-gsm8k-base"
