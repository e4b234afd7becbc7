"""``qwenkit info`` on a GPTQ checkpoint names what a reader needs to know: bits, group size,
symmetric or not, and act-order (``desc_act``, which vLLM refuses). It showed only bits and group."""

from __future__ import annotations

import json

import pytest
from factories import hf_model

from qwenkit.cli import main
from qwenkit.quant.pipeline import quantize_checkpoint


@pytest.fixture(scope="module")
def int4(tmp_path_factory):
    root = tmp_path_factory.mktemp("info")
    hf_model("qwen2", hidden_size=64, intermediate_size=128).save_pretrained(root / "float")
    quantize_checkpoint(root / "float", root / "int4", bits=4, group_size=32, method="rtn", progress=False)
    return root / "int4"


def _quantization_line(path, capsys) -> str:
    assert main(["info", str(path)]) == 0
    return next(
        line for line in capsys.readouterr().out.splitlines() if line.strip().startswith("quantization")
    )


def test_info_shows_bits_group_symmetry_and_act_order(int4, capsys) -> None:
    assert _quantization_line(int4, capsys).split(None, 1)[1] == (
        "gptq 4-bit, group 32, symmetric, no act-order (desc_act false)"
    )


@pytest.mark.parametrize(
    ("fields", "shown"),
    [
        ({"sym": False, "desc_act": True}, "gptq 4-bit, group 32, asymmetric, act-order (desc_act true)"),
        (
            {"static_groups": True, "meta": {"act_order": "static"}, "group_size": -1},
            "gptq 4-bit, one group per row, symmetric, static act-order (desc_act false)",
        ),
        (
            {"dynamic": {"-:.*layers\\.0\\..*": {}, ".*mlp.*": {"bits": 8}, ".*v_proj": {"sym": False}}},
            "gptq 4-bit, group 32, symmetric, no act-order (desc_act false); per layer: 2 dynamic "
            "overrides, 1 dynamic pattern kept float",
        ),
        (
            {"modules_in_block_to_quantize": [["self_attn.q_proj"], ["mlp.down_proj"]]},
            "gptq 4-bit, group 32, symmetric, no act-order (desc_act false); per layer: only "
            "modules_in_block_to_quantize quantized",
        ),
    ],
)
def test_info_follows_the_config(int4, tmp_path, capsys, fields, shown) -> None:
    out = tmp_path / "edited"
    out.mkdir()
    for f in int4.iterdir():
        (out / f.name).symlink_to(f)
    for name in ("config.json", "quantize_config.json"):
        data = json.loads((int4 / name).read_text())
        data.get("quantization_config", data).update(fields)
        (out / name).unlink()
        (out / name).write_text(json.dumps(data))
    assert _quantization_line(out, capsys).split(None, 1)[1] == shown
