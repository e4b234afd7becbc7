"""Read a llama.cpp GGUF file as a Hugging Face checkpoint: config dict, lazy float32 tensors, tokenizer.

    ckpt = read_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")
    ckpt.hf_config            # what config.json would say
    for name, w in ckpt.tensors(): ...   # "model.layers.0.self_attn.q_proj.weight", float32
    ckpt.tokenizer            # tokenizers.Tokenizer, ids equal to transformers' GGUF tokenizer

Everything a GGUF does differently from a Hugging Face checkpoint (names, quantized blocks, llama's q/k
row permutation, Qwen v1's fused QKV, metadata instead of config.json) is undone here, so the loader
sees the same names and layout as from safetensors. Problems with the file are found when it is opened,
before any weight is decoded, and reported as ``GGUFError`` with a one-line message naming the file.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from qwenkit import kernels
from qwenkit.checkpoint import gguf_quant
from qwenkit.checkpoint.files import release_pages
from qwenkit.checkpoint.gguf_config import ARCHITECTURES, build_hf_config
from qwenkit.checkpoint.gguf_index import GGUFHeaderError, GGUFIndex, TensorEntry, read_index
from qwenkit.checkpoint.gguf_quant import (
    AFFINE_BITS,
    REQUANTIZED,
    REQUANTIZED_BITS,
    can_decode,
    decode_affine,
    decode_q6_k,
    requantize_int8,
    requantize_q6_k,
)
from qwenkit.checkpoint.gguf_rank import label_ids
from qwenkit.checkpoint.gguf_split import SplitError, join_parts, split_count
from qwenkit.checkpoint.gguf_tensors import (
    SUPPORTED_TYPES,
    HeadLayout,
    convert_affine,
    convert_tensor,
    dequantize_tensor,
    hf_name,
    is_stacked,
    keeps_precision,
    split_names,
)
from qwenkit.checkpoint.gguf_tokenizer import (
    GGUFVocab,
    TokenizerMetadataError,
    build_tokenizer,
    build_tokenizer_config,
)
from qwenkit.checkpoint.gguf_types import GGMLQuantizationType, quant_shape_to_byte_shape
from qwenkit.errors import CheckpointError
from qwenkit.quant.affine import AffineWeight

ROPE_FREQS = "rope_freqs.weight"


class GGUFError(CheckpointError):
    """A GGUF file that is not one, is cut short, or holds a model or type qwenkit does not read."""


class GGUFCheckpoint:
    """An opened GGUF file. Metadata is read at open; tensors are decoded one at a time on demand.

    Satisfies the loader's ``CheckpointSource`` protocol (``path``, ``hf_config``, ``tensors()``,
    ``total_bytes``). A model split into parts (``gguf_split``) is opened by its first part, ``path``;
    ``parts`` lists every part's file, each memory-mapped on its own.
    """

    def __init__(self, path: Path, index: GGUFIndex, parts: list[Path] | None = None) -> None:
        self.path = path
        self.parts = parts or [path]
        # Copy-on-write: tensors can be handed to torch without a copy, and writes never reach the file.
        self._maps = [np.memmap(part, mode="c") for part in self.parts]
        self.metadata = metadata = index.metadata
        self.architecture: str = metadata["general.architecture"]
        self.license: str | None = metadata.get("general.license")
        self.tensor_types: dict[str, str] = {t.name: t.tensor_type.name for t in index.tensors}
        # Llama 3.1's rope scaling as llama.cpp writes it: divisors of the frequencies, not weights
        freqs = [t for t in index.tensors if t.name == ROPE_FREQS]
        self._tensors = [t for t in index.tensors if t.name != ROPE_FREQS]
        self.tensor_shapes = shapes = {t.name: t.shape for t in self._tensors}  # GGUF names, (out, in)
        self.embedding_shape: tuple[int, ...] = tuple(shapes["token_embd.weight"])  # (vocab, hidden)
        if freqs and freqs[0].tensor_type not in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
            kind = freqs[0].tensor_type.name
            raise GGUFError(f"{path}: {ROPE_FREQS} is {kind}; llama.cpp writes it as F32")
        rope_freqs = np.array(self._data(freqs[0]), dtype=np.float64) if freqs else None
        try:
            self.hf_config: dict[str, Any] = build_hf_config(self.architecture, metadata, shapes, rope_freqs)
        except KeyError as e:
            raise GGUFError(f"{path}: missing metadata key {e.args[0]!r}") from None
        except ValueError as e:
            raise GGUFError(f"{path}: {e}") from None
        self._heads = HeadLayout(
            self.architecture, self.hf_config["num_attention_heads"], self.hf_config["num_key_value_heads"]
        )
        # An embedding model (llama.cpp's converter writes {arch}.pooling_type from its sentence-transformers
        # Pooling) with no output.weight: the file cannot say whether its source tied a head to the
        # embeddings or had none (Qwen3-Embedding-8B), so it computes embeddings only (``MissingHead``).
        self.pooling_type: object = metadata.get(f"{self.architecture}.pooling_type")
        self.headless = self.pooling_type is not None and "output.weight" not in shapes
        try:  # a reranker's (pooling rank): the vocabulary ids its cls.output rows stand for ("yes", "no")
            self.rank_token_ids = label_ids(metadata, shapes, self.architecture)
        except ValueError as e:
            raise GGUFError(f"{path}: {e}") from None

    def __repr__(self) -> str:
        return f"GGUFCheckpoint({str(self.path)!r}, architecture={self.architecture!r})"

    # ---- weights -----------------------------------------------------------------------------------

    def tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor | AffineWeight]]:
        """Yield ``(hugging_face_name, tensor)`` in file order, decoding one tensor at a time.

        Tensors are float32, except with ``keep_quantized``: then a projection or embedding weight whose
        block type maps exactly onto integer codes (``gguf_quant``) comes as an ``AffineWeight``, for
        the loader to run in the file's own precision, Q6_K exactly where its kernel runs, and otherwise
        one in a type with groups of 16 (Q6_K, Q2_K, Q3_K) as int8 codes rounded again from its floats
        (``gguf_quant.requantize_int8``). A MoE layer's stacked routed experts come as one weight per
        expert (``mlp.experts.{e}.gate_proj.weight``), in codes or floats alike. A tied model yields no
        ``lm_head.weight`` (``hf_config["tie_word_embeddings"]`` says so), as its Hugging Face safetensors
        would not. F32 tensors are copy-on-write views of the file.
        """
        for t in self._tensors:
            name = hf_name(t.name, self.architecture)
            assert name is not None  # checked when the file was opened
            shape, matrix = t.shape, _matrix_shape(name, t.shape)
            try:
                if not (keep_quantized and _loads_as_codes(name, t.tensor_type, matrix)):
                    weights = dequantize_tensor(self._data(t), t.tensor_type, shape)
                    yield from convert_tensor(name, weights, self._heads)
                elif not is_stacked(name):
                    yield from convert_affine(name, _codes(t.tensor_type, self._bytes(t), shape), self._heads)
                else:  # stacked experts: one expert's rows of blocks at a time, each its own layer
                    raw, experts = self._bytes(t), split_names(name, shape)
                    step = t.n_bytes // len(experts)
                    for e, expert in enumerate(experts):
                        codes = _codes(t.tensor_type, raw[e * step : (e + 1) * step], matrix)
                        yield from convert_affine(expert, codes, self._heads)
            except ValueError as e:
                raise GGUFError(f"{self.path}: {e}") from None

    def _bytes(self, t: TensorEntry) -> np.ndarray:
        """The tensor's raw bytes, a view of the memory map."""
        return self._maps[t.part][t.offset : t.offset + t.n_bytes]

    def _data(self, t: TensorEntry) -> np.ndarray:
        """The tensor as gguf-py's reader lays it out: float arrays, or rows of block bytes."""
        raw = self._bytes(t)
        if t.tensor_type == GGMLQuantizationType.F32:
            return raw.view(np.float32).reshape(t.shape)
        if t.tensor_type == GGMLQuantizationType.F16:
            return raw.view(np.float16).reshape(t.shape)
        return raw.reshape(quant_shape_to_byte_shape(t.shape, t.tensor_type))

    def runtime_bytes(self, dtype_size: int, keep_quantized: bool) -> int:
        """Bytes the weights take once loaded: float tensors at ``dtype_size`` bytes per weight, integer
        codes at their width plus a float32 scale and shift per group of 32 (what ``check_fits`` needs)."""
        total = 0
        for t in self._tensors:
            name, shape = hf_name(t.name, self.architecture), t.shape
            n, matrix = int(np.prod(shape, dtype=np.int64)), _matrix_shape(name, shape)
            if keep_quantized and _in_precision(name, t.tensor_type, matrix):
                total += n * AFFINE_BITS[t.tensor_type] // 8 + n // 32 * 8
            elif keep_quantized and _requantized(name, t.tensor_type, matrix):
                total += n * REQUANTIZED_BITS // 8 + n // 32 * 8
            else:
                total += n * dtype_size
        return total

    def tensor_names(self) -> list[str]:
        """The Hugging Face names ``tensors()`` yields, without decoding anything."""
        names: list[str] = []
        for t in self._tensors:
            name = hf_name(t.name, self.architecture)
            assert name is not None
            names += split_names(name, t.shape)
        return names

    @property
    def stored_bytes(self) -> int:
        """The tensors' bytes in the file, in their own block formats."""
        return sum(t.n_bytes for t in self._tensors)

    @property
    def total_bytes(self) -> int:
        """Bytes of float32 that ``tensors()`` yields (what the loader's progress bar counts)."""
        return sum(int(np.prod(t.shape, dtype=np.int64)) * 4 for t in self._tensors)

    # ---- tokenizer ---------------------------------------------------------------------------------

    @cached_property
    def _vocab(self) -> GGUFVocab:
        try:
            return GGUFVocab.from_metadata(self.metadata)
        except TokenizerMetadataError as e:
            raise GGUFError(f"{self.path}: {e}") from None

    @cached_property
    def tokenizer(self) -> Tokenizer:
        """The file's byte-level BPE tokenizer (ids match transformers loading this GGUF)."""
        vocab = self._vocab
        try:
            return build_tokenizer(vocab)
        except TokenizerMetadataError as e:
            raise GGUFError(f"{self.path}: {e}") from None

    @cached_property
    def tokenizer_config(self) -> dict[str, Any]:
        """``tokenizer_config.json`` dict: special tokens, chat template, added tokens."""
        return build_tokenizer_config(self._vocab, self.tokenizer, self.hf_config["max_position_embeddings"])

    @property
    def chat_template(self) -> str | None:
        """The Jinja chat template the file carries, if any."""
        return self.metadata.get("tokenizer.chat_template")

    @property
    def end_of_generation_ids(self) -> tuple[int, ...]:
        """The ids a generation ends on, as llama.cpp reads the file: its eos (first), eot and eom ids and
        every token spelled as an end of generation (Llama 3's <|eom_id|> and <|end_of_text|> beside the
        <|eot_id|> its files name)."""
        return self._vocab.end_of_generation_ids

    @property
    def generation_config(self) -> dict[str, Any]:
        """``generation_config.json`` dict: the special ids generation stops (all of
        ``end_of_generation_ids``) and pads with."""
        config = {
            k: self.hf_config[k]
            for k in ("bos_token_id", "eos_token_id", "pad_token_id")
            if k in self.hf_config
        }
        ends = list(self.end_of_generation_ids)
        if len(ends) > 1:
            config["eos_token_id"] = ends
        return config

    @property
    def named_sampling(self) -> dict[str, Any]:
        """The sampling settings the file names (``general.sampling.*``) under generation_config.json's
        names, each float32 rounded back to the decimal llama.cpp's converter read (0.800000011920929 is
        0.8)."""
        named = {}
        for key, hf in SAMPLING_KEYS.items():
            v = self.metadata.get(key)
            if v is None:
                continue
            whole = isinstance(v, int) and not isinstance(v, bool)
            if not (whole or (isinstance(v, float) and hf != "top_k")):  # as the file would be refused
                what = "a whole number" if hf == "top_k" else "a number"
                raise GGUFError(f"{self.path}: {key} must be {what}, not {v!r}")
            named[hf] = float(f"{v:.7g}") if isinstance(v, float) else v
        return named

    @property
    def sampling_config(self) -> dict[str, Any] | None:
        """generation_config.json's sampling keys for the sampling the file names: the model's defaults,
        as llama.cpp samples with them and as a directory's generation_config.json is read; None where
        it names none. What it leaves out is off or transformers' default, as in such a file (``top_k``
        0: llama.cpp's converter writes it only where the source named one)."""
        named = self.named_sampling
        return {"do_sample": True, "top_k": 0, **named} if named else None


