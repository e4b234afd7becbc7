"""The persistent sandboxed kernel behind the code interpreter: variables live on between cells as in
Jupyter, a cell's last expression is its result, errors and time limits stop the cell and not the
kernel, a kernel that ignores its limit or exits is replaced (and says so), and what a cell starts ends
with it."""

from __future__ import annotations

import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qwenkit.sandbox import _processes_of
from qwenkit.sandbox_kernel import GARBLED, CellResult, PythonKernel
from qwenkit.sandbox_scratch import sweep_stale
from qwenkit.tools.code_interpreter import CodeInterpreter, report


@pytest.fixture
def kernel():
    k = PythonKernel(memory_mb=256)
    yield k
    k.close()


def test_variables_live_on_and_the_last_expression_is_the_result(kernel):
    first = kernel.run("x = 41\nprint('set')")
    assert (first.stdout, first.result, first.error) == ("set\n", None, None)
    assert kernel.run("x + 1").result == "42"
    assert kernel.run("'text'").result == "'text'"  # repr, as IPython's text/plain
    assert kernel.run("print('only printed')").result is None  # None is no result
    assert kernel.run("def f(n):\n    return n * 2\nf(x)").result == "82"
    assert kernel.run("_").result == "82"  # IPython's last result


def test_an_error_stops_the_cell_not_the_kernel(kernel):
    kernel.run("x = 1")
    cell = kernel.run("y = 2\nz = x / 0\nw = 3")
    assert cell.error == "ZeroDivisionError: division by zero"
    assert cell.traceback.splitlines()[:3] == [
        "Traceback (most recent call last):",
        '  File "cell2", line 2, in <module>',
        "    z = x / 0",
    ]
    assert kernel.run("(x, y)").result == "(1, 2)"  # what ran before the error stays
    assert kernel.run("w").error == "NameError: name 'w' is not defined"
    syntax = kernel.run("x = = 2")
    assert syntax.error.splitlines()[-1] == "SyntaxError: invalid syntax" and syntax.traceback


def test_a_time_limit_stops_the_cell_and_keeps_the_variables(kernel):
    kernel.run("kept = 'yes'")
    cell = kernel.run("while True:\n    try:\n        pass\n    except Exception:\n        pass", timeout=0.5)
    assert (
        cell.timed_out and cell.stopped is None and cell.error is None
    )  # `except Exception` cannot catch it
    after = kernel.run("kept")
    assert after.result == "'yes'" and not after.restarted


def test_a_kernel_that_ignores_its_limit_or_exits_is_replaced_and_says_so(kernel):
    kernel.run("kept = 1")
    stubborn = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\nwhile True:\n    pass"
    cell = kernel.run(stubborn, timeout=0.5)
    assert cell.timed_out and cell.stopped == "timeout"
    fresh = kernel.run("kept")
    assert fresh.restarted and fresh.error == "NameError: name 'kept' is not defined"
    assert not kernel.run("1").restarted  # said once
    gone = kernel.run("import os\nos._exit(3)")
    assert gone.stopped == "the interpreter exited (status 3)" and not gone.timed_out
    assert kernel.run("2 + 2").result == "4"


def test_what_a_cell_starts_ends_with_it(kernel):
    bomb = kernel.run("import os\nwhile True:\n    os.fork()", timeout=5)
    assert bomb.error.startswith("BlockingIOError") and not bomb.stopped  # the process limit held
    kernel.run("import subprocess\nsubprocess.Popen(['sleep', '60'])")
    ps = kernel.run("import os\nsorted(int(p) for p in os.listdir('/proc') if p.isdigit())")
    assert ps.result == "[1]"  # the kernel alone, in its own PID namespace
    net = kernel.run("import socket\nsocket.create_connection(('1.1.1.1', 53), timeout=2)")
    assert net.error == "OSError: [Errno 101] Network is unreachable"
    assert kernel.isolation == ("rlimits", "netns", "pidns", "ipcns", "mountns", "uid")


def test_output_is_capped_per_cell(kernel):
    out = kernel.run("print('x' * 100_000)\nimport sys\nsys.stderr.write('e' * 5000 + 'END')", max_output=100)
    assert out.output_truncated and out.stdout == "x" * 100 and out.stderr == "e" * 97 + "END"
    small = kernel.run("print('ok')", max_output=100)  # each cell's output starts empty
    assert small.stdout == "ok\n" and not small.output_truncated and small.stderr == ""


