"""The rendered Kubernetes manifests, once per session."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))

from deploy_files import DEPLOY, tool


@pytest.fixture(scope="session")
def rendered(tmp_path_factory):
    """Render an overlay (optionally with the ServiceMonitor component) with kubectl's built-in kustomize,
    in a copy of deploy/k8s holding a throwaway API key, as `kubectl apply -k` would."""
    cache: dict[tuple[str, bool], list[dict]] = {}

    def render(overlay: str, monitoring: bool = False) -> list[dict]:
        if (overlay, monitoring) not in cache:
            tree = tmp_path_factory.mktemp("k8s") / "k8s"
            shutil.copytree(DEPLOY / "k8s", tree)
            (tree / "base" / "api-key").write_text("test-key\n")
            kustomization = tree / "overlays" / overlay / "kustomization.yaml"
            if monitoring:
                text = kustomization.read_text().replace("# components:", "components:")
                kustomization.write_text(text.replace("#   - ../../components", "  - ../../components"))
            out = subprocess.run(
                [tool("kubectl"), "kustomize", str(tree / "overlays" / overlay)],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert out.returncode == 0, out.stderr
            cache[(overlay, monitoring)] = [d for d in yaml.safe_load_all(out.stdout) if d]
        return cache[(overlay, monitoring)]

    return render
