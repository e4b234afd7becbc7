"""Weight-only quantization: int8/int4 layers with packed kernels, RTN, GPTQ, and the AutoGPTQ format.

The main line touches this package only through the loader: ``prepare_quantized_model`` (a GPTQ
checkpoint's layers), ``finalize_quantized_model`` and ``quantize_model_rtn`` (``--quantize``).

The names below are imported on first use (module ``__getattr__``): a GGUF load imports
``quant.affine`` and the kernels' layers, and importing a submodule runs this file first, so eager
imports here put GPTQ, calibration and the checkpoint writer on every start.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# name -> the submodule that defines it
_EXPORTS = {
    "AffineWeight": "affine",
    "calibration_token_ids": "calibration",
    "default_calibration_text": "calibration",
    "finalize_quantized_model": "checkpoint_io",
    "get_quant_method": "checkpoint_io",
    "prepare_quantized_model": "checkpoint_io",
    "quantized_state_dict": "checkpoint_io",
    "save_gptq": "checkpoint_io",
    "QuantizedEmbedding": "embedding",
    "gptq_quantize_model": "gptq",
    "gptq_quantize_weight": "gptq",
    "GPTQConfig": "gptq_format",
    "IntWeight": "gptq_format",
    "QuantizationError": "gptq_format",
    "pack_gptq": "gptq_format",
    "unpack_gptq": "gptq_format",
    "QuantizedLinear": "linear",
    "choose_kernel": "linear",
    "quantize_for_runtime": "rtn",
    "quantize_model_rtn": "rtn",
    "quantize_weight_rtn": "rtn",
}

__all__ = [
    "AffineWeight",
    "GPTQConfig",
    "IntWeight",
    "QuantizationError",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "calibration_token_ids",
    "choose_kernel",
    "default_calibration_text",
    "finalize_quantized_model",
    "get_quant_method",
    "gptq_quantize_model",
    "gptq_quantize_weight",
    "pack_gptq",
    "prepare_quantized_model",
    "quantize_for_runtime",
    "quantize_model_rtn",
    "quantize_weight_rtn",
    "quantized_state_dict",
    "save_gptq",
    "unpack_gptq",
]

if TYPE_CHECKING:
    from qwenkit.quant.affine import AffineWeight
    from qwenkit.quant.calibration import calibration_token_ids, default_calibration_text
    from qwenkit.quant.checkpoint_io import (
        finalize_quantized_model,
        get_quant_method,
        prepare_quantized_model,
        quantized_state_dict,
        save_gptq,
    )
    from qwenkit.quant.embedding import QuantizedEmbedding
    from qwenkit.quant.gptq import gptq_quantize_model, gptq_quantize_weight
    from qwenkit.quant.gptq_format import GPTQConfig, IntWeight, QuantizationError, pack_gptq, unpack_gptq
    from qwenkit.quant.linear import QuantizedLinear, choose_kernel
    from qwenkit.quant.rtn import quantize_for_runtime, quantize_model_rtn, quantize_weight_rtn


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value  # once found, an ordinary attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