def test_the_interpreter_speaks_as_qwen_agents(tmp_path):
    """The code interpreter's words are Qwen-Agent's (a fenced block per kind of output; its timeout
    sentence; "Finished execution."), with variables kept between calls; closing it ends the kernel and
    leaves a given directory's files."""
    tmp_path.chmod(0o755)
    mode = 0o755  # the directory's own, back once the interpreter is closed (it kept the run's 0700)
    ci = CodeInterpreter(timeout=1, workdir=tmp_path)
    assert ci("n = 6\nprint(n)") == "stdout:\n\n```\n6\n\n```"
    assert ci("n * 7") == "execute_result:\n\n```\n42\n```"
    assert ci("n = n + 1") == "Finished execution."
    assert ci("print('a')\nn / 0") == (
        "stdout:\n\n```\na\n\n```\n\nerror:\n\n```\nZeroDivisionError: division by zero\n\n```"
    )
    assert (
        ci("while True:\n    pass") == "error:\n\n```\nTimeout: Code execution exceeded the time limit.\n```"
    )
    assert ci("open('f.txt', 'w').write('hi')\nn") == "execute_result:\n\n```\n7\n```"
    pid = ci.kernel._proc.pid
    ci.close()
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    assert (tmp_path / "f.txt").read_text() == "hi"
    assert (tmp_path.stat().st_mode & 0o777, (tmp_path / "f.txt").stat().st_uid) == (mode, os.getuid())
    own = CodeInterpreter(timeout=1)
    workdir = own.workdir
    own("1")
    del own
    gc.collect()
    assert not workdir.exists()


def test_the_tool_spec_is_qwen_agents():
    """The prompt's tools block shows the spec Qwen-Agent registers (same words, same key order)."""
    import json

    from qwen_agent.tools.code_interpreter import CodeInterpreter as QwenAgentInterpreter

    from qwenkit.tools.code_interpreter import FUNCTION

    theirs = {
        "name": "code_interpreter",
        "description": QwenAgentInterpreter.description,
        "parameters": QwenAgentInterpreter.parameters,
    }
    assert json.dumps(FUNCTION) == json.dumps(theirs)


def test_a_cell_that_upsets_the_kernels_plumbing_leaves_it_running(kernel):
    """A cell may ignore SIGALRM (or time itself with its own handler), close or replace stdout, print past
    the file-size limit: the next cells still run in the same kernel, with their limit and their output."""
    kernel.run("kept = 'yes'")
    for deaf in (
        "signal.signal(signal.SIGALRM, signal.SIG_IGN)",
        "signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})",
    ):
        kernel.run(f"import signal\n{deaf}\nNone")
        loop = kernel.run("while True:\n    pass", timeout=0.5)
        assert loop.timed_out and loop.stopped is None, deaf  # the alarm, not the kill 2 seconds later
    for clumsy in (
        "import sys\nsys.stdout.close()",
        "import sys\nsys.stdout = None",
        "print('a' * 17 * 2**20)",
    ):
        kernel.run(clumsy, max_output=10)
        after = kernel.run("print(kept)")
        assert (after.stdout, after.stopped, after.restarted) == ("yes\n", None, False), clumsy
    forked = kernel.run(
        "import os\npid = os.fork()\nif pid == 0:\n    print('child')\nelse:\n    os.waitpid(pid, 0)"
    )
    assert forked.stdout == "child\n"  # the child's output was dropped with its unflushed buffer


def test_a_kernel_that_ended_between_cells_runs_the_next_in_a_fresh_one(kernel):
    kernel.run(
        "import os, threading, time\nthreading.Thread(target=lambda: (time.sleep(0.2), os._exit(0))).start()"
    )
    time.sleep(1)
    cell = kernel.run("6 * 7")  # it was answered "stopped: the interpreter exited" and never ran
    assert (cell.result, cell.restarted, cell.stopped) == ("42", True, None)
    crash = kernel.run("import ctypes\nctypes.string_at(0)")
    assert crash.stopped == "the interpreter was killed by SIGSEGV"  # was "exited (status -11)"


