"""Start one process per shard on this machine (what `--tensor-parallel N` does; torchrun does the same
across machines). The parent only watches: if a rank fails or dies, the others are stopped and the error
names the rank, so nothing is left half-started or waiting forever on a collective."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch.distributed as dist
import torch.multiprocessing as mp

from qwenkit.distributed.group import DEFAULT_TIMEOUT_S, TensorParallel, init_tensor_parallel, on_rank_lost
from qwenkit.errors import QwenkitError
from qwenkit.sigterm import terminate_unwinds

# The exit status of a rank that left because a collective failed (another rank died): the launcher
# names the rank that died, not the ones that stopped because of it.
LOST_STATUS = 4


class RankFailedError(QwenkitError):
    """A tensor-parallel rank exited with an error (or was killed). ``detail`` is the rank's own error
    (a QwenkitError it raised), which the message then is: every rank loading the same broken file fails
    alike, and the user reads that once, as a single process would say it."""

    def __init__(self, message: str, rank: int, exitcode: int, detail: str | None = None) -> None:
        super().__init__(message)
        self.rank, self.exitcode, self.detail = rank, exitcode, detail


class _RankErrors:
    """The ranks' own errors, each sent up a pipe of its own as the rank fails (ranks print none). Pipes,
    not a multiprocessing queue: a queue's locks are semaphores, which a launcher ended by ``os._exit``
    leaves to the resource tracker's leak warning."""

    def __init__(self, ctx, ranks: range) -> None:
        ends = {rank: ctx.Pipe(duplex=False) for rank in ranks}
        self._readers = {rank: reader for rank, (reader, _) in ends.items()}
        self.writers = {rank: writer for rank, (_, writer) in ends.items()}
        self._seen: dict[int, str] = {}
        self._lock = threading.Lock()

    def seen(self) -> dict[int, str]:
        with self._lock:
            for rank, reader in self._readers.items():
                with contextlib.suppress(EOFError, OSError):
                    if rank not in self._seen and reader.poll():
                        self._seen[rank] = reader.recv()
            return dict(self._seen)


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
    errors: Any,
) -> None:
    _die_with_launcher()
    # A terminal's Ctrl-C reaches every rank as well as the launcher: the launcher decides (it stops the
    # ranks, or rank 0 leads them), so a rank neither prints its own KeyboardInterrupt traceback nor dies
    # before the launcher has acted.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    on_rank_lost(_leave_quietly)
    share_cores(world, device)
    tp = init_tensor_parallel(world, rank, device, f"tcp://127.0.0.1:{port}", timeout_s, local_world=world)
    try:
        fn(tp, *args)
    except QwenkitError as e:  # the launcher says it, once for every rank that failed alike
        errors.send(str(e)[:8000])  # well inside a pipe's buffer: the send never waits for a reader
        raise SystemExit(2) from None
    finally:
        dist.destroy_process_group()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity mask: a container's or taskset's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def share_cores(world: int, device: str) -> None:
    """On the CPU, give each of this machine's ``world`` ranks its share of the cores: torch would start
    a thread per core in every rank, ``world`` threads to a core, whose OpenMP teams then wait for cores
    (threads past the free cores took one process from 12.3 to 2.4 tokens/s: the README's
    tensor-parallel table). OMP_NUM_THREADS, where set, is the user's choice and stays."""
    import torch

    if device == "cpu" and not os.environ.get("OMP_NUM_THREADS"):
        torch.set_num_threads(max(1, usable_cores() // world))


@contextlib.contextmanager
def _starting_ranks() -> Iterator[None]:
    """Start ranks that ignore SIGINT from their first instruction: a terminal's Ctrl-C reaches the whole
    process group, and a rank still importing torch (seconds) before ``_rank_main`` ignores it printed
    its KeyboardInterrupt traceback into the terminal. An ignored signal stays ignored across exec, and
    Python then installs no handler of its own. A SIGTERM meanwhile waits until every rank has been
    sent what it starts with: one that cut that short left the rank to print an EOFError traceback.
    (This process misses a Ctrl-C only while it forks.)"""
    if threading.current_thread() is not threading.main_thread():  # only there can handlers change
        yield
        return
    pending: list[Any] = []
    previous_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, lambda _signum, frame: pending.append(frame))
    try:
        yield
    finally:
        if previous_int is not None:  # None: a handler set outside Python, which cannot be put back
            signal.signal(signal.SIGINT, previous_int)
        signal.signal(signal.SIGTERM, previous_term if previous_term is not None else signal.SIG_DFL)
        if pending:  # now as it would have been then
            signal.raise_signal(signal.SIGTERM)


def _die_with_launcher() -> None:
    """Have the kernel kill this rank when the process that started it dies (Linux), however it dies:
    a launcher stopped by SIGTERM or SIGKILL must not leave a rank generating on, or one waiting
    forever for forwards. Also keep tqdm off a multiprocessing lock: a rank killed while holding that
    semaphore makes the launcher's resource tracker print a leak warning after the one-line error."""
    from tqdm import tqdm

    tqdm.set_lock(threading.RLock())
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the launcher's own clean-up still stops the ranks
        return
    parent = mp.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the line above
        os._exit(LOST_STATUS)


def _leave_quietly() -> None:
    """A collective failed (another rank died): end this rank now, what it printed so far flushed, and
    let the launcher name the rank that died."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe, a closed devnull
            stream.flush()
    os._exit(LOST_STATUS)


def describe_exit(code: int) -> str:
    """How a rank ended, for the one line that names it."""
    if code == LOST_STATUS:
        return "lost the other ranks (a collective failed or timed out)"
    return f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"


def _failure(
    procs: dict[int, Any],
    world: int,
    errors: _RankErrors,
    first: RankFailedError | None = None,
) -> RankFailedError | None:
    """The error naming the rank that failed in its own right (``first``'s, the one seen first, unless it
    only left because another died: such a rank exits LOST_STATUS and is named only if no other
    failed), or None while none has failed. A rank's own error is the message: as it is where rank 0
    failed alike, else under the rank's number."""
    failed = [(rank, p.exitcode) for rank, p in procs.items() if p.exitcode not in (None, 0)]
    if not failed:
        return None
    own = [(rank, code) for rank, code in failed if code != LOST_STATUS]
    if first is not None and first.exitcode != LOST_STATUS:
        own = [(first.rank, first.exitcode)]
    rank, code = (own or failed)[0]
    details = errors.seen()
    detail = details.get(rank)
    if detail is not None and detail == details.get(0):
        return RankFailedError(detail, 0, code, detail)
    if detail is not None:
        return RankFailedError(f"tensor-parallel rank {rank} of {world}: {detail}", rank, code, detail)
    others = [r for r, _ in failed if r != rank]
    also = f" (then rank(s) {', '.join(map(str, others))} stopped too)" if others else ""
    return RankFailedError(f"tensor-parallel rank {rank} of {world} {describe_exit(code)}{also}", rank, code)


def run_ranks(
    fn: Callable[..., Any],
    world: int,
    args: tuple[Any, ...] = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """Run ``fn(TensorParallel, *args)`` in ``world`` new processes (spawned, so CUDA is safe) and wait.
    ``fn`` must be importable by name; a QwenkitError it raises is the RankFailedError's message.
    Raises RankFailedError naming the first rank that failed."""
    ctx = mp.get_context("spawn")
    port, errors = free_port(), _RankErrors(ctx, range(world))
    procs = [
        ctx.Process(
            target=_rank_main,
            args=(r, world, port, device, timeout_s, fn, args, errors.writers[r]),
            daemon=True,
        )
        for r in range(world)
    ]
    ranks, first = dict(enumerate(procs)), None
    # SIGTERM unwinds the wait, so the ranks are stopped below and the command exits 143. Its default
    # action did that only outside a PID namespace: a container's PID 1 never gets a signal it has no
    # handler for, and the ranks generated on to the end (`docker stop` waited for its SIGKILL).
    try:
        with _starting_ranks():
            for p in procs:
                p.start()
        with terminate_unwinds():
            while any(p.is_alive() for p in procs) and (first := _failure(ranks, world, errors)) is None:
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
    failure = _failure(ranks, world, errors, first)
    if failure is not None:
        raise failure


def lead_ranks(
    lead: Callable[[TensorParallel], Any],
    follow: Callable[..., Any],
    world: int,
    args: tuple[Any, ...] = (),
    device: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    on_follower_failed: Callable[[RankFailedError], None] | None = None,
) -> Any:
    """Be rank 0 in this process (it keeps the terminal, stdin and the signals a user or a container
    runtime sends) and run ``follow(tp, *args)`` in ``world - 1`` spawned processes; returns what
    ``lead(tp)`` returns. A collective that fails because a follower died raises RankFailedError naming
    it. ``on_follower_failed(error)`` is called (from a watcher thread) as soon as a follower dies, for
    a leader that would otherwise only notice at its next collective (an idle server); it is not called
    once ``lead`` has failed itself (a load error every rank meets is then said once, by the leader).
    Followers still running at the end are given one collective timeout to leave, then stopped."""
    ctx = mp.get_context("spawn")
    port, errors = free_port(), _RankErrors(ctx, range(1, world))
    procs = {
        r: ctx.Process(
            target=_rank_main,
            args=(r, world, port, device, timeout_s, follow, args, errors.writers[r]),
            daemon=True,
        )
        for r in range(1, world)
    }
    finished, done = False, threading.Event()
    report = _Once(on_follower_failed)
    if on_follower_failed is not None:
        threading.Thread(target=_watch, args=(procs, errors, done, report), daemon=True).start()
        # A forward that fails because a follower died: report that follower before the error reaches
        # the thread that ran the forward (an answer being streamed).
        on_rank_lost(lambda: _report_lost(procs, errors, report))
    try:
        with _starting_ranks():
            for p in procs.values():
                p.start()
        share_cores(world, device)
        tp = init_tensor_parallel(world, 0, device, f"tcp://127.0.0.1:{port}", timeout_s, local_world=world)
        try:
            result = lead(tp)
            finished = True
            return result
        finally:
            dist.destroy_process_group()
    except RuntimeError:  # a collective failed: say which follower is gone, if one is
        report.claim()
        time.sleep(0.5)  # let a dying follower's exit status arrive
        failure = _failure(procs, world, errors)
        if failure is not None:
            raise failure from None
        raise
    except BaseException:
        report.claim()  # the leader's own error is the one said; a follower failing alike says nothing
        raise
    finally:
        done.set()
        on_rank_lost(None)
        # Released followers leave at once; after an error here, nobody is left to release them.
        deadline = time.monotonic() + (timeout_s if finished else 0)
        for p in procs.values():
            p.join(max(deadline - time.monotonic(), 0))
            if p.is_alive():
                p.kill()
                p.join()


class _Once:
    """``fn(error)`` run on the first report only (the watcher and a failed forward may both report),
    and on none once the leader has claimed the failure as its own. ``claim`` waits for a report under
    way: one that ends the process (a chat's) must not be printed beside the leader's."""

    def __init__(self, fn: Callable[[RankFailedError], None] | None) -> None:
        self.fn, self.lock, self.done = fn, threading.RLock(), False

    def __call__(self, error: RankFailedError) -> None:
        with self.lock:
            if self.done or self.fn is None:
                return
            self.done = True
            self.fn(error)

    def claim(self) -> None:
        with self.lock:
            self.done = True


def _report_lost(procs: dict[int, Any], errors: _RankErrors, report: _Once, wait_s: float = 2.0) -> None:
    """A collective of the leader failed: wait a moment for the follower that died to be seen dead,
    then report it (nothing if none died: a follower that stopped answering is the timeout's error)."""
    deadline = time.monotonic() + wait_s
    while (failure := _failure(procs, len(procs) + 1, errors)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    if failure is not None:
        report(failure)


def _watch(procs: dict[int, Any], errors: _RankErrors, done: threading.Event, report: _Once) -> None:
    """Report once, when a follower exits with an error while the leader runs."""
    while not done.wait(0.1):
        failure = _failure(procs, len(procs) + 1, errors)
        if failure is not None:
            report(failure)
            return


__all__ = ["RankFailedError", "TensorParallel", "lead_ranks", "run_ranks"]
