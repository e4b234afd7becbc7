"""`load_tokenizer(model_dir)`: pick the backend from the files present and read the JSON configs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import tokenizers

from qwenkit.tokenizer.base import Tokenizer
from qwenkit.tokenizer.errors import TokenizerError
from qwenkit.tokenizer.hf import HFTokenizer
from qwenkit.tokenizer.named_templates import template_files
from qwenkit.tokenizer.qwen_v1 import QwenV1Tokenizer

TOKENIZER_FILES = ("tokenizer.json", "qwen.tiktoken")


def read_json(path: Path, *, required: bool = False) -> dict[str, Any]:
    """A JSON object file; {} when absent and not required; one-line TokenizerError when unreadable."""
    if not path.is_file():
        if required:
            raise TokenizerError(f"{path} not found")
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"cannot read {path}: {e}") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object")
    return data


def check_generation_config(path: Path, data: dict[str, Any]) -> None:
    """Refuse, naming the file and key, a sampling default or eos id of the wrong type: it surfaced as
    'temperature must be a number' (for an option never passed), and a string eos id was dropped, so
    generation ran past the model's end. null is unset, as transformers reads it."""

    def number(v: Any) -> bool:
        return isinstance(v, int | float) and not isinstance(v, bool)

    def whole(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    kinds = {
        "do_sample": (lambda v: isinstance(v, bool), "true or false"),
        "temperature": (number, "a number"),
        "top_p": (number, "a number"),
        "min_p": (number, "a number"),
        "repetition_penalty": (number, "a number"),
        "top_k": (whole, "a whole number"),
        "max_new_tokens": (whole, "a whole number"),
        "eos_token_id": (
            lambda v: whole(v) or (isinstance(v, list) and all(whole(i) for i in v)),
            "a token id or a list of them",
        ),
    }
    for key, (ok, what) in kinds.items():
        value = data.get(key)
        if value is not None and not ok(value):
            raise TokenizerError(f"{path}: {key} must be {what}, not {value!r}")


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a model directory.

    `tokenizer.json` (Qwen1.5 and later) wins over `qwen.tiktoken` (Qwen v1); tokenizer_config.json
    supplies the chat templates (chat_template.jinja's and additional_chat_templates/', where present)
    and eos, generation_config.json the eos ids and sampling defaults.
    """
    model_dir = Path(path)
    if not model_dir.is_dir():
        raise TokenizerError(
            f"{model_dir} is not a directory (expected a model directory with tokenizer files)"
        )
    config = read_json(model_dir / "tokenizer_config.json")
    # where transformers 5 saves the templates (chat_template.jinja, additional_chat_templates/), and reads
    # them in place of the config's
    templates = template_files(model_dir)
    if templates is not None:
        config = {**config, "chat_template": templates}
    generation_file = model_dir / "generation_config.json"
    generation = read_json(generation_file) if generation_file.is_file() else None
    if generation is not None:
        check_generation_config(generation_file, generation)
    hf_file, tiktoken_file = (model_dir / name for name in TOKENIZER_FILES)
    if hf_file.is_file():
        try:
            backend = tokenizers.Tokenizer.from_file(str(hf_file))
        except Exception as e:  # the Rust side raises plain Exception for every parse problem
            first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise TokenizerError(f"cannot read {hf_file}: {first_line}") from None
        return HFTokenizer(backend, config, generation)
    if tiktoken_file.is_file():
        return QwenV1Tokenizer.from_file(tiktoken_file, config, generation)
    raise TokenizerError(f"no tokenizer in {model_dir}: looked for {' or '.join(TOKENIZER_FILES)}")