def test_a_cell_writing_into_the_reply_pipe_stops_the_kernel_not_the_caller(kernel):
    """The reply pipe is the kernel's: a forged line was taken as the cell's reply (and every later
    reply came one cell late), a line that is no JSON raised JSONDecodeError in the caller."""
    reply_fd = "import os, sys\nos.write(int(sys.argv[2]), {})\n'real'"
    forged = b'{"result": "forged", "error": null, "traceback": null, "timeout": false}\n'
    for line in (forged, b"garbage", b"x" * 2_000_000):
        kernel.run("kept = 1")
        cell = kernel.run(reply_fd.format(line), max_output=100)
        assert (cell.result, cell.stopped) == (None, GARBLED), line[:20]
        after = kernel.run("2 + 2")
        assert (after.result, after.restarted) == ("4", True)


def test_a_cell_interrupted_by_ctrl_c_does_not_answer_the_next(kernel):
    """Ctrl-C in `chat --code-interpreter` while a cell ran (the kernel, in its own session, never sees
    it): the cell went on, and its late reply was read as the next cell's, which came back "garbled"
    with the kernel killed after it had run. The interrupted kernel goes at once and says so."""
    assert kernel.run("kept = 1").error is None
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    with pytest.raises(KeyboardInterrupt):
        kernel.run("import time\ntime.sleep(5)\nprint('late')")
    timer.join()
    cell = kernel.run("print('next')\n'kept' in globals()")
    assert (cell.stdout, cell.result, cell.stopped, cell.restarted) == ("next\n", "False", None, True)
    assert kernel.run("print('and on')").stdout == "and on\n"


def test_results_and_errors_are_capped_and_valid_unicode(kernel):
    big = kernel.run("'x' * 50_000_000", max_output=100)  # took seconds to send, then a timeout killed it
    assert (big.result, big.output_truncated, big.stopped) == ("'" + "x" * 99, True, None)
    error = kernel.run("raise ValueError('é' * 100)", max_output=21)
    assert (error.error, error.output_truncated) == ("ValueError: éééé", True)  # 21 bytes: whole characters
    odd = kernel.run(
        "class A:\n    def __repr__(self):\n        return '\\udcff'\nraise ValueError('\\ud800')"
    )
    assert odd.error == "ValueError: \\ud800"  # a lone surrogate, which the tokenizer refuses, comes escaped
    assert kernel.run("A()").result == "\\udcff"


def test_the_words_are_byte_for_byte_what_qwen_agent_sends_the_model(tmp_path):
    """Qwen-Agent joins the kernel's messages: IPython (%xmode Minimal) ends the exception line with a
    newline, inside the fence (the error block lacked it), and a cell whose last line ends in ";" shows
    no result (it showed one). Expected texts: Qwen-Agent's _execute_code over IPython 8.12's messages."""
    ci = CodeInterpreter(timeout=5, workdir=tmp_path)
    assert ci("x = 41\nx / 0") == "error:\n\n```\nZeroDivisionError: division by zero\n\n```"
    assert ci("raise ValueError('multi\\nline')") == "error:\n\n```\nValueError: multi\nline\n\n```"
    assert ci("x;") == ci("x; ") == ci("1 if x else 2;  # c") == "Finished execution."
    assert ci("x  # comment") == "execute_result:\n\n```\n41\n```"
    assert ci("7;") == "Finished execution."
    assert ci("_") == "execute_result:\n\n```\n41\n```"  # a quiet cell leaves `_` as it was
    assert ci("print('a', end='')") == "stdout:\n\n```\na\n```"
    syntax = (
        "error:\n\n```\n  Cell In[10], line 1\n    x = = 2\n        ^\nSyntaxError: invalid syntax\n\n```"
    )
    assert ci("x = = 2") == syntax  # the place as IPython names it (was '  File "cell10", line 1')
    ci.close()


