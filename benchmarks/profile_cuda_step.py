"""Where a CUDA decode step's time goes: the Qwen2.5-7B shape (fused q/k/v and gate/up), batch 1.

Three figures, to choose the next lever for batch-1 decode on a GPU:
- the engine's whole step (graphs on) against the replay of its CUDA graph alone, so the host's share of
  a step (packing inputs, sampling, Python) is apart from the GPU's;
- the GPU kernels of one static step (run eagerly under torch.profiler): how many, and the time of each
  kind, matrix products apart from the rest;
- the bandwidth floor: weight bytes over the device copy bandwidth measured in the same run.

    PYTHONPATH=src python3 benchmarks/profile_cuda_step.py                     # CUDA, about 1 minute
    PYTHONPATH=src .venv/bin/python benchmarks/profile_cuda_step.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402
from bench_cuda_decode import TINY, build_model, decode_bytes, fused_copy, measure_bandwidth, sync  # noqa: E402
from shapes import QWEN25_7B  # noqa: E402

from qwenkit.engine import Engine, SamplingParams  # noqa: E402

MATMUL_MARKS = (
    "gemm",
    "gemv",
    "cutlass",
    "sm90_xmma",
    "splitk",
    "nvjet",
    "aten::linear",
)  # CUDA kernels, CPU op


def decode_engine(model, graphs: bool, prompt_len: int) -> Engine:
    """An engine with one greedy request past its prefill, ready to decode."""
    engine = Engine(model, max_batch_size=1, max_seq_len=prompt_len + 512, cuda_graphs=graphs)
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    engine.add_request([(i * 17 + 1) % model.config.vocab_size for i in range(prompt_len)], params)
    for _ in range(4):  # prefill, then a few decode steps (the capture happens in the first)
        engine.step()
    return engine


def step_times(engine: Engine, steps: int) -> list[float]:
    """Wall seconds of each ``engine.step`` (it returns host tokens, so each step ends synchronized)."""
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - t)
    return times


def replay_times(engine: Engine, steps: int) -> list[float]:
    """Seconds of replaying the captured batch-1 graph alone (CUDA events), no host work between."""
    graphs = engine.decode_graphs
    if graphs is None or not graphs.graphs:
        return []
    graph, _ = next(iter(graphs.graphs.values()))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(steps):
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
    return times


def kernel_table(model, prompt_len: int, device: torch.device) -> list[tuple[str, int, float]]:
    """(kernel name, launches per step, GPU ms per step) for the static step run eagerly; on a CPU, the
    outermost aten operators and their host time instead."""
    engine = Engine(model, max_batch_size=1, max_seq_len=prompt_len + 512, cuda_graphs=True)
    if engine.decode_graphs is not None:
        engine.decode_graphs.capture = False
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    engine.add_request([(i * 17 + 1) % model.config.vocab_size for i in range(prompt_len)], params)
    for _ in range(4):
        engine.step()
    steps = 5
    activity = torch.profiler.ProfilerActivity
    with torch.profiler.profile(activities=[activity.CPU, activity.CUDA]) as prof:
        for _ in range(steps):
            engine.step()
        sync(device)
    counts: dict[str, int] = defaultdict(int)
    micros: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if device.type == "cuda":
            if event.device_type != torch.autograd.DeviceType.CUDA:
                continue
            spent = event.device_time
        else:  # on a CPU: the outermost aten operators, timed on the host
            parent = event.cpu_parent
            if not event.name.startswith("aten::") or (
                parent is not None and parent.name.startswith("aten::")
            ):
                continue
            spent = event.cpu_time_total
        counts[event.name] += 1
        micros[event.name] += spent
    return sorted(
        ((name, counts[name] // steps, micros[name] / steps / 1000) for name in counts),
        key=lambda row: -row[2],
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--steps", type=int, default=100)
    args = ap.parse_args()
    device = torch.device(args.device)
    shape = TINY if args.tiny else QWEN25_7B
    model = fused_copy(build_model(shape, torch.bfloat16, device))
    weights = decode_bytes(model)
    bandwidth = measure_bandwidth(device, (1 << 30) if device.type == "cuda" else (64 << 20))
    floor_ms = 1000 * weights / bandwidth
    print(
        f"weights read per step {weights / 1e9:.2f} GB; copy bandwidth {bandwidth / 1e9:.0f} GB/s; "
        f"floor {floor_ms:.2f} ms/step ({1000 / floor_ms:.0f} tokens/s)"
    )

    if device.type == "cuda":
        engine = decode_engine(model, graphs=True, prompt_len=args.prompt_len)
        whole = statistics.median(step_times(engine, args.steps)) * 1000
        replay = statistics.median(replay_times(engine, args.steps)) * 1000
        print(
            f"engine step, graphs on: {whole:.2f} ms ({1000 / whole:.1f} tokens/s); graph replay alone: "
            f"{replay:.2f} ms ({1000 / replay:.1f} tokens/s); host share {whole - replay:.2f} ms"
        )
        del engine

    rows = kernel_table(model, args.prompt_len, device)
    total = sum(ms for _, _, ms in rows)
    launches = sum(n for _, n, _ in rows)
    matmul = [r for r in rows if any(mark in r[0].lower() for mark in MATMUL_MARKS)]
    mm_ms, mm_n = sum(r[2] for r in matmul), sum(r[1] for r in matmul)
    unit, clock = ("kernels", "GPU time") if device.type == "cuda" else ("operators", "host time")
    print(
        f"static step run eagerly: {launches} {unit}, {total:.2f} ms of {clock}; matrix products "
        f"{mm_n} {unit} {mm_ms:.2f} ms; the other {launches - mm_n} {unit} {total - mm_ms:.2f} ms"
    )
    print("| kernel | launches/step | ms/step |\n|---|---:|---:|")
    for name, n, ms in rows[:30]:
        print(f"| {name[:110]} | {n} | {ms:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
