"""Weight-only quantization: int8/int4 layers with packed kernels, RTN, GPTQ, and the AutoGPTQ format.

The main line touches this package only through the loader: ``prepare_quantized_model`` (a GPTQ
checkpoint's layers), ``finalize_quantized_model`` and ``quantize_model_rtn`` (``--quantize``).
"""

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
