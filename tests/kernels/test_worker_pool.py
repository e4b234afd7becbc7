"""The kernels' own worker threads (``WorkerPool`` in cpu_kernels.cpp): outside the process's main thread
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
