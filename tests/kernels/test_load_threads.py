"""A load's passes over big weights run on all threads (``load_threads``/``run_pass``), the same bytes as on
one, and torch's own ops stay on one thread within a load."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qwenkit.checkpoint import gguf_quant
from qwenkit.checkpoint.gguf_types import GGMLQuantizationType as Q
from qwenkit.kernels import available, ops
from qwenkit.quant.rtn import quantize_weight_rtn

pytestmark = pytest.mark.skipif(not available(), reason="the CPU kernels are not available here")


@pytest.fixture
def two_threads():
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(threads)


def threads_seen(monkeypatch) -> list[tuple[str, int]]:
    """Every pass the library runs, with the torch thread count it ran under."""
    seen: list[tuple[str, int]] = []
    real = ops.op

    def op(name: str):
        found = real(name)

        def run(*args):
            seen.append((name, torch.get_num_threads()))
            return found(*args)

        return run

    monkeypatch.setattr(ops, "op", op)
    return seen


def test_big_weights_get_every_thread_small_ones_one_and_the_bytes_do_not_change(two_threads, monkeypatch):
    g = np.random.default_rng(0)
    big, small = (2048, 2048), (256, 512)  # 4M values: at PARALLEL_PASS_WEIGHTS; 128k: below
    assert big[0] * big[1] >= ops.PARALLEL_PASS_WEIGHTS > small[0] * small[1]
    blocks = {s: gguf.quants.quantize(g.standard_normal(s).astype(np.float32), Q.Q8_0) for s in (big, small)}
    floats = torch.randn(*big, dtype=torch.bfloat16)
    outside = {s: gguf_quant.decode_affine(b, Q.Q8_0, s) for s, b in blocks.items()}
    rtn_outside = quantize_weight_rtn(floats, 4, 32)
    seen = threads_seen(monkeypatch)
    with ops.load_threads(True):
        assert torch.get_num_threads() == 1  # torch's small ops
        inside = {s: gguf_quant.decode_affine(b, Q.Q8_0, s) for s, b in blocks.items()}
        rtn_inside = quantize_weight_rtn(floats, 4, 32)
        packed = ops.prepare_int4(rtn_inside.qweight, rtn_inside.scales, None, 32, zero_point=8)
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    assert seen == [
        ("decode_gguf_blocks", 2),
        ("decode_gguf_blocks", 1),
        ("quantize_rtn", 2),
        ("pack_int_tiles", 2),
    ]
    for s in blocks:
        for field in ("codes", "scale", "shift"):
            assert torch.equal(getattr(inside[s], field), getattr(outside[s], field))
    assert torch.equal(rtn_inside.qweight, rtn_outside.qweight)
    assert torch.equal(rtn_inside.scales, rtn_outside.scales)
    assert torch.equal(
        packed.codes, ops.prepare_int4(rtn_outside.qweight, rtn_outside.scales, None, 32, 8).codes
    )


def test_outside_a_load_passes_run_on_torchs_setting(two_threads, monkeypatch):
    seen = threads_seen(monkeypatch)
    with ops.load_threads(False):
        ops.run_pass("pack_int_tiles", 64, torch.zeros(16, 8, dtype=torch.uint8), 4)
    ops.run_pass("pack_int_tiles", 1 << 30, torch.zeros(16, 8, dtype=torch.uint8), 4)
    assert seen == [("pack_int_tiles", 2), ("pack_int_tiles", 2)]


def test_a_failing_pass_leaves_the_threads_as_they_were(two_threads):
    with ops.load_threads(True):
        with pytest.raises(RuntimeError, match="K must be a multiple of 8"):
            ops.run_pass("pack_int_tiles", 1 << 30, torch.zeros(16, 7, dtype=torch.uint8), 4)
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
