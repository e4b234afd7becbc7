"""Every script in benchmarks/ still imports and parses its arguments.

The benchmarks are the evidence for the README's speed and memory figures, but only a few run in the
suite, so a helper moved or renamed in src/ breaks the others unseen. Two cheap checks catch that:
every name a script imports from qwenkit or a sibling script (at the top or inside a function, where
most import lazily) exists, and each script run as ``__main__`` with ``--help`` exits 0 with its usage.
The ``--help`` runs share one interpreter so torch and transformers load once.
"""

from __future__ import annotations

import ast
import contextlib
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SCRIPTS = sorted(BENCH.glob("*.py"))
LIBRARIES = {"serve_client", "serve_process", "shapes"}  # imported by the scripts; no command line

# Run in a child: each script as __main__ with --help; report {name: [exit code, printed usage]}.
HELP_RUNNER = """
import contextlib, io, json, runpy, sys
sys.path.insert(0, sys.argv[1])
results = {}
for path in sys.argv[2:]:
    out, code = io.StringIO(), None
    sys.argv = [path, "--help"]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            runpy.run_path(path, run_name="__main__")
        except SystemExit as exc:
            code = exc.code
        except BaseException as exc:
            code = f"{type(exc).__name__}: {exc}"
    results[path] = [code, "usage:" in out.getvalue()]
print(json.dumps(results))
"""


def parsed(path: Path) -> list[ast.AST]:
    """The script's tree and the trees of the child scripts it holds as strings (run with ``-c``)."""
    trees = [ast.parse(path.read_text(), str(path))]
    for node in ast.walk(trees[0]):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "import " in node.value:
            with contextlib.suppress(SyntaxError):  # prose, not code
                trees.append(ast.parse(node.value))
    return trees


def imported_names(path: Path) -> list[tuple[str, str, int]]:
    """(module, name, line) of every ``from M import name`` in ``path`` M being qwenkit's or a sibling's."""
    siblings = {p.stem for p in SCRIPTS}
    found = []
    for node in (n for tree in parsed(path) for n in ast.walk(tree)):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            top = node.module.split(".")[0]
            if top == "qwenkit" or top in siblings:
                found += [(node.module, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "qwenkit"]
    return found


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_name_a_benchmark_imports_exists(script, monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))
    missing = []
    for module, name, line in imported_names(script):
        try:
            loaded = importlib.import_module(module)
        except ImportError as exc:
            missing.append(f"{script.name}:{line}: {module} ({exc})")
            continue
        if name and name != "*" and not hasattr(loaded, name):
            try:  # a submodule: `from qwenkit.engine import lockstep`
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{script.name}:{line}: {module}.{name}")
    assert missing == []


def test_every_benchmark_prints_its_usage_on_help():
    commands = [str(p) for p in SCRIPTS if p.stem not in LIBRARIES]
    run = subprocess.run(
        [sys.executable, "-c", HELP_RUNNER, str(BENCH), *commands],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    results = json.loads(run.stdout.strip().splitlines()[-1])
    failed = {Path(p).name: r for p, r in results.items() if r != [0, True]}
    assert failed == {}
    assert len(results) == len(commands) > 30


@pytest.mark.slow
def test_the_tensor_parallel_benchmark_runs_its_led_engines():
    """bench_tensor_parallel.py's last row has rank 1 follow rank 0's forwards (``Lockstep.follow``); it
    runs to its table and every layout decodes the tokens of TP=1."""
    run = subprocess.run(
        [sys.executable, str(BENCH / "bench_tensor_parallel.py"), "--layers", "1", "--tokens", "4"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line for line in run.stdout.splitlines() if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert [row.split(" | ")[1] for row in rows] == ["one", "one", "replicated", "led by rank 0"]
    assert all(row.endswith("| yes |") for row in rows)


@pytest.mark.slow
def test_the_embedding_benchmark_measures_both_sides_and_they_agree():
    """bench_embed.py on one layer of the Qwen3-Embedding-0.6B shape: a row per dtype and side, each
    side's vectors those of the other (cosine >= 0.999), the ratios each other's inverse."""
    run = subprocess.run(
        [sys.executable, str(BENCH / "bench_embed.py"), "--layers", "1", "--texts", "3", "--tokens", "9"],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [line.split(" | ") for line in run.stdout.splitlines() if line.startswith(("| bf16 ", "| fp32 "))]
    assert [(r[0], r[1]) for r in rows] == [
        ("| bf16", "qwenkit"),
        ("| bf16", "transformers"),
        ("| fp32", "qwenkit"),
        ("| fp32", "transformers"),
    ]
    assert all(r[-1].endswith("(yes) |") for r in rows)
    for ours, theirs in (rows[:2], rows[2:]):
        assert float(ours[3]) / float(theirs[3]) == pytest.approx(float(ours[4][:-1]), rel=0.02)
