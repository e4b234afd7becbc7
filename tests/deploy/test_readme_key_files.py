"""The API key files the README's deployment commands write stay out of git and out of a docker build
context (which may be sent to a remote builder): a key at the repository root was neither."""

from __future__ import annotations

import re
import subprocess

from deploy_files import ROOT


def deployment_section() -> str:
    readme = (ROOT / "README.md").read_text()
    start = readme.index("## Deployment")
    return readme[start : readme.index("\n## ", start + 1)]


def docker_ignored(path: str) -> bool:
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line[:1] not in "#"]
    return any(path == p or path.startswith(p.rstrip("/") + "/") for p in patterns if p)


def test_every_key_file_the_readme_writes_is_ignored_by_git_and_docker():
    section = deployment_section()
    keys = re.findall(r"openssl rand -hex 32 > (\S+)", section)
    assert len(keys) == 3, keys  # docker run, compose, Kubernetes
    for key in keys:
        ignored = subprocess.run(["git", "check-ignore", "-q", "--no-index", key], cwd=ROOT).returncode == 0
        assert ignored, f"{key} is not git-ignored"
        assert docker_ignored(key), f"{key} would be sent with the build context"


def test_docker_run_mounts_the_key_file_the_readme_writes():
    section = deployment_section()
    written = re.search(r"openssl rand -hex 32 > (\S+) && chmod 0444 \1\s", section).group(1)
    (source,) = re.findall(r"-v \$PWD/(\S+):/run/secrets/api-key:ro", section)
    assert source == written
