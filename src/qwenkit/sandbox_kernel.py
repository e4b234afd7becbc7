"""A persistent sandboxed Python: cells run one after another in one process and share their variables,
as in the Jupyter kernel behind Qwen-Agent's code interpreter (the tool Qwen's models learned to use).

The process is isolated exactly as ``qwenkit.sandbox.run_python``'s (rlimits, network/PID/mount
namespaces, its own uid, a scrubbed environment). Each cell gets a time limit, enforced inside the
kernel (an alarm: the cell stops and its variables stay) and, should the cell not yield to it (a long C
call), by killing the kernel ``KILL_GRACE`` seconds later; the next cell then starts a fresh one and says
so. As in IPython, the value of a cell's last expression is its result (``repr``), and an uncaught error
is reported from the cell's own frames. Unlike Jupyter, processes a cell starts end with the cell (the
kernel is its PID namespace's init and kills the rest), so a fork bomb or a forgotten server cannot
outlive it.

Cells and replies travel over two pipes (one JSON line each way, the reply echoing the request's random
id); the cell's stdout and stderr go to files the kernel empties at each cell's start, read here with the
sandbox's caps, and the result and error are capped to the same bytes in the kernel. The cell runs in the
kernel's process, so it can reach the reply pipe: a reply that does not answer the request (a forged or
garbled line) ends the kernel as a timeout does. A kernel that ended between cells (a thread of the last
one called ``os._exit``) is replaced before the next cell, which says so.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import select
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from qwenkit.sandbox import (
    _can_drop_privileges,
    _child_env,
    _command,
    _kill_uid,
    _lend_workdir,
    _read_capped,
    _release_uid,
    _return_workdir,
    _run_uid,
    _status_under_unshare,
)
from qwenkit.sandbox_scratch import claim_harness

FIGURE_NAME = re.compile(r"[0-9a-f]{32}\.png")  # a figure file the kernel wrote (uuid4().hex)
KILL_GRACE = 2.0  # seconds past a cell's limit before a kernel that ignores its alarm is killed
TIMEOUT_MESSAGE = "Timeout: Code execution exceeded the time limit."  # Qwen-Agent's words
GARBLED = "its reply was garbled (the cell wrote into the kernel's reply pipe)"

# The kernel loop. A cell's time limit is an alarm raising _CellTimeout, a BaseException so that a cell's
# own `except Exception` does not swallow it; its handler is set (and the signal unblocked) again before
# each cell (a cell may set its own), and the alarm is off before anything is reported. Errors are
# reported from the cell's frames (tb_next skips the loop's), with source lines from linecache (cells
# have no file). The reply echoes the request's id and its texts are valid UTF-8 of at most max_output
# bytes each. Each cell starts with the kernel's own sys.stdout and sys.stderr, whatever an earlier one
# put there (in Jupyter a StringIO left there hides every later cell's output, which the model cannot tell
# from silence); at each flush one the cell put there is flushed too, the kernel's own is opened afresh
# where it was closed or could not flush (past the file-size limit), and descriptors 1 and 2 (closed, or
# redirected by dup2) are set to the output files again, so that the kernel lives on. A caller that dies
# without closing it (SIGKILL) hangs up the request pipe, which raises SIGIO: the kernel leaves then, even
# in the middle of a cell that ignores its alarm (as ipykernel's parent poller).
_KERNEL = """\
import os, sys
def _kernel(fd_in, fd_out):
    import ast, fcntl, importlib.machinery, importlib.util, io, json, linecache, select, signal, tokenize
    import traceback, uuid
    requests, replies = os.fdopen(fd_in, "rb"), os.fdopen(fd_out, "wb")
    MAX_FIGURES, FIGURE_BACKEND = 20, "qwenkit_figures"  # figures saved per cell; the rest are counted
    main_module = type(sys)("__main__")  # the cells' namespace is __main__, as in IPython: pickle (and
    main_module.__builtins__ = __builtins__  # so multiprocessing) finds what they define by that name
    sys.modules["__main__"], namespace = main_module, main_module.__dict__
    class _CellTimeout(BaseException):
        pass
    def _alarm(signum, frame):
        raise _CellTimeout()
    saved = {1: os.dup(1), 2: os.dup(2)}  # the output files, for a cell that closes or redirects 1 or 2
    own = {"stdout": sys.stdout, "stderr": sys.stderr}  # the streams each cell starts with
    def _flush():
        for name, fd in (("stdout", 1), ("stderr", 2)):
            os.dup2(saved[fd], fd)
            current = getattr(sys, name)
            if current is not own[name]:
                try:  # the cell's own (a StringIO, os.fdopen(1, "w")); its timeout still stops the cell
                    current.flush()
                except _CellTimeout:
                    raise
                except BaseException:
                    pass
            try:
                own[name].flush()
            except _CellTimeout:
                raise
            except BaseException:
                broken, own[name] = own[name], open(fd, "w", encoding="utf-8", closefd=False)
                if current is broken:
                    setattr(sys, name, own[name])
    def _text(text, limit, keep_end=False):
        data = text.encode("utf-8", "backslashreplace")  # a lone surrogate is no UTF-8: shown escaped
        if len(data) <= limit:
            return data.decode(), False
        return (data[-limit:] if keep_end else data[:limit]).decode("utf-8", "ignore"), True
    def _quiet(source):  # IPython: a cell ending in ";" shows no result
        try:
            tokens = list(tokenize.generate_tokens(io.StringIO(source).readline))
        except (SyntaxError, tokenize.TokenError):
            return False
        skip = (tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL, tokenize.COMMENT)
        last = [t for t in tokens if t.type not in skip][-1:]
        return bool(last) and last[0].type == tokenize.OP and last[0].string == ";"
    def _orphaned(signum, frame):  # the caller died (its end of the request pipe is closed): so do we
        hangup = select.poll()
        hangup.register(fd_in, 0)
        if hangup.poll(0):
            os._exit(0)
    signal.signal(signal.SIGIO, _orphaned)  # before the first: its default is to terminate
    fcntl.fcntl(fd_in, fcntl.F_SETOWN, os.getpid())
    fcntl.fcntl(fd_in, fcntl.F_SETFL, fcntl.fcntl(fd_in, fcntl.F_GETFL) | os.O_ASYNC)
    main, workdir, figures = os.getpid(), os.getcwd(), {"saved": [], "at": [], "unsaved": 0}
    def _show(*args, _at_end=False, **kwargs):  # the cells' pyplot.show(): each open figure to a PNG
        pyplot = sys.modules.get("matplotlib.pyplot")  # file, then closed
        if pyplot is None or os.getpid() != main:
            return
        at = None  # where in stdout (its bytes so far) the figures came; None: after everything
        if not _at_end:
            _flush()
            at = os.fstat(1).st_size
        try:
            for number in pyplot.get_fignums():
                if len(figures["saved"]) == MAX_FIGURES:
                    figures["unsaved"] += 1
                    continue
                name = uuid.uuid4().hex + ".png"
                pyplot.figure(number).savefig(os.path.join(workdir, name), format="png", bbox_inches="tight")
                figures["saved"].append(name)
                figures["at"].append(at)
        finally:
            pyplot.close("all")
    class _ThenFigures:  # matplotlib's own loader, which then picks the figure backend (no MPLBACKEND:
        def __init__(self, loader):  # a Python a cell starts would inherit it and find no such backend)
            self.loader = loader
        def __getattr__(self, name):
            return getattr(self.loader, name)
        def create_module(self, spec):
            return self.loader.create_module(spec)
        def exec_module(self, module):
            self.loader.exec_module(module)
            module.use("module://" + FIGURE_BACKEND)
    class _FigureBackend:  # the backend matplotlib is given: Agg's canvas, with _show as its show()
        @staticmethod
        def find_spec(name, path=None, target=None):
            if name == "matplotlib":
                spec = importlib.machinery.PathFinder.find_spec(name, path)
                if spec is not None and spec.loader is not None:
                    spec.loader = _ThenFigures(spec.loader)
                return spec
            return importlib.util.spec_from_loader(name, _FigureBackend) if name == FIGURE_BACKEND else None
        @staticmethod
        def create_module(spec):
            return None
        @staticmethod
        def exec_module(module):
            from matplotlib.backends import backend_agg
            module.FigureCanvas, module.show = backend_agg.FigureCanvasAgg, _show
            module.backend_version = backend_agg.backend_version
    sys.meta_path.insert(0, _FigureBackend)
    for n, line in enumerate(requests, 1):
        cell = json.loads(line)
        limit = cell["max_output"]
        _flush()
        sys.stdout, sys.stderr = own["stdout"], own["stderr"]
        for fd in (1, 2):
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, 0)
        name, source = f"cell{n}", cell["code"]
        linecache.cache[name] = (len(source), None, source.splitlines(True), name)
        reply = {"id": cell["id"], "timeout": False, "cut": False}
        result = error = None
        figures["saved"], figures["at"], figures["unsaved"] = [], [], 0
        signal.signal(signal.SIGALRM, _alarm)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM, signal.SIGIO})
        try:
            try:
                signal.setitimer(signal.ITIMER_REAL, cell["timeout"])
                tree = ast.parse(source, name)
                last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
                try:
                    exec(compile(tree, name, "exec"), namespace)
                    if last is not None:
                        value = eval(compile(ast.Expression(last.value), name, "eval"), namespace)
                        if value is not None and not _quiet(source):
                            namespace["_"] = value
                            result = repr(value)
                except BaseException:  # figures left open are shown at the cell's end, as Jupyter's
                    try:  # inline backend shows them; the cell's own error is the one reported
                        _show(_at_end=True)
                    except Exception:
                        pass
                    raise
                _show(_at_end=True)
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
        except _CellTimeout:
            reply["timeout"] = True
        except BaseException as e:
            error = e
        if os.getpid() != main:  # a process the cell forked: its output stays, it never answers
            _flush()
            os._exit(0)
        signal.signal(signal.SIGIO, _orphaned)  # a cell may have set its own (the next request raises it)
        reply["figures"], reply["figures_at"] = figures["saved"], figures["at"]
        reply["unsaved_figures"] = figures["unsaved"]
        texts = {"result": result, "error": None, "traceback": None}
        if error is not None:
            try:
                tb = error.__traceback__.tb_next if error.__traceback__ is not None else None
                texts["error"] = "".join(traceback.format_exception_only(type(error), error)).rstrip("\\n")
                if isinstance(error, SyntaxError) and error.filename == name:  # IPython's words for where
                    place = f'  File "{name}", line'
                    texts["error"] = texts["error"].replace(place, f"  Cell In[{n}], line", 1)
                texts["traceback"] = "".join(traceback.format_exception(type(error), error, tb))
            except BaseException:  # no memory left to format it, or a __str__ that fails
                texts["error"] = texts["traceback"] = type(error).__name__
            del error
        for key, text in texts.items():
            if text is not None:
                text, cut = _text(text, limit, keep_end=key == "traceback")
                reply["cut"] = reply["cut"] or (cut and key != "traceback")  # the traceback is not shown
            reply[key] = text
        del texts, result
        _flush()
        if main == 1:  # the PID namespace's init: what the cell started dies with the cell
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:  # there was none
                pass
            while True:  # every one reaped (orphans come to init): none is left when the reply goes
                try:
                    os.waitpid(-1, 0)
                except ChildProcessError:
                    break
        replies.write((json.dumps(reply, ensure_ascii=False) + "\\n").encode())
        replies.flush()
