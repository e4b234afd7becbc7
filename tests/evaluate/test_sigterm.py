"""SIGTERM (``kill``, a container stop) ends ``qwenkit eval`` as Ctrl-C does: one line saying it was stopped,
how many samples are kept where, and how to resume; exit 143. It used to exit 143 printing nothing."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

CHUNK = 16  # samples written at a time with --batch-size 1 (runner: max(4 * batch size, 16))
ITEMS = 3 * CHUNK


def test_sigterm_says_what_is_kept_and_the_same_command_resumes(tiny_chat_model, tmp_path):
    data, out = tmp_path / "test.jsonl", tmp_path / "run"
    rows = [
        {"question": f"What is {i} + 1?", "answer": f"{i} + 1 = {i + 1}\n#### {i + 1}"} for i in range(ITEMS)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    samples = out / "samples.jsonl"
    command = [sys.executable, "-m", "qwenkit.cli", "eval", str(tiny_chat_model), "--task", "gsm8k"]
    command += ["--method", "generate", "--data", str(data), "--batch-size", "1", "--max-new-tokens", "32"]
    command += ["--dtype", "float32", "--no-progress", "--output", str(out)]

    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not (samples.exists() and samples.read_text().count("\n") >= CHUNK):
            assert run.poll() is None, run.communicate()
            assert time.monotonic() < deadline, "no samples written in 300 s"
            time.sleep(0.05)
        run.send_signal(signal.SIGTERM)  # the first chunk is written; the rest take seconds more
        stdout, stderr = run.communicate(timeout=120)
    finally:
        if run.poll() is None:
            run.kill()
    kept = samples.read_text().count("\n")
    assert run.returncode == 143, stderr
    assert CHUNK <= kept < ITEMS and stdout == ""
    assert stderr == (
        f"stopped by SIGTERM: {kept} samples kept in {samples}; rerun the same command to resume\n"
    )
    assert not (out / "results.json").exists()

    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["scores"]["n"] == ITEMS and results["timing"]["items_run"] == ITEMS - kept
    assert [json.loads(line)["id"] for line in samples.read_text().splitlines()] == [
        f"gsm8k/test/{i}" for i in range(ITEMS)
    ]
