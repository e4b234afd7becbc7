"""One install path: the README's set-up step (`make setup`) and both image builds run deploy/install.sh,
and nothing else installs packages, so the images cannot drift from what the tests ran on."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
from deploy_files import DEPLOY, DOCKERFILES, ROOT, dockerfile_instructions


def make_recipe(target: str) -> list[str]:
    lines = (ROOT / "Makefile").read_text().splitlines()
    start = lines.index(f"{target}:") + 1
    recipe = []
    for line in lines[start:]:
        if not line.startswith("\t"):
            break
        if not line.strip().startswith("#"):
            recipe.append(line.strip())
    return recipe


def test_readme_setup_is_make_setup_and_make_setup_is_the_install_script():
    readme = (ROOT / "README.md").read_text()
    assert re.search(r"^make setup\b", readme, re.M)
    assert make_recipe("setup") == ["PY=$(PY) sh deploy/install.sh $(VENV) test"]


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_installs_only_through_the_install_script(dockerfile):
    runs = [rest for keyword, rest in dockerfile_instructions(dockerfile) if keyword == "RUN"]
    installs = [r for r in runs if "install" in r and "useradd" not in r]
    assert installs == [
        "EDITABLE=0 KERNELS=venv TORCH_INDEX_URL=${TORCH_INDEX_URL} sh deploy/install.sh /opt/qwenkit"
    ]
    assert not any(re.search(r"\b(pip|apt-get|apt|conda|uv)\b", r) for r in runs), runs
    copies = [rest for keyword, rest in dockerfile_instructions(dockerfile) if keyword == "COPY"]
    assert "deploy/install.sh deploy/constraints.txt ./deploy/" in copies


def constraints() -> dict[str, str]:
    pins = {}
    for line in (DEPLOY / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[name] = version
    return pins


def test_every_runtime_dependency_is_pinned_and_the_test_venv_has_the_pinned_versions():
    """The venv these tests run in was made by the same script with the same pins as the images."""
    pins = constraints()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for dep in deps:
        name = re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower().replace("_", "-")
        assert name == "torch" or name in pins, f"{name} is a runtime dependency but not in constraints.txt"
    assert 'install --quiet --no-cache-dir "torch==2.13.0"' in (DEPLOY / "install.sh").read_text()
    assert metadata.version("torch").split("+")[0] == "2.13.0"
    drifted = {n: (v, metadata.version(n)) for n, v in pins.items() if metadata.version(n) != v}
    assert not drifted, f"installed versions differ from deploy/constraints.txt: {drifted}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_build_stage_copies_every_file_the_package_build_reads(dockerfile):
    """The image's `pip install .` builds from the files its COPY lines bring: the readme and the license
    files pyproject.toml names (setuptools warns on a missing license file and will refuse it), and src/."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {"pyproject.toml", "src", project["readme"], *project["license-files"]}
    instructions = dockerfile_instructions(dockerfile)
    install = next(i for i, (k, rest) in enumerate(instructions) if k == "RUN" and "install.sh" in rest)
    copied = set()
    for keyword, rest in instructions[:install]:
        if keyword == "COPY":
            copied |= set(rest.split()[:-1])  # the sources; the last word is the destination
    assert needed <= copied, needed - copied
    ignored = (ROOT / ".dockerignore").read_text().splitlines()
    assert not needed & set(ignored)


def test_install_script_refuses_an_old_python_before_making_anything(tmp_path):
    """Python 3.10 would get half a venv and pip's "no matching distribution" for numpy: one line instead."""
    import subprocess

    old_python = tmp_path / "python3.10"
    old_python.write_text("#!/bin/sh\necho 3.10\n")
    old_python.chmod(0o755)
    venv = tmp_path / "venv"
    run = subprocess.run(
        ["sh", str(DEPLOY / "install.sh"), str(venv)],
        env={"PATH": "/usr/bin:/bin", "PY": str(old_python)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1
    assert (
        run.stderr == f"error: qwenkit needs Python 3.11 or newer; {old_python} is 3.10 (set PY=python3.11)\n"
    )
    assert not venv.exists()


def test_package_metadata_claims_the_python_the_install_path_takes():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["requires-python"] == ">=3.11"
    # ruff lints for the same floor (at py310 it took the stdlib's tomllib for a third-party import)
    assert pyproject["tool"]["ruff"]["target-version"] == "py311"
