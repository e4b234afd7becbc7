"""Paths and readers for the deployment tests: the recipes are data, read the way the tools read them."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
DOCKERFILES = (DEPLOY / "Dockerfile.cpu", DEPLOY / "Dockerfile.cuda")
BIN = Path(sys.executable).parent  # hadolint and kubectl come as wheels in the test extra


def tool(name: str) -> str:
    path = BIN / name
    assert path.exists(), f"{name} is missing: `make setup` installs it with the test extra"
    return str(path)


def dockerfile_instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += line[:-1] + " " if line.endswith("\\") else line
        if not line.endswith("\\"):
            keyword, _, rest = pending.partition(" ")
            out.append((keyword.upper(), rest.strip()))
            pending = ""
    return out


def dockerfile_env(path: Path) -> dict[str, str]:
    """The final stage's ENV, with ${VAR:+x} of an unset build argument taken as empty (the default build)."""
    stages = [i for i, (k, _) in enumerate(dockerfile_instructions(path)) if k == "FROM"]
    env: dict[str, str] = {}
    for keyword, rest in dockerfile_instructions(path)[stages[-1] :]:
        if keyword == "ENV":
            for item in rest.split():
                key, _, value = item.partition("=")
                env[key] = "" if value.startswith("${MODEL_DIR:+") else value
    return env


def by_kind(objects: list[dict], kind: str) -> dict:
    (found,) = [o for o in objects if o["kind"] == kind]
    return found
