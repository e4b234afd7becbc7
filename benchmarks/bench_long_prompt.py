"""How long a short chat request waits behind a long prompt on `qwenkit serve` (not a test).

One server on the bundled model (or MODEL); a completion with a long prompt is sent, and ``--delay``
seconds later a 5-token chat request: the table gives the short request's latency and when the long
one finished, per round. A step computes at most 512 tokens, decoding rows first; while a request
waits for a row, a prompt takes at most half the step (engine/scheduler.py).

    .venv/bin/python benchmarks/bench_long_prompt.py [MODEL] [--prompt-words 6000] [--delay 2] [--rounds 2]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from serve_process import ManagedServer, free_port  # benchmarks/, beside this script


def one_round(url: str, words: int, delay: float) -> tuple[float, float]:
    """(seconds the short request took, seconds from the long one's start to its end)."""
    start = time.perf_counter()
    finished: list[float] = []

    def long_prompt() -> None:
        body = {"prompt": "world " * words, "max_tokens": 2}
        httpx.post(url + "/v1/completions", json=body, timeout=600).raise_for_status()
        finished.append(time.perf_counter() - start)

    thread = threading.Thread(target=long_prompt)
    thread.start()
    time.sleep(delay)
    sent = time.perf_counter()
    body = {"messages": [{"role": "user", "content": "Name a color."}], "max_tokens": 5, "temperature": 0}
    httpx.post(url + "/v1/chat/completions", json=body, timeout=600).raise_for_status()
    short = time.perf_counter() - sent
    thread.join()
    return short, finished[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", nargs="?", help="default: the bundled model")
    ap.add_argument("--prompt-words", type=int, default=6000, help="'world ' repeated: one token each")
    ap.add_argument("--delay", type=float, default=2.0, help="seconds between the long and the short request")
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    port = free_port()
    argv = [sys.executable, "-m", "qwenkit.cli", "serve", *([args.model] if args.model else [])]
    argv += ["--port", str(port), "--response-cache", "0", "--no-prefix-caching"]
    with tempfile.TemporaryDirectory() as logs:
        server = ManagedServer("qwenkit", argv, port, Path(logs) / "serve.log")
        server.start()
        try:
            when = time.strftime("%Y-%m-%d %H:%M")
            print(f"{when}: a {args.prompt_words}-token prompt, the chat request {args.delay:g} s after it\n")
            print("| round | short request (s) | long prompt done at (s) |\n|---:|---:|---:|")
            for r in range(args.rounds):
                short, long_done = one_round(server.base_url, args.prompt_words, args.delay)
                print(f"| {r + 1} | {short:.1f} | {long_done:.1f} |", flush=True)
        finally:
            server.stop()


if __name__ == "__main__":
    main()
