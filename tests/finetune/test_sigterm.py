"""SIGTERM (``kill``, ``timeout``, a container stop) on a one-process fine-tune unwinds as Ctrl-C does:
the command says where ``--resume`` continues and exits 143, and the checkpoint it names resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[2] / "src"


def test_sigterm_says_where_resume_continues(tiny_chat_model, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(
        "".join(json.dumps({"text": f"The number {i} comes after {i - 1}."}) + "\n" for i in range(8))
    )
    out = tmp_path / "o"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    base = [sys.executable, "-m", "qwenkit.cli", "finetune", str(tiny_chat_model), str(data), str(out)]
    base += ["--batch-size", "1", "--save-every", "1", "--lora-r", "2", "--no-progress"]
    cmd = [*base, "--max-steps", "100000"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        while not list(tmp_path.glob("o.training/checkpoints/step-*/trainer_state.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()[-3000:]
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    checkpoints = tmp_path / "o.training" / "checkpoints"
    newest = max(checkpoints.iterdir(), key=lambda p: int(p.name.removeprefix("step-")))
    assert last.startswith("interrupted at step ") and last.endswith(f"; --resume continues from {newest}"), (
        last
    )
    assert not out.exists()  # nothing half-written in OUT
    steps = int(newest.name.removeprefix("step-")) + 1
    resumed = subprocess.run(
        [*base, "--max-steps", str(steps), "--resume"], env=env, capture_output=True, text=True, timeout=240
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {newest}" in resumed.stderr
    assert (out / "adapter_model.safetensors").exists()