@pytest.mark.parametrize("cell", ["while True:\n    pass", "import time\ntime.sleep(600)"])
def test_a_kernel_whose_caller_was_killed_goes_too(cell):
    """A caller killed mid-cell (kill -9, the OOM killer) cannot close its kernel: one whose cell ignores
    its alarm ran on as the sandbox uid for up to its 24 hours of CPU (or for ever, asleep)."""
    stubborn = "import signal\nsignal.signal(signal.SIGALRM, signal.SIG_IGN)\n" + cell
    caller = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys\nfrom qwenkit.sandbox_kernel import PythonKernel\nk = PythonKernel(memory_mb=256)\n"
            "k.run('1')\nprint(k._uid, k.workdir, k._harness, flush=True)\n"
            f"k.run({stubborn!r}, timeout=60)",
        ],
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")},
    )
    uid, *left = caller.stdout.readline().decode().split()
    uid = int(uid)
    time.sleep(0.5)  # the cell is running
    assert _processes_of(uid)
    caller.kill()
    caller.wait()
    deadline = time.monotonic() + 5
    while _processes_of(uid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _processes_of(uid) == []
    # what a killed caller cannot remove, the next run sweeps (its scratch workdir and harness); a live
    # kernel's stay
    assert all(Path(p).exists() for p in left)
    assert sweep_stale() >= 1
    assert [p for p in left if Path(p).exists()] == []
    live = PythonKernel(memory_mb=256)
    live.run("1")
    sweep_stale()
    assert live.workdir.exists() and live._harness.exists() and live.run("2").result == "2"
    live.close()


def test_what_a_cell_defines_can_be_pickled_as_in_jupyter(kernel):
    """pickle finds a cell's functions and classes as __main__.name (Jupyter's namespace is __main__): a
    multiprocessing Pool over a cell's function failed with "attribute lookup f on __main__ failed"."""
    kernel.run(
        "def double(x):\n    return x * 2\nclass Point:\n    def __init__(self, x):\n        self.x = x"
    )
    pool = kernel.run(
        "from multiprocessing import Pool\nwith Pool(2) as p:\n    print(p.map(double, [1, 2, 3]))"
    )
    assert (pool.stdout, pool.error) == ("[2, 4, 6]\n", None)
    assert kernel.run("import pickle\npickle.loads(pickle.dumps(Point(7))).x").result == "7"
    assert kernel.run("__name__").result == "'__main__'"


def test_figures_are_shown_as_qwen_agent_shows_them(tmp_path, monkeypatch):
    """A figure the code shows, or leaves open, comes back as a PNG file in the work directory named as
    Qwen-Agent names it (``![fig-001](path)``), the figure as drawn; each show() starts a new figure (as
    in Jupyter's inline backend), a failing cell's figure is still shown, and a Python the code starts
    plots with matplotlib's default backend. A figure show() drew comes where it came in stdout, as in
    Qwen-Agent's output. Before, figures were never saved and show() warned."""
    import re

    import matplotlib

    matplotlib.use("agg")
    import matplotlib.image
    import matplotlib.pyplot as plt

    from qwenkit import sandbox_kernel

    # this venv's Python (with matplotlib) is out of the sandbox uid's reach here: run it as ourselves
    monkeypatch.setattr(sandbox_kernel, "_can_drop_privileges", lambda: False)
    ci = CodeInterpreter(timeout=30, workdir=tmp_path, python=sys.executable)
    figure = re.compile(r"!\[fig-(\d{3})\]\((.+)\)")

    def pixels(draw) -> list:
        plt.figure()
        draw()
        plt.savefig(tmp_path / "ours.png", format="png", bbox_inches="tight")
        plt.close("all")
        return matplotlib.image.imread(tmp_path / "ours.png").tolist()

    child = "import matplotlib.pyplot as p; p.plot([1]); p.savefig('child.png'); print(p.get_backend())"
    runs = (
        f"import subprocess, sys\nr = subprocess.run([sys.executable, '-c', {child!r}], capture_output=True)"
    )
    # a Python started before the kernel imported matplotlib: MPLBACKEND named a backend only it had
    out = ci(runs + "\nprint(r.stdout.decode(), r.stderr.decode()[-200:])")
    assert out == "stdout:\n\n```\nagg\n \n\n```" and (tmp_path / "child.png").exists()
    (tmp_path / "child.png").unlink()

    out = ci("import matplotlib.pyplot as plt\nprint('a')\nplt.plot([1, 3, 2])\nplt.show()\nprint('drawn')")
    ((_, path),) = figure.findall(out)
    # where show() drew it, between the prints, as Qwen-Agent's Jupyter messages come (it was last)
    assert out == f"stdout:\n\n```\na\n\n```\n\n![fig-001]({path})\n\nstdout:\n\n```\ndrawn\n\n```"
    assert Path(path).parent == tmp_path and Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.image.imread(path).tolist() == pixels(lambda: plt.plot([1, 3, 2]))

    out = ci("plt.plot([5, 4]); plt.show()\nplt.figure()\nplt.bar([0, 1], [2, 1]);")
    assert [n for n, _ in figure.findall(out)] == ["001", "002"] and out.startswith("![fig-001](")
    first, second = (matplotlib.image.imread(p).tolist() for _, p in figure.findall(out))
    assert first == pixels(lambda: plt.plot([5, 4]))  # a new figure: not drawn over the last cell's
    assert second == pixels(lambda: plt.bar([0, 1], [2, 1]))

    out = ci("plt.plot([1]); 1 / 0")
    assert out.startswith("error:\n\n```\nZeroDivisionError: division by zero\n\n```\n\n![fig-001](")
    assert ci("x = 1") == "Finished execution."  # shown figures are closed

    out = ci("for i in range(23):\n    plt.figure()")
    assert len(figure.findall(out)) == 20 and out.endswith("[3 more figures not saved: at most 20 a call]")

    out = ci(runs + "\nprint(r.stdout.decode())")
    assert out == "stdout:\n\n```\nagg\n\n\n```" and (tmp_path / "child.png").exists()
    ci.close()


def test_a_figure_past_the_kept_stdout_comes_after_what_was_kept():
    """show() after output cut at max_output: the figure follows the kept text, before stderr and the
    result; one left open comes after everything."""
    cell = CellResult(
        stdout="ab",
        stderr="warn\n",
        result="3",
        error=None,
        traceback=None,
        timed_out=False,
        output_truncated=True,
        figures=[Path("/w/1.png"), Path("/w/2.png"), Path("/w/3.png")],
        figures_at=[1, 9, None],
    )
    assert report(cell, 2) == (
        "stdout:\n\n```\na\n```\n\n![fig-001](/w/1.png)\n\nstdout:\n\n```\nb\n```\n\n![fig-002](/w/2.png)"
        "\n\nstderr:\n\n```\nwarn\n\n```\n\nexecute_result:\n\n```\n3\n```\n\n![fig-003](/w/3.png)"
        "\n\n[output cut at 2 bytes]"
    )


def test_a_cell_that_closes_or_redirects_the_output_descriptors_leaves_the_kernel_running(kernel):
    """``os.close(1)`` or ``os.dup2(devnull, 1)`` in a cell killed the kernel at the next flush or
    truncation (its own traceback in stderr, every variable lost) or hid every later cell's output: each
    cell now starts with descriptors 1 and 2 on the kernel's own output files again."""
    kernel.run("kept = 'yes'")
    for clumsy in (
        "import os\nos.close(1)\nprint('lost')",
        "import os\nos.close(2)",
        "import os\nos.dup2(os.open('/dev/null', os.O_WRONLY), 1)",
        "import os\nos.dup2(os.open('/dev/null', os.O_WRONLY), 2)",
        "import os\nos.close(1)\nos.close(2)",
    ):
        cell = kernel.run(clumsy)
        assert (cell.stopped, cell.error) == (None, None), clumsy
        after = kernel.run("import sys\nprint(kept)\nprint('err', file=sys.stderr)")
        assert (after.stdout, after.stderr, after.stopped, after.restarted) == ("yes\n", "err\n", None, False)


def test_a_hostile_cell_reaches_nothing_of_its_caller(kernel, monkeypatch):
    """The kernel is started after the caller set a secret and opened a TCP server on 127.0.0.1 and an
    abstract unix socket (abstract names belong to the network namespace): the cell finds neither, and
    cannot signal its caller (another PID namespace, another uid)."""
    monkeypatch.setenv("QWENKIT_TEST_API_KEY", "sk-hunter2")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    abstract = socket.socket(socket.AF_UNIX)
    name = f"\0qwenkit-test-{os.getpid()}"
    abstract.bind(name)
    abstract.listen(1)
    try:
        seen = kernel.run("import os\n[k for k in os.environ if 'KEY' in k], open('/proc/1/environ').read()")
        assert "sk-hunter2" not in seen.result and seen.result.startswith("([], 'HOME=")
        tcp = kernel.run(
            f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), 2)"
        )
        assert tcp.error == "OSError: [Errno 101] Network is unreachable"
        unix = kernel.run(f"s = socket.socket(socket.AF_UNIX)\ns.connect({name!r})")
        assert unix.error == "ConnectionRefusedError: [Errno 111] Connection refused"
        kill = kernel.run(f"import signal\nos.kill({os.getpid()}, signal.SIGTERM)")
        assert kill.error == "ProcessLookupError: [Errno 3] No such process"
        every = kernel.run("os.kill(-1, signal.SIGKILL)")  # no process it may signal but itself
        assert every.error == "ProcessLookupError: [Errno 3] No such process"
        assert kernel.run("os.listdir(os.path.expanduser('~root'))").error.startswith("PermissionError")
        assert (kernel.run("'still here'").result, kernel.run("1").restarted) == ("'still here'", False)
    finally:
        server.close()
        abstract.close()