# llama.cpp's sampling keys (convert_hf_to_gguf.py writes them from generation_config.json; llama.cpp
# samples with them) -> generation_config.json's names, as that converter maps them the other way
SAMPLING_KEYS = {
    "general.sampling.temp": "temperature",
    "general.sampling.top_p": "top_p",
    "general.sampling.top_k": "top_k",
    "general.sampling.min_p": "min_p",
    "general.sampling.penalty_repeat": "repetition_penalty",
}


def generation_config_to_save(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    """generation_config.json for a directory made from a GGUF file: its special ids and the sampling the
    file runs with (a config without ``do_sample`` would make the directory decode greedily, as
    transformers reads it, where the file sampled). A file that names its sampling (``general.sampling.*``,
    which llama.cpp's converter writes from the source's generation_config.json) gets exactly that back;
    one that names none gets the sampling qwenkit runs it with."""
    from qwenkit.default_model import sampling_without_config

    named = ckpt.sampling_config
    if named is not None:
        return {**ckpt.generation_config, **named}
    out: dict[str, Any] = {**ckpt.generation_config, "do_sample": True, "top_k": 0}  # 0: off, as unset here
    sampling = sampling_without_config(ckpt.path)
    for key in ("temperature", "top_p", "top_k", "repetition_penalty"):
        if key in sampling:
            out[key] = sampling[key]
    if "max_tokens" in sampling:
        out["max_new_tokens"] = sampling["max_tokens"]
    return out


def read_gguf(path: str | Path) -> GGUFCheckpoint:
    """Open a GGUF file and check it can be read: magic, completeness, architecture, tensor types. The
    first part of a model split by llama-gguf-split opens the whole model (``gguf_split``).

    Raises ``GGUFError`` naming the file and the problem.
    """
    p = Path(path)
    if not p.is_file():
        raise GGUFError(f"{p}: no such file")
    try:
        index = read_index(p)
    except GGUFHeaderError as e:
        raise GGUFError(f"{p}: {e}") from e
    parts = [p]
    if split_count(index.metadata) > 1:  # llama-gguf-split's parts: only the first holds the metadata
        try:
            index, parts = join_parts(p, index)
        except SplitError as e:
            raise GGUFError(str(e)) from None
    sizes = [part.stat().st_size for part in parts]
    for t in index.tensors:
        if t.offset + t.n_bytes > sizes[t.part]:
            raise GGUFError(
                f"{parts[t.part]}: truncated GGUF file: tensor {t.name} ends past the end of the file "
                f"({sizes[t.part]:,} bytes); download it again"
            )

    metadata = index.metadata
    arch = metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{p}: unsupported architecture {arch!r}; qwenkit reads {', '.join(ARCHITECTURES)}")
    for t in index.tensors:
        if t.tensor_type not in SUPPORTED_TYPES:
            supported = ", ".join(sorted(q.name for q in SUPPORTED_TYPES))
            raise GGUFError(
                f"{p}: tensor {t.name} has unsupported quantization type {t.tensor_type.name} "
                f"(supported: {supported})"
            )
        if t.name == ROPE_FREQS and arch == "llama":
            continue  # Llama 3.1's rope scaling: read into the config (GGUFCheckpoint)
        if hf_name(t.name, arch) is None:
            raise GGUFError(f"{p}: unexpected tensor {t.name} for architecture {arch}")
    names = {t.name for t in index.tensors}
    if "token_embd.weight" not in names:
        raise GGUFError(f"{p}: missing tensor token_embd.weight; not a decoder model this reader understands")
    if not {"blk.0.ffn_up.weight", "blk.0.ffn_up_exps.weight"} & names:
        raise GGUFError(
            f"{p}: missing tensor blk.0.ffn_up.weight (or blk.0.ffn_up_exps.weight); "
            "not a decoder model this reader understands"
        )
    return GGUFCheckpoint(p, index, parts)


def _matrix_shape(name: str | None, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The (out, in) shape of the matrices a tensor holds: one expert's of stacked experts, else its own."""
    return shape[1:] if name is not None and is_stacked(name) else shape


def _in_precision(name: str | None, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """A weight that loads as integer codes: a projection or embedding in a type that maps exactly."""
    return name is not None and keeps_precision(name) and can_decode(qtype, shape)


def _requantized(name: str | None, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """A projection or embedding weight in a type no kernel runs, loaded as int8 codes rounded again."""
    return name is not None and keeps_precision(name) and qtype in REQUANTIZED and len(shape) == 2


def _loads_as_codes(name: str | None, qtype: GGMLQuantizationType, shape: tuple[int, ...]) -> bool:
    """A weight that loads as integer codes, exactly or rounded again; ``shape``: one matrix's
    (``_matrix_shape``)."""
    return _in_precision(name, qtype, shape) or _requantized(name, qtype, shape)


def _codes(qtype: GGMLQuantizationType, raw: np.ndarray, shape: tuple[int, ...]) -> AffineWeight:
    """One (out, in) matrix's blocks (``raw``, a view of the file) as integer codes: exactly where the
    type maps onto them, else rounded again (:func:`_requantize`). The file's pages are released
    once read."""
    if not can_decode(qtype, shape):
        return _requantize(qtype, raw, shape)
    codes = decode_affine(raw, qtype, shape)  # new arrays, no view of the file
    release_pages(raw.ctypes.data, raw.nbytes)  # the file's pages: read once, done
    return codes


def _requantize(qtype: GGMLQuantizationType, raw: np.ndarray, shape: tuple[int, ...]) -> AffineWeight:
    """A Q6_K, Q2_K or Q3_K weight as int8 codes: gguf-py's floats rounded by ``requantize_int8``; Q6_K
    (most of a Q4_K_M file's other weights) in one pass of qwenkit's kernels where they run, with the
    same codes and scales, or exactly as the file holds it where the Q6_K kernel runs."""
    if qtype == GGMLQuantizationType.Q6_K and gguf_quant.kernels_available():
        # exactly, for the Q6_K kernel (every build); rounded to int8 codes if it is switched off
        codes = decode_q6_k(raw, shape) if kernels.runs_q6_k() else requantize_q6_k(raw, shape)
        release_pages(raw.ctypes.data, raw.nbytes)
        return codes
    data = raw.reshape(quant_shape_to_byte_shape(shape, qtype))
    return requantize_int8(dequantize_tensor(data, qtype, shape))
