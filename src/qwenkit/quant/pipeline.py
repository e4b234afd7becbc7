"""``qwenkit quantize``: a float checkpoint in, an AutoGPTQ-format int4/int8 checkpoint directory out.

    load SRC in float32 -> round float tensors to float16 (what the file will hold) -> tokenize the
    calibration text -> GPTQ layer by layer (or RTN) -> save_gptq + tokenizer files into a temporary
    directory next to OUT_DIR -> rename it to OUT_DIR

Rounding first means the calibration runs on exactly the embeddings, norms and biases the checkpoint
will store, and the returned in-memory model computes exactly what ``load_model(OUT_DIR)`` computes.
``lm_head`` (and the embedding) stay float, as AutoGPTQ writes them.

GPTQ runs with static act-order by default: columns visited by activation size, groups kept in file
order, so the file is a plain ``desc_act: false`` checkpoint every reader loads (``--act-order dynamic``
writes AutoGPTQ's ``desc_act: true`` form, which vLLM refuses). The group size is one that tiles every
quantized layer (see :mod:`qwenkit.quant.group_size`).
Calibration defaults are sized for a CPU: 32 windows of 512 tokens of CPython's pydoc topics (about 16k
tokens; a few minutes for a 0.5B model on 2 cores). AutoGPTQ and Qwen's own script use 128 x 2048 on a
GPU; pass ``--calib-samples 128 --seq-len 2048`` for that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from qwenkit.checkpoint.output_dir import atomic_output_dir, check_out_dir
from qwenkit.paths import not_a_file
from qwenkit.quant.calibration import CalibrationTokenizer, calibration_token_ids
from qwenkit.quant.checkpoint_io import NOT_QUANTIZED, finalize_quantized_model, save_gptq
from qwenkit.quant.gptq import gptq_quantize_model
from qwenkit.quant.gptq_format import ACT_ORDERS, SUPPORTED_BITS, ActOrder, GPTQConfig, QuantizationError
from qwenkit.quant.group_size import GroupChoice, choose_group_size, per_row_int4_note, reader_size_note
from qwenkit.quant.rtn import quantize_model_rtn

Method = Literal["gptq", "rtn"]
DEFAULT_CALIB_SAMPLES = 32
DEFAULT_SEQ_LEN = 512
DEFAULT_DAMP = 0.01  # AutoGPTQ's damp_percent
DEFAULT_ACT_ORDER: ActOrder = "static"
DYNAMIC_ACT_ORDER_WARNING = (
    "--act-order dynamic stores desc_act: true with a permuted g_idx, which vLLM refuses; "
    "--act-order static (the default) keeps its quality and loads in every reader"
)

# transformers 5.25 with optimum and GPTQModel 7.6 (the readers table of the README): a MoE layer's routed
# experts are 3-D parameters there, which a file's per-expert GPTQ tensors never fill.
MOE_READERS_NOTE = (
    "transformers (with optimum and GPTQModel) does not load a mixture-of-experts GPTQ checkpoint: its "
    "experts are stacked parameters, which it leaves randomly initialized with only a warning; qwenkit "
    "loads it"
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
    group: GroupChoice | None = None  # the group size used, and the layers that forced a change
    notes: list[str] = field(default_factory=list)  # what the user should know (group size, readers)
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
        order = f", {c.act_order} act-order" if self.method == "gptq" and c.act_order != "none" else ""
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
    act_order: str | None = None,
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
    if act_order is not None and act_order not in ACT_ORDERS:
        raise QuantizationError(f"--act-order {act_order!r} is not supported; choose static, dynamic or none")
    if act_order not in (None, "none") and method != "gptq":
        raise QuantizationError("--act-order reorders GPTQ's columns; it does nothing with --method rtn")


def quantize_checkpoint(
    src: str | Path,
    out_dir: str | Path,
    *,
    bits: int = 4,
    group_size: int = 128,
    method: Method = "gptq",
    tokenizer: Callable[[], CalibrationTokenizer] | None = None,
    calib: str | Path | None = None,
    calib_samples: int = DEFAULT_CALIB_SAMPLES,
    seq_len: int = DEFAULT_SEQ_LEN,
    act_order: ActOrder | None = None,
    partial_groups: bool = False,
    sym: bool = True,
    damp_percent: float = DEFAULT_DAMP,
    overwrite: bool = False,
    device: str = "cpu",
    progress: bool = True,
    report: Callable[[str], None] | None = None,
) -> QuantizeResult:
    """Quantize the checkpoint at ``src`` (directory or .gguf) into an AutoGPTQ directory ``out_dir``.

    ``tokenizer``: loads the checkpoint's tokenizer, which GPTQ calibration needs (called once the source
    is checked); the caller brings it (``lambda: qwenkit.generate.tokenizer_for(src)``), so quantization
    drives the model directly and never climbs to the user-level API. Each calibration window starts
    with the ids the tokenizer puts before a prompt (Llama's BOS), as at inference.
    ``calib``: a UTF-8 text file for GPTQ calibration (default: CPython's pydoc topics).
    ``calib_samples`` windows of ``seq_len`` tokens are drawn from it. ``act_order`` defaults to
    "static" for GPTQ: on SmolLM2 act-order closes 74% of RTN int4's perplexity gap to float, against 44%
    without (``benchmarks/bench_quant_quality.py``), and static groups keep the file loadable by vLLM.
    ``group_size`` falls back to one that tiles every layer unless ``partial_groups``
    (:func:`qwenkit.quant.group_size.choose_group_size`). ``report`` gets each note as it arises (the
    CLI prints them); they are also in the result. An existing ``out_dir`` is refused unless
    ``overwrite``; it is replaced only once the new directory is complete.
    """
    from qwenkit.checkpoint import load_model, open_checkpoint
    from qwenkit.checkpoint.gguf_rank import refuse_rank
    from qwenkit.config import ModelConfig

    validate(bits, group_size, method, calib_samples, seq_len, damp_percent, act_order)
    if calib is not None and method != "gptq":  # else the text was read by nothing, and nothing said so
        raise QuantizationError("--calib is GPTQ's calibration text; --method rtn reads none (drop --calib)")
    if method == "gptq" and tokenizer is None:
        raise QuantizationError("GPTQ calibration needs the model's tokenizer: pass tokenizer=a loader of it")
    if act_order is None:
        act_order = DEFAULT_ACT_ORDER if method == "gptq" else "none"
    notes: list[str] = []

    def note(text: str) -> None:
        notes.append(text)
        if report is not None:
            report(text)

    if act_order == "dynamic":
        note(DYNAMIC_ACT_ORDER_WARNING)
    src, out = Path(src), Path(out_dir)
    text = _read_calibration(calib) if method == "gptq" and calib is not None else None
    for source in (src, calib):  # --overwrite replaces OUT, never an input inside it (the --calib text)
        if source is not None:
            check_out_dir(out, overwrite, source=Path(source))

    start = time.perf_counter()
    source = open_checkpoint(src)
    refuse_rank(source, "a GPTQ causal LM's directory")
    config = ModelConfig.from_hf(source.hf_config)
    if config.quantization:
        raise QuantizationError(f"{src} is already quantized ({config.quantization.get('quant_method')})")
    if config.family == "qwen":  # the tensors come out in qwen2 names, which v1's config and code do not read
        raise QuantizationError(
            f"{src} is a Qwen v1 checkpoint: convert it to the Qwen1.5 layout first "
            f"(qwenkit convert {src} OUT), then quantize OUT"
        )
    widths = _linear_widths(config, bits)
    group = choose_group_size(widths, group_size, partial_groups)
    per_row = per_row_int4_note(widths) if bits == 4 and group_size == -1 else None
    moe = MOE_READERS_NOTE if config.num_sparse_layers else None
    for message in (group.note(), reader_size_note(group), per_row, moe):
        if message:  # not `text`: that is the calibration text (once reused here, --calib was ignored)
            note(message)
    if method == "gptq" and seq_len > config.max_context:
        note(
            f"--seq-len {seq_len} is past the model's own context of {config.max_context} tokens: the layers "
            "are calibrated on activations of positions it was never trained on"
        )
    qconfig = GPTQConfig(
        bits=bits, group_size=group.group_size, act_order=act_order, sym=sym, damp_percent=damp_percent
    )
    windows: list[list[int]] = []
    if method == "gptq":  # before the weights load: a missing tokenizer fails in seconds, not minutes
        tok = tokenizer()
        start_ids = tok.sequence_special_ids[0]
        if seq_len <= len(start_ids):
            raise QuantizationError(
                f"--seq-len {seq_len} leaves no room for text after the {len(start_ids)} token(s) "
                "the tokenizer puts before every prompt"
            )

        # a --calib text is the user's own, often chat transcripts in the model's template (Qwen's GPTQ
        # guide writes apply_chat_template's text): its <|im_start|> is that token, as transformers'
        # tokenizer(text) reads it and as chat inference feeds it, not seven pieces of plain text
        def encode(text: str) -> list[int]:
            return tok.encode(text, allow_special=calib is not None)

        windows = calibration_token_ids(encode, calib_samples, seq_len, text, start_ids=start_ids)
        if not windows:
            raise QuantizationError("the calibration text produced no tokens")
        if len(windows) < calib_samples:
            tokens = sum(len(w) - len(start_ids) for w in windows)  # all of the text's, each window's once
            note(
                f"the calibration text holds {tokens} tokens: {len(windows)} window(s) of at most "
                f"{seq_len}, not the {calib_samples} asked for (a longer --calib text, or a smaller "
                "--seq-len, gives more)"
            )
        top = max(max(w) for w in windows)
        if top >= config.vocab_size:  # else the embedding lookup fails mid-calibration with an IndexError
            raise QuantizationError(
                f"the tokenizer of {src} gives token id {top}, beyond the model's vocab_size "
                f"{config.vocab_size}: the tokenizer files do not belong to this model"
            )
    model, _ = load_model(source, dtype="float32", device=device, progress=progress, dequantize=True)
    _round_floats(model, torch.float16)
    result = QuantizeResult(out, qconfig, method, group=group, notes=notes)

    if method == "gptq":
        result.calibration_windows = len(windows)
        result.calibration_tokens = sum(len(w) for w in windows)
        gptq_quantize_model(model, windows, qconfig, progress=progress, skip=NOT_QUANTIZED)
    else:
        quantize_model_rtn(model, bits, qconfig.group_size, sym, skip=NOT_QUANTIZED)
    result.kernels = finalize_quantized_model(model)

    with atomic_output_dir(out, overwrite) as tmp:
        hf_config = {k: v for k, v in source.hf_config.items() if k != "quantization_config"}
        if getattr(source, "headless", False):  # an embedding GGUF's: no head, none tied (gguf)
            hf_config["tie_word_embeddings"] = False
        save_gptq(model, tmp, qconfig, hf_config)
        from qwenkit.checkpoint.side_files import write_side_files

        write_side_files(source, tmp, "`qwenkit quantize`")
        result.files = sorted(p.name for p in tmp.iterdir())
    result.seconds = time.perf_counter() - start
    result.model = model
    return result


def _linear_widths(config, bits: int) -> dict[str, int]:
    """Input width of every Linear that will be quantized, from the model built on the meta device.

    A width the AutoGPTQ words cannot pack (qweight packs inputs, qzeros outputs, 32 // bits a word) is
    refused here, naming the layer, rather than when the file is written after all the work."""
    from qwenkit.model import Transformer

    with torch.device("meta"):
        model = Transformer(config)
    linears = {
        name: m
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] not in NOT_QUANTIZED
    }
    per_word = 32 // bits
    for name, m in linears.items():
        for count, what in ((m.in_features, "inputs"), (m.out_features, "outputs")):
            if count % per_word:
                hint = "; --bits 8 packs it" if bits == 4 and count % 4 == 0 else ""
                raise QuantizationError(
                    f"{name} has {count} {what}, which {bits}-bit GPTQ words cannot pack (a multiple of "
                    f"{per_word} is needed){hint}"
                )
    return {name: m.in_features for name, m in linears.items()}


def _read_calibration(path: str | Path) -> str:
    p = Path(path)
    if p.is_dir():  # "does not exist" would send the user looking for a path that is there
        raise QuantizationError(f"calibration file {p} is a directory; pass a UTF-8 text file")
    if (why := not_a_file(p)) is not None:
        raise QuantizationError(f"calibration file {p} {why}")
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise QuantizationError(f"calibration file {p} is not UTF-8 text") from None
    if not text.strip():
        raise QuantizationError(f"calibration file {p} is empty")
    return text


@torch.no_grad()
def _round_floats(model: nn.Module, dtype: torch.dtype) -> None:
    """Round every float parameter to ``dtype`` in place (values, not storage), refusing overflow and a
    source that already holds NaN/inf (GPTQ's Cholesky then fails with a traceback, RTN writes it on)."""
    for name, p in model.named_parameters():
        if not bool(torch.isfinite(p).all()):
            raise QuantizationError(f"{name} holds NaN or infinite values; the source checkpoint is corrupt")
        rounded = p.to(dtype)
        if not bool(torch.isfinite(rounded).all()):
            raise QuantizationError(
                f"{name} has values beyond {dtype} range; it cannot be stored in a GPTQ file"
            )
        p.copy_(rounded)