@pytest.mark.skipif(os.geteuid() != 0, reason="finds the kernel by its uid")
def test_a_kernel_killed_from_outside_says_so(kernel):
    """The OOM killer's SIGKILL mid-cell read "the interpreter exited (status 1)", with unshare's
    "sigprocmask unblock failed: Invalid argument" as the cell's stderr."""
    kernel.run("kept = 1")
    uid = kernel._uid
    killer = threading.Timer(1.0, lambda: [os.kill(p, signal.SIGKILL) for p in _processes_of(uid)])
    killer.start()
    cell = kernel.run("import sys, time\nprint('started', file=sys.stderr, flush=True)\ntime.sleep(8)")
    killer.join()
    assert (cell.stopped, cell.stderr, cell.timed_out) == (
        "the interpreter was killed by SIGKILL",
        "started\n",
        False,
    )
    after = kernel.run("'kept' in globals()")
    assert (after.result, after.restarted) == ("False", True)


def test_each_cell_prints_to_the_model_whatever_an_earlier_one_did_to_sys_stdout(kernel):
    """A cell that set ``sys.stdout`` (or ``sys.stderr``) to a StringIO hid every later cell's output,
    and what it had printed before the swap stayed in the kernel's unflushed buffer: each cell now starts
    with the kernel's own streams, which are flushed at its end (the StringIO keeps what went to it)."""
    swap = kernel.run(
        "import io, sys\nprint('before')\ncaught = io.StringIO()\nsys.stdout = caught\nprint('caught')\n"
        "print('warn', file=sys.stderr)\nsys.stderr = io.StringIO()\nprint('hidden', file=sys.stderr)"
    )
    assert (swap.stdout, swap.stderr) == ("before\n", "warn\n")
    after = kernel.run("print('next')\nprint('err', file=sys.stderr)\ncaught.getvalue()")
    assert (after.stdout, after.stderr, after.result) == ("next\n", "err\n", "'caught\\n'")
    assert kernel.run("sys.stdout = open('log.txt', 'w')\nprint('to the file')").stdout == ""
    assert kernel.run("print(open('log.txt').read(), end='')").stdout == "to the file\n"


