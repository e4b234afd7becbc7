"""What `pip install qwenkit` gets: the wheel and sdist built from this tree carry every file the package
reads at run time (the web page, evaluation prompts, kernel sources) and the license, and nothing of a
checkout's tests, benchmarks or bytecode. An editable install reads src/ directly, so only a built
distribution shows a file the package-data rules miss.

The build runs in a copy of the tree (pyproject.toml, README.md, LICENSE, MANIFEST.in and src/'s tracked
files) with the test venv's setuptools and no network, so the checkout gets no build/ or egg-info from it
(~3 s)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOP_FILES = ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in")
BUILD = """
import sys
from pathlib import Path
from setuptools import build_meta
out = sys.argv[1]  # build_meta rewrites sys.argv
names = [build_meta.build_wheel(out), build_meta.build_sdist(out)]
Path(out, "names.txt").write_text(" ".join(names))
"""


def _source_files() -> list[str]:
    """The files under src/ that a clean checkout has: git's tracked files (a developer's stray or
    generated files are no part of a release), else every file but bytecode and egg-info."""
    try:
        done = subprocess.run(["git", "ls-files", "-z", "src"], cwd=ROOT, capture_output=True, check=True)
        return sorted(n for n in done.stdout.decode().split("\0") if n)
    except (OSError, subprocess.CalledProcessError):
        return sorted(
            p.relative_to(ROOT).as_posix()
            for p in (ROOT / "src").rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and ".egg-info" not in p.as_posix()
        )


def _package_files() -> set[str]:
    """Every file of the qwenkit package in this tree, as a path inside the wheel."""
    return {n.removeprefix("src/") for n in _source_files() if n.startswith("src/qwenkit/")}


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> tuple[list[str], list[str]]:
    """(wheel names, sdist names) built from a copy of the tree that also holds what a checkout has
    beside the package: tests/, benchmarks/ and __pycache__ folders."""
    tree = tmp_path_factory.mktemp("tree")
    for name in TOP_FILES:
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, tree / name)
    for rel in _source_files():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, tree / rel)
    planted = {
        "tests/test_planted.py": "def test_x(): pass\n",
        "tests/server/test_planted.py": "def test_y(): pass\n",
        "benchmarks/bench_planted.py": "print(1)\n",
        "src/qwenkit/__pycache__/planted.cpython-311.pyc": "",
        "src/qwenkit/server/static/__pycache__/planted.cpython-311.pyc": "",
    }
    for rel, text in planted.items():
        (tree / rel).parent.mkdir(parents=True, exist_ok=True)
        (tree / rel).write_text(text)
    out = tree / "dist"
    out.mkdir()
    done = subprocess.run(
        [sys.executable, "-c", BUILD, str(out)], cwd=tree, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    wheel_name, sdist_name = (out / "names.txt").read_text().split()
    with zipfile.ZipFile(out / wheel_name) as z:
        wheel = z.namelist()
    with tarfile.open(out / sdist_name) as t:
        sdist = [m.name.split("/", 1)[1] for m in t.getmembers() if m.isfile()]
    return wheel, sdist


def test_the_wheel_carries_exactly_the_package_files(dists):
    wheel, _ = dists
    package = {n for n in wheel if n.startswith("qwenkit/")}
    assert package == _package_files()
    # the runtime data the code opens by path or importlib.resources, named so a rename shows here too
    for needed in (
        "qwenkit/server/static/index.html",
        "qwenkit/server/static/vendor/marked.esm.js",
        "qwenkit/server/static/vendor/purify.es.mjs",
        "qwenkit/evaluate/prompts/qwen_gsm8k_8shot.txt",
        "qwenkit/evaluate/prompts/qwen_gsm8k_chat_4shot.txt",
        "qwenkit/evaluate/prompts/ceval_subjects.json",
        "qwenkit/kernels/csrc/cpu_kernels.cpp",
        "qwenkit/kernels/csrc/tiles.h",
    ):
        assert needed in package, needed


def test_the_wheel_carries_the_license_and_no_checkout_files(dists):
    wheel, _ = dists
    assert "qwenkit-0.1.0.dist-info/licenses/LICENSE" in wheel
    assert [n for n in wheel if "__pycache__" in n or n.endswith(".pyc")] == []
    assert {n.split("/", 1)[0] for n in wheel} == {"qwenkit", "qwenkit-0.1.0.dist-info"}


def test_the_sdist_carries_the_license_and_no_tests_or_benchmarks(dists):
    """setuptools adds tests/test*.py to an sdist by default: a partial suite (no conftest, no
    subfolders) that cannot run, so MANIFEST.in prunes it."""
    _, sdist = dists
    assert "LICENSE" in sdist
    assert [n for n in sdist if n.startswith(("tests/", "benchmarks/"))] == []
    assert [n for n in sdist if "__pycache__" in n or n.endswith(".pyc")] == []
    assert {n.removeprefix("src/") for n in sdist if n.startswith("src/qwenkit/")} == _package_files()
