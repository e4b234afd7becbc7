"""Start one process per shard on this machine (what `--tensor-parallel N` does; torchrun does the same
across machines). The parent only watches: if a rank fails or dies, the others are stopped and the error
names the rank, so nothing is left half-started or waiting forever on a collective."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from qwenkit.distributed.group import DEFAULT_TIMEOUT_S, TensorParallel, init_tensor_parallel
from qwenkit.errors import QwenkitError


class RankFailedError(QwenkitError):
    """A tensor-parallel rank exited with an error (or was killed)."""

    def __init__(self, message: str, rank: int, exitcode: int) -> None:
        super().__init__(message)
        self.rank, self.exitcode = rank, exitcode


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(
    rank: int,
    world: int,
    port: int,
    device: str,
    timeout_s: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
) -> None:
    tp = init_tensor_parallel(
        world, rank, device=device, init_method=f"tcp://127.0.0.1:{port}", timeout_s=timeout_s
    )
    try:
        fn(tp, *args)
    finally:
        dist.destroy_process_group()


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple[Any, ...] = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Run ``fn(TensorParallel, *args)`` in ``world`` new processes (spawned, so CUDA is safe) and wait.
    ``fn`` must be importable by name. Raises RankFailedError naming the first rank that failed."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [
        ctx.Process(target=_rank_main, args=(r, world, port, device, timeout_s, fn, args), daemon=True)
        for r in range(world)
    ]
    for p in procs:
        p.start()
    first_failed = None
    try:
        while any(p.is_alive() for p in procs):
            failed = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if failed:
                first_failed = failed[0]
                break
            time.sleep(0.05)
        # The others get one collective timeout to notice and exit with their own error.
        deadline = time.monotonic() + timeout_s + 5
        for p in procs:
            p.join(max(deadline - time.monotonic(), 0))
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    if failed:
        rank = first_failed if first_failed is not None else failed[0]
        code = procs[rank].exitcode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
        others = [r for r in failed if r != rank]
        also = f" (then rank(s) {', '.join(map(str, others))} stopped too)" if others else ""
        raise RankFailedError(f"tensor-parallel rank {rank} of {world} {how}{also}", rank, code)


def lead_ranks(
    lead: Callable[[TensorParallel], Any],
    follow: Callable[..., Any],
    world: int,
    args: tuple[Any, ...] = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_follower_failed: Callable[[int, int], None] | None = None,
) -> Any:
    """Be rank 0 in this process (it keeps the terminal, stdin and the signals a user or a container
    runtime sends) and run ``follow(tp, *args)`` in ``world - 1`` spawned processes; returns what
    ``lead(tp)`` returns. A collective that fails because a follower died raises RankFailedError naming
    it. ``on_follower_failed(rank, exitcode)`` is called (from a watcher thread) as soon as a follower
    dies, for a leader that would otherwise only notice at its next collective (an idle server).
    Followers still running at the end are given one collective timeout to leave, then stopped."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = {
        r: ctx.Process(target=_rank_main, args=(r, world, port, device, timeout_s, follow, args), daemon=True)
        for r in range(1, world)
    }
    for p in procs.values():
        p.start()
    finished, done = False, threading.Event()
    if on_follower_failed is not None:
        threading.Thread(target=_watch, args=(procs, done, on_follower_failed), daemon=True).start()
    try:
        tp = init_tensor_parallel(
            world, 0, device=device, init_method=f"tcp://127.0.0.1:{port}", timeout_s=timeout_s
        )
        try:
            result = lead(tp)
            finished = True
            return result
        finally:
            dist.destroy_process_group()
    except RuntimeError:  # a collective failed: say which follower is gone, if one is
        time.sleep(0.5)  # let a dying follower's exit status arrive
        for rank, p in procs.items():
            if p.exitcode not in (None, 0):
                code = p.exitcode
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                raise RankFailedError(f"tensor-parallel rank {rank} of {world} {how}", rank, code) from None
        raise
    finally:
        done.set()
        # Released followers leave at once; after an error here, nobody is left to release them.
        deadline = time.monotonic() + (timeout_s if finished else 0)
        for p in procs.values():
            p.join(max(deadline - time.monotonic(), 0))
            if p.is_alive():
                p.kill()
                p.join()


def _watch(procs: dict[int, Any], done: threading.Event, on_failed: Callable[[int, int], None]) -> None:
    """Call ``on_failed(rank, exitcode)`` once, when a follower exits with an error while the leader runs."""
    while not done.wait(0.1):
        failed = [(rank, p.exitcode) for rank, p in procs.items() if p.exitcode not in (None, 0)]
        if failed:
            on_failed(*failed[0])
            return


__all__ = ["RankFailedError", "TensorParallel", "lead_ranks", "run_ranks"]
