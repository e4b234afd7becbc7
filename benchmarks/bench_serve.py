"""Serving benchmark: `qwenkit serve` side by side with llama.cpp's `llama-server`, same GGUF, same run.

The shape of vLLM's `benchmark_serving` / `vllm bench serve` (metric definitions in serve_client.py):
closed loops of 1, 4 and 16 concurrent users, open-loop Poisson arrivals at several request rates, and
a shared-prefix workload with prefix caching on and off. Every request streams a chat completion with a
fixed output length (`ignore_eos`, greedy) and `stream_options.include_usage`. The script starts each
server itself on 127.0.0.1, alternates servers load by load and round by round (other processes share
this machine's cores), and prints medians over the rounds as markdown tables.

Prompts are slices of CPython's pydoc topics text (real English and code, shipped with Python), cut to
exact token counts with the model's own tokenizer; every request of the whole run is distinct, so no
cache serves a repeat between rounds, and both servers get the same requests in each round.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import random
import shlex
import signal
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from serve_client import RunSummary, run_load, summarize
from serve_process import ManagedServer, ServerFailed, free_port

BUILD_HELP = """\
llama-server is not installed by qwenkit; build it once (37 min on 2 busy cores here) from the llama.cpp
sources vendored in the llama-cpp-python sdist, outside the repository:

  mkdir -p /work/peers/llama && cd /work/peers/llama
  pip download --no-binary :all: --no-deps llama-cpp-python==0.3.36 -d .
  tar xzf llama_cpp_python-0.3.36.tar.gz
  cmake -S llama_cpp_python-0.3.36/vendor/llama.cpp -B build -G Ninja -DCMAKE_BUILD_TYPE=Release \\
        -DGGML_NATIVE=ON -DLLAMA_BUILD_SERVER=ON -DLLAMA_USE_PREBUILT_UI=OFF \\
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF
  cmake --build build -j2 --target llama-server

then pass --llama-server /work/peers/llama/build/bin/llama-server.
"""

MODEL_NAME = "bench"  # both servers answer to this model name
QWENKIT = "qwenkit"
LLAMA = "llama-server"


@dataclass(frozen=True)
class Load:
    """One load shape: Poisson ``rate`` req/s (None: all at once) with at most ``concurrency`` in flight."""

    label: str
    prompts: int
    rate: float | None = None
    concurrency: int | None = None


@dataclass(frozen=True)
class Target:
    """A server (process) plus the request fields that select an arm, e.g. llama's ``cache_prompt``."""

    server: str
    arm: str
    process: ManagedServer
    extra_body: dict[str, Any]


class Corpus:
    """Token-exact text slices of CPython's pydoc topics, drawn with a seeded generator."""

    def __init__(self, model_path: Path) -> None:
        from pydoc_data.topics import topics

        from qwenkit.generate import tokenizer_for

        self.tokenizer = tokenizer_for(model_path)
        text = "\n\n".join(topics[key] for key in sorted(topics))
        self.ids = self.tokenizer.encode_plain(text)

    def text(self, rng: random.Random, tokens: int) -> str:
        start = rng.randrange(0, len(self.ids) - tokens)
        return self.tokenizer.decode(self.ids[start : start + tokens]).strip()


def chat_payload(messages: list[dict[str, str]], output_len: int, extra: dict[str, Any]) -> dict[str, Any]:
    """What `vllm bench serve --backend openai-chat --ignore-eos --temperature 0` sends."""
    return {
        "model": MODEL_NAME,
        "messages": messages,
        "max_completion_tokens": output_len,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
        **extra,
    }


