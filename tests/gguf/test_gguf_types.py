"""qwenkit's copy of GGUF's type tables (kept so a start need not import gguf-py) against gguf-py's own."""

from __future__ import annotations

import subprocess
import sys

import gguf
import pytest

from qwenkit.checkpoint import gguf_types


def test_block_types_and_sizes_are_gguf_pys() -> None:
    ours = {t.name: (int(t), gguf_types.GGML_QUANT_SIZES[t]) for t in gguf_types.GGMLQuantizationType}
    theirs = {t.name: (int(t), gguf.GGML_QUANT_SIZES[t]) for t in gguf.GGMLQuantizationType}
    assert ours == theirs


def test_value_types_are_gguf_pys() -> None:
    ours = {t.name: int(t) for t in gguf_types.GGUFValueType}
    assert ours == {t.name: int(t) for t in gguf.GGUFValueType}


@pytest.mark.parametrize("qtype", list(gguf_types.GGMLQuantizationType))
def test_byte_shapes_are_gguf_pys(qtype) -> None:
    block = gguf_types.GGML_QUANT_SIZES[qtype][0]
    shape = (3, 5 * block)
    assert gguf_types.quant_shape_to_byte_shape(shape, qtype) == gguf.quants.quant_shape_to_byte_shape(
        shape, gguf.GGMLQuantizationType(int(qtype))
    )
    if block > 1:
        with pytest.raises(ValueError, match=f"not whole {qtype.name} blocks of {block}"):
            gguf_types.quant_shape_to_byte_shape((3, block + 1), qtype)


def test_opening_and_loading_the_bundled_model_does_not_import_gguf_py() -> None:
    """gguf-py costs 0.2-0.3 s to import; a start reading a GGUF file in its own precision needs none
    of it (the header parser, the block decoders and the tables are qwenkit's)."""
    code = (
        "import sys\n"
        "from qwenkit.checkpoint import load_model, open_checkpoint\n"
        "from qwenkit.default_model import default_model_path\n"
        "from qwenkit.generate import tokenizer_for\n"
        "source = open_checkpoint(default_model_path())\n"
        "tokenizer_for(source).encode('hello')\n"
        "load_model(source, progress=False, fast_kernels=True)\n"
        "print(sorted(m for m in sys.modules if m == 'gguf' or m.startswith('gguf.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