_kernel(int(sys.argv[1]), int(sys.argv[2]))
"""


@dataclass
class CellResult:
    stdout: str
    stderr: str
    result: str | None  # repr of the last expression's value (None: no value)
    error: str | None  # the exception line(s), as IPython's minimal mode shows them
    traceback: str | None  # the whole traceback from the cell's frames, as python prints it
    timed_out: bool
    output_truncated: bool
    stopped: str | None = None  # the kernel ended during the cell (killed, exited): why, in a few words
    restarted: bool = False  # a fresh kernel ran this cell: earlier cells' variables are gone
    figures: list[Path] = field(default_factory=list)  # matplotlib figures the cell showed, as PNG files
    unsaved_figures: int = 0  # figures past MAX_FIGURES, closed without a file
    # where each figure came in ``stdout``, as its characters before it (a show() between two prints);
    # None: shown at the cell's end, after every output
    figures_at: list[int | None] = field(default_factory=list)


class PythonKernel:
    """Cells in one sandboxed process that keeps their variables. Files persist in ``workdir`` (a scratch
    directory of the kernel's own, removed with it, when none is given). ``close()`` (or garbage
    collection, or exit) ends the process."""

    def __init__(
        self,
        *,
        memory_mb: int = 1024,
        workdir: Path | None = None,
        max_file_mb: int = 16,
        max_processes: int = 32,
        python: str | None = None,
    ) -> None:
        self.memory_mb, self.max_file_mb, self.max_processes = memory_mb, max_file_mb, max_processes
        self.python = python
        self.own_workdir = workdir is None
        self.workdir = Path(tempfile.mkdtemp(prefix="qwenkit-kernel-")) if workdir is None else Path(workdir)
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._died = False  # a kernel ended: the next cell says its variables are gone
        self.isolation: tuple[str, ...] = ()

    # ---- lifecycle --------------------------------------------------------------------------------

    def _start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        # 0700, ours: the kernel cannot read it; swept with a scratch workdir if our process is killed
        self._claimed = claim_harness(self.workdir if self.own_workdir else None)
        self._harness = self._claimed.path
        self._uid = _run_uid() if _can_drop_privileges() else None
        self._mode = _lend_workdir(self.workdir, self._uid) if self._uid is not None else None
        self._out_path, self._err_path = self._harness / "stdout", self._harness / "stderr"
        cell_r, self._cells = os.pipe()
        self._replies, reply_w = os.pipe()
        try:
            argv, self.isolation = _command(
                self.python,
                self._uid,
                (cell_r, reply_w),
                bootstrap=_KERNEL,
                memory_mb=self.memory_mb,
                cpu_seconds=24 * 3600,  # per process, over all its cells: the time limits are per cell
                max_file_mb=self.max_file_mb,
                max_processes=self.max_processes,
            )
            with open(self._out_path, "wb") as out, open(self._err_path, "wb") as err:
                self._proc = subprocess.Popen(
                    argv,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    cwd=self.workdir,
                    env=_child_env(self.workdir.resolve()),
                    pass_fds=(cell_r, reply_w),
                    start_new_session=True,
                )
        finally:
            for fd in (cell_r, reply_w):
                os.close(fd)
        os.set_blocking(self._cells, False)
        self._pending = bytearray()
        self._ended, self._exit = False, None  # _end's: the kernel was killed, and its exit status

    def _stop(self) -> int | None:
        """Kill the kernel and everything it started; its exit status."""
        code = self._end()
        self._release()
        return code

    def _end(self) -> int | None:
        """Kill the kernel and everything it started; its exit status (its output files are still
        there: ``_release`` removes them)."""
        if self._proc is None:
            return None
        if not self._ended:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            self._exit = _status_under_unshare(self._proc.wait(), self._err_path)
            self._ended = True
            if self._uid is not None:
                _kill_uid(self._uid)
        return self._exit

    def _release(self) -> None:
        """After ``_end``: the pipes, the harness and the uid go, and a caller's directory comes back."""
        if self._proc is None:
            return
        self._proc = None
        for fd in (self._cells, self._replies):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._claimed.release()
        if self._uid is not None:
            if not self.own_workdir and self._mode is not None:
                _return_workdir(self.workdir, self._mode)
            _release_uid(self._uid)

    def close(self) -> None:
        with self._lock:
            self._stop()
            if self.own_workdir:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    # ---- cells ------------------------------------------------------------------------------------

    def run(self, code: str, *, timeout: float = 30.0, max_output: int = 8_000) -> CellResult:
        """Run one cell; stdout keeps its first ``max_output`` bytes, stderr its last (the error is last),
        and the result and the error their first."""
        with self._lock:
            restarted = self._died
            if self._proc is not None and self._proc.poll() is not None:  # ended between cells
                self._stop()
                restarted = True
            if self._proc is None:
                self._start()
            self._died = False
            request = {"id": secrets.token_hex(8), "code": code, "timeout": timeout, "max_output": max_output}
            try:
                reply, stopped = self._exchange(
                    request, timeout + KILL_GRACE, reply_limit=18 * max_output + 65536
                )
            except BaseException:  # Ctrl-C while the cell ran: its reply would answer the next cell
                self._stop()
                self._died = True
                raise
            status = self._end() if stopped is not None else None  # before reading: unshare's words go
            stdout, out_cut = _read_capped(self._out_path, max_output)
            stderr, err_cut = _read_capped(self._err_path, max_output, keep_end=True)
            if stopped is not None:
                self._release()
                if stopped == "exited":
                    stopped = _ended(status)
                self._died = True
            reply = reply or {}
            figures, unsaved, figures_at = self._figures(reply, stdout)
            return CellResult(
                stdout=stdout,
                stderr=stderr,
                result=reply.get("result"),
                error=reply.get("error"),
                traceback=reply.get("traceback"),
                timed_out=bool(reply.get("timeout")) or stopped == "timeout",
                output_truncated=out_cut or err_cut or bool(reply.get("cut")),
                stopped=stopped,
                restarted=restarted,
                figures=figures,
                unsaved_figures=unsaved,
                figures_at=figures_at,
            )

    def _figures(self, reply: dict, stdout: str) -> tuple[list[Path], int, list[int | None]]:
        """The figure files a reply names, in the work directory (names the kernel makes, nothing else),
        how many more the cell showed, and where each came in ``stdout`` (the kernel's byte counts as
        characters; past a cut, at its end)."""
        names, unsaved, places = reply.get("figures"), reply.get("unsaved_figures"), reply.get("figures_at")
        names = names if isinstance(names, list) else []
        places = places if isinstance(places, list) and len(places) == len(names) else [None] * len(names)
        kept = stdout.encode()
        files, at = [], []
        for name, place in zip(names, places, strict=True):
            if isinstance(name, str) and FIGURE_NAME.fullmatch(name):
                files.append(self.workdir / name)
                known = type(place) is int and place >= 0
                at.append(len(kept[:place].decode("utf-8", "ignore")) if known else None)
        return files, unsaved if type(unsaved) is int and unsaved > 0 else 0, at

    def _exchange(self, request: dict, wait: float, reply_limit: int) -> tuple[dict | None, str | None]:
        """Send a cell, read its reply line: (reply, None), or (None, why the kernel must go: "timeout",
        "exited", or a garbled reply, one not answering this request: the cell wrote to the reply pipe)."""
        deadline = time.monotonic() + wait
        data = memoryview((json.dumps(request) + "\n").encode())
        while data:  # the kernel may be too busy to read (a thread of the last cell): no blocking write
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([], [self._cells], [], left)[1]:
                return None, "timeout"
            try:
                data = data[os.write(self._cells, data) :]
            except BlockingIOError:
                continue
            except BrokenPipeError:
                return None, "exited"
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self._replies], [], [], left)[0]:
                return None, "timeout"
            chunk = os.read(self._replies, 65536)
            if not chunk:
                return None, "exited"
            self._pending += chunk
            if len(self._pending) > reply_limit:
                return None, GARBLED
        line, _, rest = self._pending.partition(b"\n")
        self._pending = bytearray(rest)
        try:
            reply = json.loads(line)
        except ValueError:
            return None, GARBLED
        if not isinstance(reply, dict) or reply.get("id") != request["id"]:
            return None, GARBLED
        return reply, None


def _ended(status: int | None) -> str:
    """Why a kernel that left on its own went, from its exit status."""
    if status is not None and status < 0:
        try:
            return f"the interpreter was killed by {signal.Signals(-status).name}"
        except ValueError:
            return f"the interpreter was killed by signal {-status}"
    return "the interpreter exited" + (f" (status {status})" if status else "")
