"""Time from launching ``qwenkit chat -p QUESTION`` to the first byte of the answer, on the bundled model.

Each run is a fresh process (interpreter, imports, load, prompt, first token), timed from ``Popen`` to the
first byte on stdout (``chat -p`` writes and flushes each piece as it is decoded). Runs alternate between
the configurations, so load on the machine affects them alike; medians over ``--runs``, with the CPU time
each process had used by its first byte (less sensitive to other jobs holding the cores). The default run
is the file in its own precision (Q4_1/Q8_0 codes, header and prepared-model caches warm); beside it the
same with the prepared-model cache off (decoding and packing at every start), a first start (both caches
empty: parse, decode, pack, write), the old float load (``--gguf-dequantize``), the default run with one
torch thread, and llama.cpp's time to first token on the same file when llama-cpp-python is installed
(or, with ``--llama-src``/``--llama-lib``, the sdist and libllama ``bench_vs_llamacpp.py`` builds).
Then, in one fresh process per run, the default start phase by phase (medians). Goal: under 1.5 s.

    .venv/bin/python benchmarks/bench_start.py [--runs 7] [--llama-src SDIST --llama-lib DIR]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is the capital of France?"
LLAMA_CPP = r"""
import sys, time
t0 = float(sys.argv[2])
from llama_cpp import Llama
llm = Llama(sys.argv[1], n_ctx=2048, verbose=False)
for chunk in llm.create_chat_completion([{"role": "user", "content": sys.argv[3]}], stream=True,
                                        temperature=0.2, top_p=0.9, max_tokens=8):
    if chunk["choices"][0]["delta"].get("content"):
        print(time.time() - t0, flush=True)
        break
"""


PHASES = r"""
import sys, time
t0 = time.perf_counter()
import gc
gc.disable()
from qwenkit.cli import quiet_library_threads  # as the CLI imports torch
with quiet_library_threads():
    import torch
t1 = time.perf_counter()
import qwenkit.cli.chat, qwenkit.generate
gc.freeze(); gc.enable()
t2 = time.perf_counter()
from qwenkit.checkpoint import load_model, open_checkpoint
from qwenkit.default_model import default_model_path
from qwenkit.generate import LLM, tokenizer_for
source = open_checkpoint(default_model_path())
tokenizer = tokenizer_for(source)
t3 = time.perf_counter()
model, _ = load_model(source, progress=False, fast_kernels=True)
t4 = time.perf_counter()
llm = LLM(model, tokenizer, max_batch_size=1)
for delta in llm.stream(sys.argv[1], llm.default_params(max_tokens=1)):
    break
t5 = time.perf_counter()
print(t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4)
"""
PHASE_NAMES = [
    "import torch",
    "the CLI's other imports",
    "GGUF header (cached) and tokenizer",
    "loading the weights",
    "prompt and first token",
]


def qwenkit_exe() -> str:
    return str(Path(sys.executable).with_name("qwenkit"))


def first_byte_seconds(cmd: list[str]) -> tuple[float, float]:
    """Seconds from starting ``cmd`` (``VAR=value`` words first set its environment) to the first byte
    it writes on stdout, and the CPU seconds the process had used by then."""
    env = dict(os.environ)
    while cmd and "=" in cmd[0]:
        key, _, value = cmd[0].partition("=")
        env[key], cmd = value, cmd[1:]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    first = proc.stdout.read(1)
    elapsed = time.perf_counter() - start
    used = cpu_seconds(proc.pid)
    proc.kill()
    proc.wait()
    if not first:
        raise RuntimeError(f"{' '.join(cmd)} wrote nothing")
    return elapsed, used


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds the process has used (less sensitive than wall time to other jobs
    holding the cores; on an idle machine with one thread the two agree)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def llama_cpp_seconds(model: Path, env: dict[str, str] | None) -> float:
    out = subprocess.run(
        [sys.executable, "-c", LLAMA_CPP, str(model), repr(time.time()), QUESTION],
        capture_output=True,
        text=True,
        check=True,
        env=env,
    )
    return float(out.stdout.split()[0])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--llama-src", type=Path, help="llama-cpp-python's sdist (bench_vs_llamacpp.py)")
    parser.add_argument("--llama-lib", type=Path, help="the directory holding the libllama built from it")
    args = parser.parse_args()
    from qwenkit.default_model import default_model_path

    model = default_model_path()
    chat = [qwenkit_exe(), "chat", "-p", QUESTION, "--max-new-tokens", "8"]
    first_start = "qwenkit, first start (empty caches: parse, decode, pack, write the cache)"
    configs: dict[str, list[str] | None] = {
        "qwenkit, in the file's precision (default)": chat,
        "qwenkit, prepared-model cache off (QWENKIT_PREPARED_CACHE=off)": [
            "QWENKIT_PREPARED_CACHE=off",
            *chat,
        ],
        first_start: chat,
        "qwenkit --gguf-dequantize (float weights, the old load)": [*chat, "--gguf-dequantize"],
        # one torch thread: shows what a thread team waiting for a busy core costs on a shared machine
        "qwenkit, OMP_NUM_THREADS=1": ["OMP_NUM_THREADS=1", *chat],
    }
    llama_env = None  # the llama.cpp child's environment: this one, where llama-cpp-python is installed
    if args.llama_src and args.llama_lib:
        from bench_vs_llamacpp import llama_env as sdist_env  # benchmarks/, beside this script

        llama_env = sdist_env(args.llama_src, args.llama_lib)
        configs["llama.cpp (llama-cpp-python)"] = []
    else:
        try:
            import llama_cpp  # noqa: F401
        except ImportError:
            configs["llama.cpp (llama-cpp-python)"] = None
        else:
            configs["llama.cpp (llama-cpp-python)"] = []
    first_byte_seconds(chat)  # warm the page cache and the GGUF header cache
    times: dict[str, list[float]] = {name: [] for name in configs}
    cpu: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.runs):
        for name, cmd in configs.items():
            if cmd is None:
                continue
            if name == first_start:
                with tempfile.TemporaryDirectory() as empty:
                    wall, used = first_byte_seconds([f"QWENKIT_CACHE={empty}", *cmd])
                times[name].append(wall)
                cpu[name].append(used)
                continue
            if cmd == []:
                times[name].append(llama_cpp_seconds(model, llama_env))
                continue
            wall, used = first_byte_seconds(cmd)
            times[name].append(wall)
            cpu[name].append(used)
    print(f"model: {model.name}; {args.runs} runs each, alternating; {os.cpu_count()} CPUs")
    print(f"question: {QUESTION!r}; time from process start to the first byte of the answer\n")
    print("| configuration | median | min | max | CPU time to first byte (median) |")
    print("|---|---|---|---|---|")
    for name, ts in times.items():
        if not ts:
            print(f"| {name} | not installed | | | |")
            continue
        used = f"{statistics.median(cpu[name]):.2f} s" if cpu[name] else "-"
        print(f"| {name} | {statistics.median(ts):.2f} s | {min(ts):.2f} s | {max(ts):.2f} s | {used} |")
    phases = [phase_seconds() for _ in range(args.runs)]
    print("\nThe default start phase by phase (one fresh process per run, medians):\n")
    print("| phase | median |")
    print("|---|---|")
    for i, name in enumerate(PHASE_NAMES):
        print(f"| {name} | {statistics.median(p[i] for p in phases):.3f} s |")
    print(f"| sum | {statistics.median(sum(p) for p in phases):.3f} s |")


def phase_seconds() -> list[float]:
    out = subprocess.run([sys.executable, "-c", PHASES, QUESTION], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


if __name__ == "__main__":
    main()
