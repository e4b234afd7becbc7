"""The compose file: a model directory mounted read-only, the API key from a secret file, a stop grace
period longer than the server's drain, and only options `qwenkit serve` reads."""

from __future__ import annotations

import re

import pytest
import yaml
from deploy_files import DEPLOY, ROOT, dockerfile_instructions

from qwenkit.cli.serve import environment_names

COMPOSE = yaml.safe_load((DEPLOY / "compose.yaml").read_text())  # merge keys (<<) resolved by PyYAML


def seconds(text: str) -> float:
    return sum(float(n) * {"s": 1, "m": 60}[u] for n, u in re.findall(r"([\d.]+)([sm])", text))


@pytest.mark.parametrize("name", ["qwenkit", "qwenkit-gpu"])
def test_service_mounts_the_model_read_only_and_reads_the_key_from_a_secret(name):
    service = COMPOSE["services"][name]
    env = service["environment"]
    (model,) = service["volumes"]
    assert model["type"] == "bind" and model["read_only"] is True
    assert model["source"].startswith("${MODEL_DIR:?")  # compose refuses to start without a model
    assert env["QWENKIT_MODEL"] == model["target"]
    (secret,) = service["secrets"]
    assert env["QWENKIT_API_KEY_FILE"] == f"/run/secrets/{secret}"
    assert COMPOSE["secrets"][secret]["file"].endswith("api-key.txt}")
    assert "deploy/api-key.txt" in (ROOT / ".gitignore").read_text().splitlines()
    assert "deploy/api-key.txt" in (ROOT / ".dockerignore").read_text().splitlines()  # not in a build context
    assert seconds(service["stop_grace_period"]) > float(env["QWENKIT_GRACEFUL_TIMEOUT"])
    assert service["read_only"] is True and service["tmpfs"] == ["/tmp" if name == "qwenkit" else "/tmp:exec"]
    assert (ROOT / service["build"]["dockerfile"]).exists() and service["build"]["context"] == ".."
    assert all(p.startswith("127.0.0.1:") for p in service["ports"])  # not published beyond the host
    assert set(env) <= set(environment_names())


def test_gpu_service_reserves_an_nvidia_gpu_and_uses_the_cuda_image():
    service = COMPOSE["services"]["qwenkit-gpu"]
    assert service["profiles"] == ["gpu"] and service["build"]["dockerfile"] == "deploy/Dockerfile.cuda"
    (device,) = service["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}


def test_gpu_service_may_load_libraries_triton_compiles_into_its_home():
    """HOME is /tmp in the image and Triton writes its kernels under HOME: Docker's tmpfs is noexec by
    default, which makes dlopen of the compiled kernel fail; the CPU image loads nothing from /tmp."""
    home = next(
        a for k, a in dockerfile_instructions(DEPLOY / "Dockerfile.cuda") if k == "ENV" and "HOME=" in a
    )
    assert "HOME=/tmp" in home
    assert COMPOSE["services"]["qwenkit-gpu"]["tmpfs"] == ["/tmp:exec"]
    assert COMPOSE["services"]["qwenkit"]["tmpfs"] == ["/tmp"]


def test_compose_limits_the_queue_and_batch_as_the_kubernetes_deployment_does():
    deployment = yaml.safe_load((DEPLOY / "k8s/base/deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    k8s = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    env = COMPOSE["services"]["qwenkit"]["environment"]
    for name in ("QWENKIT_MAX_BATCH", "QWENKIT_MAX_QUEUE", "QWENKIT_GRACEFUL_TIMEOUT"):
        assert env[name] == k8s[name], name
