"""``qwenkit quantize``: a float checkpoint in, an AutoGPTQ-format int4/int8 checkpoint directory out.

    load SRC in float32 -> round float tensors to float16 (what the file will hold) -> tokenize the
    calibration text -> GPTQ layer by layer (or RTN) -> save_gptq + tokenizer files into a temporary
    directory next to OUT_DIR -> rename it to OUT_DIR

Rounding first means the calibration runs on exactly the embeddings, norms and biases the checkpoint
will store, and the returned in-memory model computes exactly what ``load_model(OUT_DIR)`` computes.
``lm_head`` (and the embedding) stay float, as AutoGPTQ writes them.

GPTQ runs with act-order by default (``--no-act-order`` gives Qwen's published ``desc_act: false``).
Calibration defaults are sized for a CPU: 32 windows of 512 tokens of CPython's pydoc topics (about 16k
tokens; a few minutes for a 0.5B model on 2 cores). AutoGPTQ and Qwen's own script use 128 x 2048 on a
GPU; pass ``--calib-samples 128 --seq-len 2048`` for that.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from qwenkit.checkpoint.output_dir import atomic_output_dir, check_out_dir, write_json
from qwenkit.quant.calibration import calibration_token_ids
from qwenkit.quant.checkpoint_io import finalize_quantized_model, save_gptq
from qwenkit.quant.gptq import gptq_quantize_model
from qwenkit.quant.gptq_format import SUPPORTED_BITS, GPTQConfig, QuantizationError
from qwenkit.quant.rtn import quantize_model_rtn

Method = Literal["gptq", "rtn"]
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
# Tokenizer, license and generation files copied from a source directory when present.
SIDE_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "generation_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "qwen.tiktoken",
    "LICENSE",
    "LICENSE.txt",
    "LICENSE.md",
    "NOTICE",
    "NOTICE.txt",
    "NOTICE.md",
)


@dataclass
class QuantizeResult:
    out_dir: Path
    config: GPTQConfig
    method: Method
    calibration_windows: int = 0
    calibration_tokens: int = 0
    seconds: float = 0.0
    kernels: dict[str, int] = field(default_factory=dict)
    files: list[str] = field(default_factory=list)
    model: nn.Module | None = None  # the quantized model, computing exactly what OUT_DIR loads as

    def summary(self) -> str:
        c = self.config
        per_window = self.calibration_tokens // max(self.calibration_windows, 1)
        calib = (
            f", calibrated on {self.calibration_windows} x {per_window} tokens"
            if self.method == "gptq"
            else ""
        )
        group = "per channel" if c.group_size == -1 else f"group {c.group_size}"
        order = ", act-order" if c.desc_act else ""
        return (
            f"wrote {self.out_dir}: {self.method} int{c.bits}, {group}, {'sym' if c.sym else 'asym'}{order}"
            f"{calib} in {self.seconds:.1f} s"
        )


def validate(
    bits: int,
    group_size: int,
    method: str,
    calib_samples: int,
    seq_len: int,
    damp_percent: float,
    act_order: bool = False,
) -> None:
    """Reject bad settings before anything is loaded (each with a one-line message)."""
    if bits not in SUPPORTED_BITS:
        raise QuantizationError(f"--bits {bits} is not supported; choose 4 or 8")
    if group_size != -1 and group_size <= 0:
        raise QuantizationError(f"--group-size {group_size} must be positive, or -1 for one group per row")
    if method not in ("gptq", "rtn"):
        raise QuantizationError(f"--method {method!r} is not supported; choose gptq or rtn")
    if calib_samples <= 0:
        raise QuantizationError(f"--calib-samples {calib_samples} must be positive")
    if seq_len <= 0:
        raise QuantizationError(f"--seq-len {seq_len} must be positive")
    if not 0 < damp_percent < 1:
        raise QuantizationError(f"--damp {damp_percent} must be in (0, 1)")
    if act_order and method != "gptq":
        raise QuantizationError("--act-order reorders GPTQ's columns; it does nothing with --method rtn")


def quantize_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    method: Method = "gptq",
    calib: str | Path | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    act_order: bool | None = None,
    sym: bool = True,
    damp_percent: float = 0.01,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
) -> QuantizeResult:
    """Quantize the checkpoint at ``src`` (directory or .gguf) into an AutoGPTQ directory ``out_dir``.

    ``calib``: a UTF-8 text file for GPTQ calibration (default: CPython's pydoc topics).
    ``calib_samples`` windows of ``seq_len`` tokens are drawn from it. ``act_order`` (GPTQ's desc_act)
    defaults to on for GPTQ: on SmolLM2 it closes 74% of RTN int4's perplexity gap to float, against 44%
    without (``benchmarks/bench_quant_quality.py``), and qwenkit runs act-order checkpoints at full speed
    (columns are regrouped once at load). An existing ``out_dir`` is refused unless ``overwrite``; it is
    replaced only once the new directory is complete.
    """
    from qwenkit.checkpoint import load_model, open_checkpoint
    from qwenkit.config import ModelConfig
    from qwenkit.generate import tokenizer_for

    validate(bits, group_size, method, calib_samples, seq_len, damp_percent, bool(act_order))
    act_order = method == "gptq" if act_order is None else act_order
    src, out = Path(src), Path(out_dir)
    text = _read_calibration(calib) if method == "gptq" and calib is not None else None
    check_out_dir(out, overwrite, source=src)

    start = time.perf_counter()
    source = open_checkpoint(src)
    config = ModelConfig.from_hf(source.hf_config)
    if config.quantization:
        raise QuantizationError(f"{src} is already quantized ({config.quantization.get('quant_method')})")
    qconfig = GPTQConfig(
        bits=bits, group_size=group_size, desc_act=act_order, sym=sym, damp_percent=damp_percent
    )
    tokenizer = tokenizer_for(source) if method == "gptq" else None
    model, _ = load_model(source, dtype="float32", device=device, progress=progress)
    _round_floats(model, torch.float16)
    result = QuantizeResult(out, qconfig, method)

    if method == "gptq":
        windows = calibration_token_ids(tokenizer.encode, calib_samples, seq_len, text)
        if not windows:
            raise QuantizationError("the calibration text produced no tokens")
        result.calibration_windows = len(windows)
        result.calibration_tokens = sum(len(w) for w in windows)
        gptq_quantize_model(model, windows, qconfig, progress=progress)
    else:
        quantize_model_rtn(model, bits, group_size, sym, skip=("lm_head",))
    result.kernels = finalize_quantized_model(model)

    with atomic_output_dir(out, overwrite) as tmp:
        hf_config = {k: v for k, v in source.hf_config.items() if k != "quantization_config"}
        save_gptq(model, tmp, qconfig, hf_config)
        _write_side_files(source, tmp)
        result.files = sorted(p.name for p in tmp.iterdir())
    result.seconds = time.perf_counter() - start
    result.model = model
    return result


def _read_calibration(path: str | Path) -> str:
    p = Path(path)
    if not p.is_file():
        raise QuantizationError(f"calibration file {p} does not exist")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantizationError(f"calibration file {p} is not UTF-8 text") from None
    if not text.strip():
        raise QuantizationError(f"calibration file {p} is empty")
    return text


@torch.no_grad()
def _round_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every float parameter to ``dtype`` in place (values, not storage), refusing overflow."""
    for name, p in model.named_parameters():
        rounded = p.to(dtype)
        if not bool(torch.isfinite(rounded).all()) and bool(torch.isfinite(p).all()):
            raise QuantizationError(
                f"{name} has values beyond {dtype} range; it cannot be stored in a GPTQ file"
            )
        p.copy_(rounded)


def _write_side_files(source, out: Path) -> None:
    """Tokenizer, generation config and license: copied from a directory, generated from a GGUF."""
    from qwenkit.checkpoint.gguf import GGUFCheckpoint

    if isinstance(source, GGUFCheckpoint):
        if "tokenizer.ggml.model" in source.metadata:
            source.tokenizer.save(str(out / "tokenizer.json"))
            write_json(out / "tokenizer_config.json", source.tokenizer_config)
        write_json(out / "generation_config.json", source.generation_config)
        return
    for name in SIDE_FILES:
        f = source.path / name
        if f.is_file():
            shutil.copy(f, out / name)
