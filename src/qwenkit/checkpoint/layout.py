"""What a checkpoint holds, read from its headers alone, checked against what config.json promises.

A config.json that says 100,000 layers over weights for 2 built 100,000 layers (minutes) before the
missing tensors were named; one that says a vocabulary of 10^9 failed the memory check as a model that
cannot fit. Tensor names and the embedding's shape are known without reading a tensor (safetensors
headers, an index's map, a GGUF file's index), so the mismatch is refused before anything is built.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

from safetensors import SafetensorError, safe_open

from qwenkit.checkpoint.bare import prefixed
from qwenkit.checkpoint.files import WeightFiles
from qwenkit.config import ModelConfig
from qwenkit.errors import CheckpointError

_LAYER = re.compile(r"^(?:model\.layers|transformer\.h)\.(\d+)\.")  # (Qwen v1 names its layers transformer.h)
_EXPERT = re.compile(r"^(?:model\.layers|transformer\.h)\.\d+\.mlp\.experts\.(\d+)\.")
EMBEDDINGS = ("model.embed_tokens.weight", "transformer.wte.weight")
FFN = ("model.layers.0.mlp.up_proj.weight", "transformer.h.0.mlp.w1.weight")  # layer 0's (out, in)
_GGUF_FFN_UP = re.compile(r"^blk\.(\d+)\.ffn_up\.weight$")  # a dense layer's, (out, in)


def check_layout(
    path: object, config: ModelConfig, names: Iterable[str], shapes: dict[str, tuple[int, ...]]
) -> None:
    """CheckpointError, naming config.json's key and both numbers, where the checkpoint at ``path`` (its
    tensor ``names``; ``shapes``: its embedding's and layer 0's float up projection's, where known)
    holds another number of layers, fewer experts, another vocabulary or hidden size, or another FFN
    width (a dense layer 0) than ``config``."""
    layers, experts = -1, -1
    for name in names:
        if m := _LAYER.match(name):
            layers = max(layers, int(m.group(1)))
            if e := _EXPERT.match(name):
                experts = max(experts, int(e.group(1)))
    if layers + 1 != config.num_hidden_layers:
        _refuse(path, "num_hidden_layers", config.num_hidden_layers, f"{layers + 1:,} layers")
    # (more experts than promised: the loader names the first extra one, and which layer holds it)
    if experts >= 0 and experts + 1 < config.num_experts:
        _refuse(path, "num_experts", config.num_experts, f"{experts + 1:,} routed experts a layer")
    ffn = next((shapes[n] for n in FFN if n in shapes), ())
    if len(ffn) == 2 and not config.is_sparse_layer(0) and ffn[0] != config.intermediate_size:
        doubled = 2 if config.family == "qwen" else 1  # Qwen v1's config.json holds twice the width
        held = f"an FFN of width {ffn[0]:,} in layer 0"
        _refuse(path, "intermediate_size", config.intermediate_size * doubled, held)
    embedding = next((shapes[n] for n in EMBEDDINGS if n in shapes), ())
    if len(embedding) != 2:
        return  # no embedding (or not a matrix): the loader names it
    if embedding[0] != config.vocab_size:
        _refuse(path, "vocab_size", config.vocab_size, f"an embedding of {embedding[0]:,} rows")
    if embedding[1] != config.hidden_size:
        _refuse(path, "hidden_size", config.hidden_size, f"an embedding {embedding[1]:,} wide")


def check_gguf_ffn(source: object) -> None:
    """CheckpointError, naming both numbers, where a GGUF file's ``feed_forward_length`` is not the
    width of its first dense FFN's tensors. Its config takes the width from the tensors, so the file
    loads either way, but metadata that misdescribes its own weights means a damaged or mislabelled
    file (llama.cpp would refuse it). Qwen v1 files may store twice the width, as v1's config.json does;
    a file with no dense FFN (all MoE) is not compared, as llama.cpp writes a width no tensor has."""
    arch = getattr(source, "architecture", "")
    stated = getattr(source, "metadata", {}).get(f"{arch}.feed_forward_length")
    if isinstance(stated, list) and stated and all(v == stated[0] for v in stated):
        stated = stated[0]  # per layer, all equal (differing values are refused when the config is read)
    if isinstance(stated, bool) or not isinstance(stated, int):
        return
    for name, shape in getattr(source, "tensor_shapes", {}).items():
        if (m := _GGUF_FFN_UP.match(name)) and len(shape) == 2:
            if stated != shape[0] and not (arch == "qwen" and stated == 2 * shape[0]):
                raise CheckpointError(
                    f"{getattr(source, 'path', 'the checkpoint')}: its metadata's {arch}.feed_forward_length "
                    f"is {stated:,}, but it holds an FFN of width {shape[0]:,} in layer {m.group(1)}; "
                    "the file's metadata does not describe its weights"
                )
            return


def _refuse(path: object, key: str, promised: int, held: str) -> None:
    raise CheckpointError(
        f"{path}: config.json's {key} is {promised:,}, but the checkpoint holds {held}; "
        "fix config.json or use the weights it was written for"
    )


def directory_layout(weights: WeightFiles) -> tuple[set[str], dict[str, tuple[int, ...]]]:
    """A checkpoint directory's tensor names and the shapes ``check_layout`` compares: from the index
    and the safetensors headers, each file read once (a ``.bin`` file's pickle memory-mapped, and kept)."""
    names, known = set(weights.weight_map), {}
    wanted = (*EMBEDDINGS, *FFN, *(n.removeprefix("model.") for n in (EMBEDDINGS[0], FFN[0])))  # bare too
    where = {weights.weight_map[n] for n in wanted if n in weights.weight_map}
    for path in weights.files:
        if weights.weight_map and path.name not in where:
            continue  # an index names every tensor: only the files of the shapes compared are opened
        shapes = _shapes(path, weights)
        names |= shapes.keys()
        known |= {n: shapes[n] for n in wanted if n in shapes}
    # a bare decoder's names (``bare``) as the loader takes them
    return {prefixed(n) for n in names}, {prefixed(n): shape for n, shape in known.items()}


def _shapes(path: Path, weights: WeightFiles) -> dict[str, tuple[int, ...]]:
    """Each tensor's shape in one weight file, without reading a tensor's data (a ``.bin`` file's pickle
    is kept in ``weights`` for the loader, which would otherwise unpickle it again)."""
    if path.suffix != ".safetensors":
        return {n: tuple(t.shape) for n, t in weights.torch_state(path).items()}
    try:
        with safe_open(str(path), framework="pt") as f:
            return {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}  # noqa: SIM118 - not a dict
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a readable safetensors file: {e}") from None


def checked_config(source: object) -> ModelConfig:
    """The source's config (``ModelConfig.from_hf`` of its ``hf_config``), refused where its weights hold
    another number of layers or experts, or another embedding, than it promises (``check_layout``):
    a directory's from its headers, a GGUF file's from its index."""
    config = ModelConfig.from_hf(source.hf_config)  # type: ignore[attr-defined]
    weights = getattr(source, "weights", None)
    if isinstance(weights, WeightFiles):
        names, shapes = directory_layout(weights)
    elif callable(listed := getattr(source, "tensor_names", None)):  # a GGUF file
        names, shapes = listed(), {EMBEDDINGS[0]: getattr(source, "embedding_shape", ())}
        check_gguf_ffn(source)
    else:
        return config
    check_layout(getattr(source, "path", "the checkpoint"), config, names, shapes)
    return config