def build_servers(args: argparse.Namespace, logs: Path) -> dict[tuple[str, str], Target]:
    """Every (server, arm) target; arm "cache" is the server as configured, "no-cache" turns prefix
    caching off (qwenkit: a second process with --no-prefix-caching; llama-server: cache_prompt false)."""
    model = str(args.model)
    # Each of the --slots rows gets room for the longest request, on both servers.
    per_slot = args.shared_prefix + max(args.input_len, args.question_len) + args.output_len + 128
    targets: dict[tuple[str, str], Target] = {}
    if QWENKIT in args.servers:
        for arm, flags in (("cache", []), ("no-cache", ["--no-prefix-caching"])):
            if arm == "no-cache" and not args.shared_prefix:
                continue
            port = free_port()
            argv = [
                *shlex.split(args.qwenkit),
                "serve",
                model,
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--served-model-name",
                MODEL_NAME,
                "--max-batch",
                str(args.slots),
                "--max-model-len",
                str(per_slot),
                *flags,
                *shlex.split(args.qwenkit_args),
            ]
            env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}  # torch's intra-op threads
            proc = ManagedServer(f"{QWENKIT} ({arm})", argv, port, logs / f"qwenkit-{arm}.log", env)
            targets[QWENKIT, arm] = Target(QWENKIT, arm, proc, {})
    if LLAMA in args.servers:
        port = free_port()
        argv = [
            str(args.llama_server),
            "-m",
            model,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "-t",
            str(args.threads),
            "-tb",
            str(args.threads),
            "-np",
            str(args.slots),
            "-c",
            str(args.slots * per_slot),
            "--alias",
            MODEL_NAME,
            *shlex.split(args.llama_args),
        ]
        proc = ManagedServer(LLAMA, argv, port, logs / "llama-server.log")
        targets[LLAMA, "cache"] = Target(LLAMA, "cache", proc, {})
        targets[LLAMA, "no-cache"] = Target(LLAMA, "no-cache", proc, {"cache_prompt": False})
    return targets


def run(target: Target, payloads: list[dict[str, Any]], load: Load, seed: int) -> RunSummary:
    url = f"{target.process.base_url}/v1/chat/completions"
    payloads = [{**p, **target.extra_body} for p in payloads]
    results, duration = asyncio.run(
        run_load(url, payloads, rate=load.rate, concurrency=load.concurrency, seed=seed)
    )
    return summarize(results, duration)


def warm_up(target: Target, corpus: Corpus, rng: random.Random) -> None:
    """One short request, as vLLM's initial test run: first-call costs stay out of the figures."""
    payload = chat_payload([{"role": "user", "content": corpus.text(rng, 16)}], 4, {})
    summary = run(target, [payload], Load("warm-up", 1), 0)
    if summary.failed:
        raise ServerFailed(f"{target.process.name} failed its warm-up request: {summary.errors[0]}")


def loads_of(args: argparse.Namespace) -> list[Load]:
    loads = [
        Load(f"c={c}", max(args.min_prompts, args.prompts_per_user * c), concurrency=c)
        for c in args.concurrency
    ]
    loads += [Load(f"Poisson {r:g} req/s", args.poisson_prompts, rate=r) for r in args.request_rates]
    return loads


def median_summary(runs: list[RunSummary]) -> dict[str, float]:
    """Median over rounds of each headline figure."""

    def med(get) -> float:
        return statistics.median(get(r) for r in runs)

    return {
        "req/s": med(lambda r: r.request_throughput),
        "out tok/s": med(lambda r: r.output_throughput),
        "TTFT p50": med(lambda r: r.ttft_ms["p50"]),
        "TTFT p99": med(lambda r: r.ttft_ms["p99"]),
        "TPOT p50": med(lambda r: r.tpot_ms["p50"]),
        "TPOT p99": med(lambda r: r.tpot_ms["p99"]),
        "ITL p50": med(lambda r: r.itl_ms["p50"]),
        "ITL p99": med(lambda r: r.itl_ms["p99"]),
        "prompt tok": med(lambda r: r.mean_prompt_tokens),
        "out tok": med(lambda r: r.mean_output_tokens),
        "cached tok": med(lambda r: r.mean_cached_tokens),
        "failed": sum(r.failed for r in runs),
    }


