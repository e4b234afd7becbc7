"""Loads hand freed heap memory back as they build layers (``files.HeapTrimmer``).

glibc keeps what a load's temporaries freed, and the long-lived tensors allocated between them fragment
the heap; a Qwen2.5-0.5B-shape GPTQ int4 checkpoint then peaked at 1.4-1.6x its weights in the runs
where the load ran fastest (1.18x in the others), until the GPTQ path trimmed as ``--quantize`` did.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from factories import hf_model, save_hf

from qwenkit.checkpoint import files, load_model
from qwenkit.checkpoint import loader as loader_module
from qwenkit.kernels import available as kernels_available
from qwenkit.quant import QuantizedLinear
from qwenkit.quant.pipeline import quantize_checkpoint


def test_trims_once_every_so_many_weights(monkeypatch) -> None:
    trims: list[int] = []
    monkeypatch.setattr(files, "trim_heap", lambda: trims.append(1))
    trimmer = files.HeapTrimmer(every=100)
    trimmer.built(60)
    assert trims == []
    trimmer.built(60)  # 120 built since the last trim
    assert trims == [1]
    trimmer.built(90)  # counted from zero again
    assert trims == [1]
    trimmer.built(20)
    assert trims == [1, 1]


@pytest.fixture(scope="module")
def gptq_checkpoint(tmp_path_factory):
    src = save_hf(
        hf_model("qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2),
        tmp_path_factory.mktemp("src") / "m",
    )
    out = tmp_path_factory.mktemp("gptq") / "q"
    quantize_checkpoint(src, out, bits=4, method="rtn", progress=False)
    return out


def test_a_gptq_load_trims_the_heap_as_its_layers_are_packed(gptq_checkpoint, monkeypatch) -> None:
    """Every packed layer counts its weights; with a trim per layer, one trim each."""
    trims: list[int] = []
    monkeypatch.setattr(files, "trim_heap", lambda: trims.append(1))
    monkeypatch.setattr(loader_module, "HeapTrimmer", lambda: files.HeapTrimmer(every=0))
    model, _ = load_model(gptq_checkpoint, dtype="bfloat16", progress=False)
    layers = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(layers) == 2 * 7  # q, k, v, o, gate, up, down in each of the 2 layers
    assert all(m.impl is not None for m in layers)  # packed while loading
    assert len(trims) == len(layers)

    # trimming frees nothing the model holds: the same logits as a load that never trims
    monkeypatch.setattr(loader_module, "HeapTrimmer", lambda: files.HeapTrimmer(every=1 << 62))
    again, _ = load_model(gptq_checkpoint, dtype="bfloat16", progress=False)
    ids = torch.tensor([[3, 14, 15, 92, 65]])
    with torch.no_grad():
        assert torch.equal(model(ids), again(ids))
    assert len(trims) == len(layers)


FUSE_CHILD = r"""
import json, sys
from qwenkit.checkpoint import load_model
from qwenkit.quant.fused import fuse_for_inference
import qwenkit.quant.on_load
from qwenkit import kernels
kernels.available()
def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
model, _ = load_model(sys.argv[1], dtype="bfloat16", quantize="int8", progress=False)
size = sum({t.data_ptr(): t.nbytes for t in [*model.parameters(), *model.buffers()]}.values())
before = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # the peak from here on
count = fuse_for_inference(model, release_parts=True)
print(json.dumps({"fused": count, "model": size, "transient": status("VmHWM:") - before}))
"""


@pytest.mark.slow
def test_fusing_a_quantized_model_trims_as_it_goes(tmp_path) -> None:
    """`generate`, `chat` and `serve --quantize` fuse each layer's q/k/v and gate/up on the CPU kernels
    into new tiles; the freed parts stayed in glibc's heap, which grew with every layer: fusing a
    Qwen2.5-0.5B-shape int8 model peaked 100-130 MiB over the model (the whole load at 1.26x its weights
    instead of 1.03x). Trimming as they fuse keeps it to about a layer."""
    if not files._malloc_trim() or not kernels_available():
        pytest.skip("no glibc malloc_trim or no CPU kernels here: nothing to trim, nothing fused")
    path = save_hf(
        hf_model("qwen2", vocab_size=1024, hidden_size=512, intermediate_size=2816, num_hidden_layers=16),
        tmp_path / "m",
    )
    env = {"QWENKIT_PREPARED_CACHE": "off", "PYTHONPATH": ":".join(sys.path)}
    out = subprocess.run(
        [sys.executable, "-c", FUSE_CHILD, str(path)], capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["fused"] == 2 * 16, r
    assert r["transient"] < 0.2 * r["model"], r  # measured 0.36x before
