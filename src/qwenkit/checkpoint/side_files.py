"""The files a model directory made from another model keeps beside its weights: tokenizer, generation
settings and license.

Every command that writes a model (``convert --to hf``, ``quantize``, ``merge``, full ``finetune``) goes
through here, so what one of them keeps the others keep too: a directory made from a GGUF file gets the
tokenizer, the sampling the file ran with and its ``general.license`` (as a model card's front matter),
and one made from a directory gets that directory's tokenizer (named chat templates included),
generation, sparse-attention and license files, byte for byte, or a model card naming the license its own
card names.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from qwenkit.checkpoint.gguf import GGUFCheckpoint, generation_config_to_save
from qwenkit.checkpoint.output_dir import write_json
from qwenkit.license import LICENSE_FILES, find_license
from qwenkit.tokenizer.named_templates import TEMPLATE_DIR as CHAT_TEMPLATE_DIR

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "qwen.tiktoken",
    "generation_config.json",
)
# a sentence-transformers model's (Qwen3-Embedding): how its embeddings are pooled, with the module
# folders modules.json names (1_Pooling, 2_Normalize), read by ``qwenkit.embedding``
SENTENCE_TRANSFORMERS_FILES = (
    "modules.json",
    "config_sentence_transformers.json",
    "sentence_bert_config.json",
)
# Qwen2.5-1M's sparse attention patterns, which vLLM reads beside config.json's dual_chunk_attention_config:
# kept, though qwenkit runs full attention (``sparse_attention_note``)
SPARSE_ATTENTION_FILE = "sparse_attention_config.json"


def model_card(license_id: str, note: str, named_other: bool = False) -> str:
    """A model card whose front matter carries ``license_id``, where Hugging Face tools (and ``qwenkit
    info``) read a directory's license; ``note`` says where the model came from. ``named_other``: as
    the source card named it, ``license: other`` with ``license_id`` as its ``license_name``."""
    bare = re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9.+-]*", license_id)
    value = license_id if bare else json.dumps(license_id)
    lines = f"license: other\nlicense_name: {value}" if named_other else f"license: {value}"
    return f"---\n{lines}\n---\n\n{note}\n"


def write_side_files(source: Any, out: Path, made_by: str) -> None:
    """Write into ``out`` the tokenizer, generation and license files of ``source`` (an opened checkpoint:
    a GGUF file or a directory). ``made_by`` says what made it ("`qwenkit merge`"), for the model card
    a license needs."""
    if isinstance(source, GGUFCheckpoint):
        if "tokenizer.ggml.model" in source.metadata:
            source.tokenizer.save(str(out / "tokenizer.json"))
            write_json(out / "tokenizer_config.json", source.tokenizer_config)
        write_json(out / "generation_config.json", generation_config_to_save(source))
        if source.pooling_type is not None:  # an embedding model: its pooling, as ``qwenkit.embedding`` reads
            from qwenkit.embedding import sentence_transformers_files

            hidden = source.hf_config["hidden_size"]
            for name, value in sentence_transformers_files(source.pooling_type, hidden).items():
                (out / name).parent.mkdir(exist_ok=True)
                write_json(out / name, value)
        if source.license:
            note = (
                f"Made from `{source.path.name}` by {made_by} (weights dequantized from the GGUF). "
                "The license above is the one the GGUF file's metadata names."
            )
            (out / "README.md").write_text(model_card(source.license, note), encoding="utf-8")
        return
    src = Path(source.path)
    for name in (*TOKENIZER_FILES, SPARSE_ATTENTION_FILE, *SENTENCE_TRANSFORMERS_FILES, *LICENSE_FILES):
        if (src / name).is_file():
            shutil.copy(src / name, out / name)
    for folder in _module_folders(src):
        shutil.copytree(src / folder, out / folder, dirs_exist_ok=True)
    templates = (
        sorted((src / CHAT_TEMPLATE_DIR).glob("*.jinja")) if (src / CHAT_TEMPLATE_DIR).is_dir() else []
    )
    for template in templates:
        (out / CHAT_TEMPLATE_DIR).mkdir(exist_ok=True)
        shutil.copy(template, out / CHAT_TEMPLATE_DIR / template.name)
    found = find_license(src)
    if found is not None and found.source == "README.md":  # a card's front matter only: keep its license
        note = f"Made from `{src.name}` by {made_by}. The license above is the one its model card names."
        (out / "README.md").write_text(model_card(found.name, note, found.named_other), encoding="utf-8")


def _module_folders(src: Path) -> list[str]:
    """The folders of a sentence-transformers model's modules (``1_Pooling``), as its modules.json names
    them: plain names inside ``src`` only."""
    try:
        modules = json.loads((src / "modules.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    paths = [m.get("path") for m in modules if isinstance(m, dict)] if isinstance(modules, list) else []
    return [p for p in paths if isinstance(p, str) and re.fullmatch(r"[\w.-]+", p) and (src / p).is_dir()]


def sparse_attention_note(path: str | Path) -> str | None:
    """The line a command says for a directory's sparse_attention_config.json, which qwenkit does not
    run (vLLM runs it within dual-chunk attention); None where there is none."""
    if not Path(path).is_dir() or not (Path(path) / SPARSE_ATTENTION_FILE).is_file():
        return None
    return (
        f"{SPARSE_ATTENTION_FILE} (the sparse attention vLLM runs within dual-chunk attention) is not "
        "implemented: it is ignored and full attention runs over every position"
    )
