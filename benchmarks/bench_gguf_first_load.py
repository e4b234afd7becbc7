"""The first open of a GGUF file: header, decoding and packing, with no cache to help.

A user's first ``qwenkit chat model.gguf`` parses the header (vocabulary and merges), decodes every block
into the kernels' codes and packs them, then writes the prepared-model cache that later starts map back.
This times that first start's load, each file in a fresh process with an empty ``QWENKIT_CACHE`` (the
kernels' library shared, already built), and its peak resident memory over the interpreter's baseline,
beside the file's size. ``--other-src DIR`` runs another checkout's ``src`` (e.g. a ``git worktree`` of an
older commit) alternately in the same run, so machine drift hits both alike. Files: the bundled model and
whichever of the llama.cpp anchor files ``bench_vs_llamacpp.py`` left in ``~/.cache/qwenkit/
bench_vs_llamacpp`` exist, or ``--files``.

    .venv/bin/python benchmarks/bench_gguf_first_load.py [--rounds 2] [--other-src /tmp/old/src] [--files A B]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

CHILD = r"""
import json, sys, time
def hwm_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
import torch
from qwenkit import kernels
from qwenkit.checkpoint import load_model, open_checkpoint
kernels.available()
base = hwm_kib()
t0 = time.perf_counter()
source = open_checkpoint(sys.argv[1])
t1 = time.perf_counter()
model, _ = load_model(source, progress=False, fast_kernels=True)
t2 = time.perf_counter()
print(json.dumps({"header": t1 - t0, "load": t2 - t1, "peak_mib": (hwm_kib() - base) / 1024}))
"""

ANCHORS = Path.home() / ".cache" / "qwenkit" / "bench_vs_llamacpp"


def default_files() -> list[Path]:
    from qwenkit.default_model import default_model_path

    files = [default_model_path()]
    for name in ("qwen2.5-0.5b-random-q8_0", "qwen2.5-0.5b-random-q4_0", "qwen2.5-1.5b-random-q4_0"):
        if (ANCHORS / f"{name}.gguf").exists():
            files.append(ANCHORS / f"{name}.gguf")
    return files


def first_load(path: Path, src: str | None) -> dict:
    """One first open of ``path`` in a fresh process with an empty cache. The kernels' library is not in
    that cache (it lives under ``${XDG_CACHE_HOME:-~/.cache}/qwenkit/kernels``), so it is shared."""
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, QWENKIT_CACHE=cache)
        if src is not None:
            env["PYTHONPATH"] = src
        out = subprocess.run(
            [sys.executable, "-c", CHILD, str(path)], capture_output=True, text=True, env=env, check=True
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--other-src", help="another checkout's src/, run alternately (e.g. an older commit)")
    parser.add_argument("--files", nargs="*", type=Path)
    args = parser.parse_args()
    files = args.files or default_files()
    versions: dict[str, str | None] = {"this checkout": None}
    if args.other_src:
        versions = {f"other ({args.other_src})": args.other_src, **versions}
    results: dict[tuple[str, str], list[dict]] = {}
    for _ in range(args.rounds):
        for path in files:
            for label, src in versions.items():
                results.setdefault((path.name, label), []).append(first_load(path, src))
    print(f"first load of each file (empty cache), {args.rounds} rounds, medians; {os.cpu_count()} CPUs\n")
    print("| file | size | code | header | decode and pack | peak RSS over baseline |")
    print("|---|---:|---|---:|---:|---:|")
    for path in files:
        for label in versions:
            runs = results[(path.name, label)]
            header = statistics.median(r["header"] for r in runs)
            load = statistics.median(r["load"] for r in runs)
            peak = statistics.median(r["peak_mib"] for r in runs)
            size = path.stat().st_size / 2**20
            row = [
                path.name,
                f"{size:,.0f} MiB",
                label,
                f"{header:.2f} s",
                f"{load:.2f} s",
                f"{peak:,.0f} MiB",
            ]
            print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
