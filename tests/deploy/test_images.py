"""The image recipes: hadolint-clean, and the properties the deployment relies on, read from the files."""

from __future__ import annotations

import re
import subprocess

import pytest
from deploy_files import DEPLOY, DOCKERFILES, dockerfile_env, dockerfile_instructions, tool

from qwenkit.checkpoint import prepared_cache
from qwenkit.cli.serve import environment_names


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint_finds_nothing(dockerfile):
    out = subprocess.run(
        [tool("hadolint"), "--failure-threshold", "style", "--no-color", str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0 and out.stdout == "", out.stdout + out.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_image_is_multi_stage_pinned_non_root_and_serves_from_the_environment(dockerfile):
    steps = dockerfile_instructions(dockerfile)
    bases = [rest for k, rest in steps if k == "FROM"]
    assert len(bases) == 2 and bases[0].endswith(" AS build")
    for base in bases:  # an exact patch release and distribution, never a moving tag
        assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+( AS build)?", base), base
    runtime = steps[[k for k, _ in steps].index("FROM", 1) :]
    keywords = [k for k, _ in runtime]
    users = [rest for k, rest in runtime if k == "USER"]
    assert users == ["10001"] and keywords.index("USER") < keywords.index("ENTRYPOINT")
    assert ("ENTRYPOINT", '["qwenkit", "serve"]') in runtime
    assert ("COPY", "--from=build /opt/qwenkit /opt/qwenkit") in runtime  # only the venv crosses over
    assert ("COPY", "${MODEL_DIR:-deploy/no-model} /models/baked") in runtime
    (healthcheck,) = [r for k, r in runtime if k == "HEALTHCHECK"]
    assert healthcheck.endswith('CMD ["python", "/opt/healthcheck.py"]')
    assert "/health" in (DEPLOY / "healthcheck.py").read_text()

    env = dockerfile_env(dockerfile)
    assert env["QWENKIT_HOST"] == "0.0.0.0" and env["QWENKIT_PORT"] == "8000"
    assert env["QWENKIT_DEVICE"] == ("cuda" if dockerfile.name.endswith("cuda") else "cpu")
    assert ("EXPOSE", env["QWENKIT_PORT"]) in runtime
    # No prepared-model cache: HOME is /tmp, a small emptyDir lost with the pod, so the packed copy would be
    # written at every start and never read (and a large one would fill the volume).
    assert env.pop(prepared_cache.ENV_SWITCH) == "off" and env["HOME"] == "/tmp"
    # Every other QWENKIT_ variable the image sets is an option `qwenkit serve` reads.
    assert {k for k in env if k.startswith("QWENKIT_")} <= set(environment_names())


def test_default_build_serves_the_mounted_or_bundled_model_and_a_baked_one_when_asked():
    text = DOCKERFILES[0].read_text()
    assert 'ARG MODEL_DIR=""' in text and "QWENKIT_MODEL=${MODEL_DIR:+/models/baked}" in text
    assert dockerfile_env(DOCKERFILES[0])["QWENKIT_MODEL"] == ""  # empty: the bundled model
    assert (DEPLOY / "no-model").is_dir() and not (DEPLOY / "no-model" / "config.json").exists()