def test_escape_sequences_leave_the_error_block_and_stay_in_the_output_blocks(tmp_path):
    """Qwen-Agent strips ANSI escape sequences from the error it sends the model (IPython colours its
    tracebacks), not from the cell's streams: an exception whose message held colour codes passed them on."""
    ci = CodeInterpreter(timeout=5, workdir=tmp_path)
    coloured = "raise ValueError('\\x1b[1;31mbad\\x1b[0m \\x1b]0;title\\x07value\\x1b(B')"
    assert ci(coloured) == "error:\n\n```\nValueError: bad value\n\n```"
    streams = ci("import sys\nprint('\\x1b[1mbold\\x1b[0m')\nprint('\\x1b[33mwarn', file=sys.stderr)")
    assert streams == "stdout:\n\n```\n\x1b[1mbold\x1b[0m\n\n```\n\nstderr:\n\n```\n\x1b[33mwarn\n\n```"
    assert ci("'\\x1b[31m'") == "execute_result:\n\n```\n'\\x1b[31m'\n```"  # a repr has no escape in it
    ci.close()
    linked = "E: \x1b]8;;https://x\x1b\\link\x1b]8;;\x1b\\ \x9b1mé\x85\x1bc\x1b]open\nnext"
    cell = CellResult("", "", None, linked, None, timed_out=False, output_truncated=False)
    assert report(cell, 100) == "error:\n\n```\nE: link é\x85\nnext\n\n```"  # a lone C1 stays
