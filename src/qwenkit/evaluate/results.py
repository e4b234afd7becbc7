"""Results records: the atomic JSON writer, the reproducibility record of a model and of the
environment, and how a standard error is printed."""

from __future__ import annotations

import hashlib
import json
import math
import time
from pathlib import Path
from typing import Any

from qwenkit.checkpoint.files import files_sha256
from qwenkit.checkpoint.output_dir import atomic_file
from qwenkit.tokenizer.named_templates import TOOL_USE

SAMPLES, RESULTS, SETTINGS = "samples.jsonl", "results.json", "settings.json"


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def write_json_atomic(path: Path, data: Any) -> None:
    """Strict JSON (NaN written as null), replaced in one step so a reader never sees half a file."""
    text = json.dumps(_finite(data), indent=2, ensure_ascii=False, allow_nan=False)
    with atomic_file(path) as f:
        f.write(text)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def environment() -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    try:
        qwenkit_version = version("qwenkit")
    except PackageNotFoundError:
        qwenkit_version = "unknown"
    return {
        "qwenkit_version": qwenkit_version,
        "torch_version": torch.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def model_record(
    path: str | Path,
    llm: Any,
    dtype: str,
    quantize: str | None,
    adapter: str | Path | None = None,
    tools: bool = False,
) -> dict[str, Any]:
    """Model identity for the results: a content hash of the weight and config files (and of the LoRA
    adapter's, where one is applied), dtype, quantization, and the hash of the chat templates the run
    renders (``tools``: a run that offers tools, `chat_template_sha256`)."""
    return {
        "backend": "local",
        "model_path": str(Path(path)),
        "model_files_sha256": files_sha256(Path(path)),
        "dtype": str(next(llm.model.parameters()).dtype).replace("torch.", ""),
        "dtype_requested": dtype,
        "quantization": quantize,
        "adapter": files_sha256(Path(adapter)) if adapter else None,
        "adapter_path": str(adapter) if adapter else None,
        "chat_template_sha256": chat_template_sha256(llm.tokenizer, tools),
    }


def chat_template_sha256(tokenizer: Any, tools: bool = False) -> str | None:
    """The hash of the templates a run renders: the default one's alone (as runs have always recorded
    it), and for a run offering ``tools`` on a model with its own "tool_use" template, that one's with
    it, so that a resumed tool-use run notices an edited "tool_use" template. None: no template."""
    default = getattr(tokenizer, "chat_template", None)
    rendered = tokenizer.chat_template_for([]) if tools else default  # tools [] pick "tool_use" too
    if rendered == default:
        return sha256_text(default) if default else None
    return sha256_text(f"{default or ''}\0{TOOL_USE}\0{rendered or ''}")


def known_stderr(stderr: float | None) -> float | None:
    """A standard error, or None where it is not known (one item: none to estimate it from)."""
    return None if stderr is None or math.isnan(stderr) else stderr


def plus_minus(stderr: float | None) -> str:
    """``± 1.23`` (percent), or ``± n/a`` where the standard error is not known."""
    known = known_stderr(stderr)
    return "± n/a" if known is None else f"± {100 * known:.2f}"
