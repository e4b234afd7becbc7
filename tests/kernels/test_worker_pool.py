"""The kernels' own worker threads (``WorkerPool`` in csrc/worker_pool.h): outside the process's main thread
(the engine's driver thread, in which ``chat`` and ``serve`` step a model) the ops split their work over
them instead of OpenMP. Results must not depend on which thread calls, nor on two threads calling at
once (the second runs its loop serially), and a forked child must get working threads of its own."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from qwenkit import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels not built on this CPU")


def _case(seed: int):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (4096, 1024), dtype=torch.uint8, generator=g)
    packed = kernels.prepare_int4(codes, torch.rand(1024 // 128, 4096, generator=g) * 0.01, None, 128, 8)
    x = torch.randn(16, 1024, generator=g).bfloat16()
    logits = torch.randn(16, 50_000, generator=g)
    return packed, x, logits


def _run(packed, x, logits):
    return kernels.linear_int4(x, packed), kernels.argmax(logits), kernels.finite_rows(logits)


def _in_thread(fn, *args):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(*args)))
    thread.start()
    thread.join()
    return out[0]


def test_ops_from_another_thread_equal_the_main_threads():
    case = _case(0)
    main = _run(*case)
    other = _in_thread(_run, *case)
    for a, b in zip(main, other, strict=True):
        assert torch.equal(a, b)
    assert (
        _in_thread(lambda: [torch.equal(a, b) for a, b in zip(_run(*case), main, strict=True)]) == [True] * 3
    )


def test_threads_calling_at_once_get_their_own_results():
    cases = [_case(seed) for seed in range(4)]
    want = [_run(*case) for case in cases]
    got: dict[int, list] = {}

    def work(i: int) -> None:
        got[i] = [_run(*cases[i]) for _ in range(5)]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(4):
        for result in got[i]:
            assert all(torch.equal(a, b) for a, b in zip(result, want[i], strict=True))


def test_a_forked_child_gets_threads_of_its_own():
    case = _case(1)
    want = _in_thread(_run, *case)  # the pool has started its threads in this process
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: none of the parent's threads exist here
        signal.alarm(120)  # a child stuck waiting for threads that do not exist dies, and the test fails
        try:
            ok = _in_thread(lambda: all(torch.equal(a, b) for a, b in zip(_run(*case), want, strict=True)))
            os.write(write, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    assert os.read(read, 1) == b"1" and status == 0


def _rows_alone_and_together(scales: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """A log-sum-exp of 16 rows in one call (rows spread over the threads) and of each row alone (on the
    calling thread), under the calling thread's floating-point mode."""
    g = torch.Generator().manual_seed(2000)
    x = (torch.randn(16, 2000, generator=g) * 4).bfloat16().float()
    together = kernels.logsumexp(x, scales)
    alone = torch.cat([kernels.logsumexp(x[r : r + 1], scales[r : r + 1]) for r in range(16)])
    return together, alone


@pytest.mark.parametrize("where", ["main thread (OpenMP)", "another thread (the kernels' pool)"])
def test_a_row_alone_equals_the_row_in_a_batch_in_any_rounding_mode(where):
    """A row's result is the same computed alone (on the calling thread) and in a batch (its rows spread
    over the threads): the compiler must not contract the two paths' arithmetic differently (it did:
    -ffp-contract=off now), and every chunk runs in the caller's floating-point mode, which the threads
    started without (here rounding toward zero, set by fesetround after they exist)."""
    import ctypes

    libm = ctypes.CDLL("libm.so.6")
    toward_zero = 0xC00  # FE_TOWARDZERO on x86-64
    scales = [1 / (0.2 + 0.1 * i) for i in range(16)]
    _rows_alone_and_together(scales)  # the threads exist, in the default mode

    def check() -> tuple[bool, bool, bool]:
        default, default_alone = _rows_alone_and_together(scales)
        libm.fesetround(toward_zero)
        try:
            together, alone = _rows_alone_and_together(scales)
        finally:
            libm.fesetround(0)
        return (
            torch.equal(default, default_alone),
            torch.equal(together, alone),
            torch.equal(together, default),
        )

    default_same, toward_zero_same, mode_ignored = check() if where.startswith("main") else _in_thread(check)
    assert default_same
    assert toward_zero_same
    assert not mode_ignored  # the mode did change the sums, so the check above could have failed