def print_tables(
    args: argparse.Namespace,
    loads: list[Load],
    results: dict[tuple[str, str, str], list[RunSummary]],
    targets: dict[tuple[str, str], Target],
) -> None:
    servers = [s for s in (QWENKIT, LLAMA) if s in args.servers]
    rounds = max((len(v) for v in results.values()), default=0)
    print(
        f"\n### Load sweep: {args.input_len} prompt tokens (+ chat template), {args.output_len} output tokens"
    )
    print(f"median of {rounds} rounds; times in ms; TTFT = first chunk with text, TPOT from usage\n")
    cols = ["req/s", "out tok/s", "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99"]
    print("| load | server | " + " | ".join(cols) + " | failed |")
    print("|---|---|" + "---:|" * (len(cols) + 1))
    medians: dict[tuple[str, str], dict[str, float]] = {}
    for load in loads:
        for server in servers:
            runs = results.get((load.label, server, "cache"))
            if not runs:
                continue
            m = medians[load.label, server] = median_summary(runs)
            cells = [f"{m[c]:.2f}" if c == "req/s" else f"{m[c]:.1f}" for c in cols]
            print(f"| {load.label} | {server} | " + " | ".join(cells) + f" | {m['failed']} |")

    prefix_rows = {}
    if args.shared_prefix:
        print(
            f"\n### Shared {args.shared_prefix}-token system prompt, {args.question_len}-token questions, "
            f"{args.prefix_output_len} output tokens, 1 user; prefix caching off and on\n"
        )
        print(
            "| server | prompt tokens | TTFT p50 off | TTFT p50 on | TTFT speed-up "
            "| cached tokens reported (on) | failed |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|")
        for server in servers:
            off, on = (results.get(("shared prefix", server, arm)) for arm in ("no-cache", "cache"))
            if not off or not on:
                continue
            m_off, m_on = median_summary(off), median_summary(on)
            speedup = m_off["TTFT p50"] / m_on["TTFT p50"]
            prefix_rows[server] = speedup
            print(
                f"| {server} | {m_on['prompt tok']:.0f} | {m_off['TTFT p50']:.0f} | {m_on['TTFT p50']:.0f} "
                f"| {speedup:.1f}x | {m_on['cached tok']:.0f} | {m_off['failed'] + m_on['failed']} |"
            )

    print("\n### Servers\n\n| server | startup s | RSS after the run |\n|---|---:|---:|")
    for target in {id(t.process): t for t in targets.values()}.values():
        proc = target.process
        print(f"| {proc.name} | {proc.startup_s:.1f} | {proc.rss_bytes() / 2**20:.0f} MiB |")

    top = f"c={max(args.concurrency)}" if args.concurrency else None
    if (top, QWENKIT) in medians and (top, LLAMA) in medians:
        q, ll = medians[top, QWENKIT], medians[top, LLAMA]
        tput_ok = q["out tok/s"] >= ll["out tok/s"]
        ttft_ok = q["TTFT p50"] <= ll["TTFT p50"]
        print(f"\n### Targets\n\n- {top} output tokens/s: qwenkit {q['out tok/s']:.1f} vs llama-server")
        print(f"  {ll['out tok/s']:.1f} (target: >=): {'met' if tput_ok else 'NOT met'}")
        print(f"- {top} TTFT p50: qwenkit {q['TTFT p50']:.0f} ms vs llama-server {ll['TTFT p50']:.0f} ms")
        print(f"  (target: <=): {'met' if ttft_ok else 'NOT met'}")
    if QWENKIT in prefix_rows:
        ok = prefix_rows[QWENKIT] >= 5.0
        print(
            f"- prefix caching TTFT speed-up: qwenkit {prefix_rows[QWENKIT]:.1f}x"
            + (f" (llama-server {prefix_rows[LLAMA]:.1f}x)" if LLAMA in prefix_rows else "")
            + f" (target: >= 5x): {'met' if ok else 'NOT met'}"
        )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=BUILD_HELP, formatter_class=argparse.RawTextHelpFormatter
    )
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    parser.add_argument("--model", type=Path, help="GGUF both servers load (default: the bundled SmolLM2)")
    parser.add_argument("--servers", default=f"{QWENKIT},{LLAMA}", type=lambda s: s.split(","))
    parser.add_argument("--llama-server", type=Path, help="path of the llama-server binary (see below)")
    parser.add_argument(
        "--qwenkit",
        default=f"{shlex.quote(sys.executable)} -m qwenkit.cli",
        help="command that runs the qwenkit CLI (default: this interpreter)",
    )
    parser.add_argument("--qwenkit-args", default="", help="extra `qwenkit serve` flags, one string")
    parser.add_argument("--llama-args", default="", help="extra llama-server flags, one string")
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 2,
        help="compute threads of each server (llama-server -t/-tb; qwenkit OMP_NUM_THREADS)",
    )
    parser.add_argument("--slots", type=int, default=16, help="llama-server -np, qwenkit --max-batch")
    parser.add_argument("--input-len", type=int, default=128, help="prompt tokens (user message)")
    parser.add_argument("--output-len", type=int, default=64, help="output tokens (ignore_eos)")
    parser.add_argument("--concurrency", type=ints, default=[1, 4, 16], help="closed-loop user counts")
    parser.add_argument("--prompts-per-user", type=int, default=2, help="requests per user, closed loop")
    parser.add_argument("--min-prompts", type=int, default=4)
    parser.add_argument("--request-rates", type=floats, default=[1.0, 2.0, 4.0], help="Poisson req/s")
    parser.add_argument("--poisson-prompts", type=int, default=16, help="requests per Poisson run")
    parser.add_argument(
        "--shared-prefix", type=int, default=1000, help="system prompt tokens shared by all (0: skip)"
    )
    parser.add_argument("--question-len", type=int, default=32, help="user tokens after the shared prefix")
    parser.add_argument("--prefix-output-len", type=int, default=16)
    parser.add_argument("--prefix-prompts", type=int, default=6, help="measured requests per arm")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians are reported")
    parser.add_argument("--budget-min", type=float, default=15.0, help="start no new round after this")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, help="write every round's figures as JSON here")
    args = parser.parse_args(argv)
    unknown = set(args.servers) - {QWENKIT, LLAMA}
    if unknown:
        parser.error(f"unknown server {sorted(unknown)}; choose from {QWENKIT},{LLAMA}")
    if LLAMA in args.servers and (args.llama_server is None or not args.llama_server.is_file()):
        parser.error("llama-server needs --llama-server PATH to a built binary (see the build steps below)")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # unwind, so the servers get stopped
    if args.model is None:
        from qwenkit.default_model import default_model_path

        args.model = default_model_path()
    began = time.perf_counter()
    corpus = Corpus(args.model)
    loads = loads_of(args)
    results: dict[tuple[str, str, str], list[RunSummary]] = {}
    log_dir = Path(tempfile.mkdtemp(prefix="bench_serve_"))
    targets = build_servers(args, log_dir)
    print(f"# bench_serve {datetime.date.today()}  model: {args.model}")
    print(f"command: {' '.join(shlex.quote(a) for a in [sys.argv[0], *(argv or sys.argv[1:])])}")
    print(f"server logs: {log_dir}")
    with contextlib.ExitStack() as stack:
        for target in {id(t.process): t for t in targets.values()}.values():
            stack.callback(target.process.stop)
            target.process.start()
            print(f"started {target.process.name}: {shlex.join(target.process.argv)}", flush=True)
        for target in targets.values():
            if target.arm == "cache":
                warm_up(target, corpus, random.Random(args.seed))
        for target in {id(t.process): t for t in targets.values()}.values():
            cpu = target.process.cpu_seconds()
            time.sleep(2.0)
            idle = (target.process.cpu_seconds() - cpu) / 2.0
            print(f"{target.process.name}: {idle:.0%} of a core while idle", flush=True)

        for round_no in range(args.rounds):
            if round_no and time.perf_counter() - began > args.budget_min * 60:
                print(f"time budget spent: stopping after {round_no} rounds")
                break
            order = [s for s in (QWENKIT, LLAMA) if s in args.servers]
            if round_no % 2:
                order.reverse()
            print(f"round {round_no + 1}: load average {os.getloadavg()[0]:.1f}, order {order}", flush=True)
            for load_no, load in enumerate(loads):
                rng = random.Random(f"{args.seed}/{round_no}/{load_no}")
                payloads = [
                    chat_payload(
                        [{"role": "user", "content": corpus.text(rng, args.input_len)}], args.output_len, {}
                    )
                    for _ in range(load.prompts)
                ]
                for server in order:
                    summary = run(targets[server, "cache"], payloads, load, args.seed + round_no)
                    results.setdefault((load.label, server, "cache"), []).append(summary)
                    print(
                        f"  {load.label:>18} {server:>12}: {summary.output_throughput:6.1f} tok/s, "
                        f"TTFT p50 {summary.ttft_ms['p50']:7.0f} ms, "
                        f"TPOT p50 {summary.tpot_ms['p50']:6.1f} ms, "
                        f"{summary.tokens_per_chunk:.2f} tok/chunk, "
                        f"failed {summary.failed} {summary.errors[:1]}",
                        flush=True,
                    )
            if args.shared_prefix:
                run_shared_prefix(args, corpus, targets, order, round_no, results)
        print_tables(args, loads, results, targets)
    if args.save:
        flat = [
            {"load": load, "server": server, "arm": arm, "round": i, **asdict(summary)}
            for (load, server, arm), runs in results.items()
            for i, summary in enumerate(runs)
        ]
        args.save.write_text(json.dumps(flat, indent=1))


