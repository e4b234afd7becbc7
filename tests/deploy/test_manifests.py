"""The Kubernetes manifests, rendered as `kubectl apply -k` renders them and validated offline against the
Kubernetes schemas; then the links between objects and the sizing are checked on the real values."""

from __future__ import annotations

import math

import kubernetes_validate
import pytest
import torch
import yaml
from deploy_files import DEPLOY, DOCKERFILES, by_kind, dockerfile_env

from qwenkit.cli.serve import environment_names, parse_bytes
from qwenkit.config import ModelConfig
from qwenkit.memory import GiB, weight_bytes

K8S_VERSION = "1.33"  # the oldest release with preStop `sleep` enabled by default; newer ones validate too
RUNTIME_BYTES = GiB  # Python, torch, tokenizer, activations (0.26 GiB measured idle), as the overlays say

# The example models the overlays are sized for (config.json values from the published configs).
SIZED_FOR = {
    "Qwen2-1.5B-Instruct": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                tie_word_embeddings=True),
    "Qwen2-7B-Instruct": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                              num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                              tie_word_embeddings=False),
}  # fmt: skip


def container(objects: list[dict]) -> dict:
    (c,) = by_kind(objects, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env_of(objects: list[dict]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container(objects)["env"]}


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
@pytest.mark.parametrize("version", [K8S_VERSION, kubernetes_validate.latest_version()])
def test_every_object_validates_against_the_kubernetes_schema(rendered, overlay, version):
    objects = rendered(overlay, monitoring=True)
    kinds = sorted(o["kind"] for o in objects)
    expected = "Deployment Service PodDisruptionBudget HorizontalPodAutoscaler Secret PersistentVolumeClaim"
    assert kinds == sorted([*expected.split(), "NetworkPolicy", "NetworkPolicy", "ServiceMonitor"])
    for obj in objects:
        if obj["kind"] != "ServiceMonitor":  # a CRD: no schema offline; its links are checked below
            kubernetes_validate.validate(obj, version, strict=True)


def test_a_broken_manifest_is_caught_by_the_validator(rendered):
    """The validation above can fail: a misspelt field and a wrong type are both rejected."""
    deployment = by_kind(rendered("cpu"), "Deployment")
    bad = {**deployment, "spec": {**deployment["spec"], "replica": 2}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)
    bad = {**deployment, "spec": {**deployment["spec"], "replicas": "two"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_objects_select_the_server_pods_and_the_key_comes_from_the_generated_secret(rendered, overlay):
    objects = rendered(overlay, monitoring=True)
    deployment = by_kind(objects, "Deployment")
    pod = deployment["spec"]["template"]
    labels = pod["metadata"]["labels"]

    def selects(selector: dict) -> bool:
        return selector.items() <= labels.items()

    assert selects(deployment["spec"]["selector"]["matchLabels"])
    service = by_kind(objects, "Service")
    assert selects(service["spec"]["selector"])
    assert selects(by_kind(objects, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"])
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "qwenkit"}
    assert 1 <= by_kind(objects, "PodDisruptionBudget")["spec"]["minAvailable"] < hpa["minReplicas"]

    c = container(objects)
    env = env_of(objects)
    port = c["ports"][0]["containerPort"]
    assert port == int(dockerfile_env(DOCKERFILES[0])["QWENKIT_PORT"])
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert c[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert service["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http"}]

    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["name"]: m for m in c["volumeMounts"]}
    secret = by_kind(objects, "Secret")
    assert volumes["api-key"]["secret"]["secretName"] == secret["metadata"]["name"]  # with its hash suffix
    assert env["QWENKIT_API_KEY_FILE"] == mounts["api-key"]["mountPath"] + "/" + next(iter(secret["data"]))
    assert env["QWENKIT_MODEL"] == mounts["model"]["mountPath"] and mounts["model"]["readOnly"] is True
    assert volumes["model"]["persistentVolumeClaim"]["readOnly"] is True
    # Every QWENKIT_ variable is an option `qwenkit serve` reads (a typo would be silently ignored).
    assert {k for k in env if k.startswith("QWENKIT_")} <= set(environment_names())


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_pods_run_as_the_image_user_and_rolling_updates_let_requests_finish(rendered, overlay):
    objects = rendered(overlay)
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    c = container(objects)
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"]["drop"] == ["ALL"]
    grace = float(env_of(objects)["QWENKIT_GRACEFUL_TIMEOUT"])
    pre_stop = c["lifecycle"]["preStop"]["sleep"]["seconds"]
    assert pod["terminationGracePeriodSeconds"] > pre_stop + grace
    live = c["livenessProbe"]
    assert live["periodSeconds"] * live["failureThreshold"] > grace  # a drain is not a dead server
    assert c["readinessProbe"]["failureThreshold"] * c["readinessProbe"]["periodSeconds"] <= 5


@pytest.mark.parametrize("monitoring", [False, True])
def test_network_policy_admits_only_this_namespace_and_optionally_the_monitoring_one(rendered, monitoring):
    objects = rendered("cpu", monitoring=monitoring)
    policies = [o for o in objects if o["kind"] == "NetworkPolicy"]
    labels = by_kind(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    sources = []
    for policy in policies:
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
        assert policy["spec"]["policyTypes"] == ["Ingress"]
        for rule in policy["spec"]["ingress"]:
            assert rule["ports"] == [{"protocol": "TCP", "port": 8000}]
            sources += rule["from"]
    # A bare podSelector {} means "every pod in this namespace" and nothing outside it.
    expected = [{"podSelector": {}}]
    if monitoring:
        expected.append({"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}})
    assert sources == expected


def test_service_monitor_scrapes_the_services_metrics_port(rendered):
    objects = rendered("gpu", monitoring=True)
    monitor, service = by_kind(objects, "ServiceMonitor"), by_kind(objects, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]


def quantity(text: str) -> int:
    """A Kubernetes memory quantity ('6Gi') in bytes."""
    return parse_bytes(text + "B" if text.endswith("i") else text, "a manifest quantity")


def needed_bytes(objects: list[dict]) -> tuple[str, int]:
    """Weights at the served dtype (qwenkit info's figure) + the KV pool + the runtime allowance."""
    name = by_kind(objects, "Deployment")["metadata"]["annotations"]["qwenkit.dev/sized-for"]
    config = ModelConfig.from_hf(
        {"model_type": "qwen2", "rope_theta": 1e6, "max_position_embeddings": 32768, **SIZED_FOR[name]}
    )
    env = env_of(objects)
    assert env["QWENKIT_DTYPE"] == "bfloat16"
    return name, weight_bytes(config, torch.bfloat16) + parse_bytes(
        env["QWENKIT_KV_CACHE_MEMORY"], "QWENKIT_KV_CACHE_MEMORY"
    ) + (RUNTIME_BYTES)


def test_cpu_memory_request_is_weights_plus_kv_pool_plus_runtime(rendered):
    objects = rendered("cpu")
    name, need = needed_bytes(objects)
    resources = container(objects)["resources"]
    assert name == "Qwen2-1.5B-Instruct" and round(need / GiB, 2) == 5.88
    assert quantity(resources["requests"]["memory"]) == math.ceil(need / GiB) * GiB
    assert quantity(resources["limits"]["memory"]) > quantity(resources["requests"]["memory"])
    assert env_of(objects)["OMP_NUM_THREADS"] == resources["requests"]["cpu"]


def test_gpu_pods_land_only_on_gpus_with_room_for_weights_plus_kv_pool(rendered):
    objects = rendered("gpu")
    name, need = needed_bytes(objects)
    assert name == "Qwen2-7B-Instruct" and round(need / GiB, 2) == 19.19
    pod = by_kind(objects, "Deployment")["spec"]["template"]["spec"]
    (term,) = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    (rule,) = term["matchExpressions"]
    assert rule["key"] == "nvidia.com/gpu.memory" and rule["operator"] == "Gt"
    assert int(rule["values"][0]) * 2**20 >= need  # the label is in MiB
    c = container(objects)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1 and env_of(objects)["QWENKIT_DEVICE"] == "cuda"
    hpa = by_kind(objects, "HorizontalPodAutoscaler")["spec"]
    assert hpa["metrics"][0]["pods"]["metric"]["name"] == "vllm_num_requests_waiting"
    # the rule that turns the server's own gauge into that per-pod metric ships beside the overlay
    values = yaml.safe_load((DEPLOY / "k8s/overlays/gpu/prometheus-adapter-values.yaml").read_text())
    (rule,) = values["rules"]["custom"]
    assert rule["name"]["as"] == hpa["metrics"][0]["pods"]["metric"]["name"]
    assert rule["seriesQuery"].startswith("vllm:num_requests_waiting{")
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}
    strategy = by_kind(objects, "Deployment")["spec"]["strategy"]["rollingUpdate"]
    assert strategy == {"maxSurge": 0, "maxUnavailable": 1}