def run_shared_prefix(
    args: argparse.Namespace,
    corpus: Corpus,
    targets: dict[tuple[str, str], Target],
    order: list[str],
    round_no: int,
    results: dict[tuple[str, str, str], list[RunSummary]],
) -> None:
    """One user sends questions behind the same long system prompt, with caching off, then on. A first
    request fills the cache and is not measured."""
    rng = random.Random(f"{args.seed}/{round_no}/prefix")
    system = corpus.text(rng, args.shared_prefix)

    def questions() -> list[dict[str, Any]]:
        # Fresh questions per arm: llama-server keeps each finished prompt in a slot, so repeating the
        # off arm's questions would let the on arm reuse whole prompts, not just the shared prefix.
        return [
            chat_payload(
                [
                    {"role": "system", "content": system},
                    {"role": "user", "content": corpus.text(rng, args.question_len)},
                ],
                args.prefix_output_len,
                {},
            )
            for _ in range(args.prefix_prompts + 1)
        ]

    arms = {arm: questions() for arm in ("no-cache", "cache")}
    load = Load("shared prefix", args.prefix_prompts, concurrency=1)
    for server in order:
        for arm, payloads in arms.items():
            target = targets[server, arm]
            run(target, payloads[:1], load, 0)  # fills the cache (or, with caching off, warms the path)
            summary = run(target, payloads[1:], load, 0)
            results.setdefault(("shared prefix", server, arm), []).append(summary)
            print(
                f"  {'shared prefix':>18} {server:>12} {arm:>8}: TTFT p50 {summary.ttft_ms['p50']:7.0f} ms, "
                f"prompt {summary.mean_prompt_tokens:.0f} tok, cached {summary.mean_cached_tokens:.0f}, "
                f"failed {summary.failed} {summary.errors[:1]}",
                flush=True,
            )


if __name__ == "__main__":
    main()
