"""Build the model on the meta device and assign checkpoint tensors to it, one at a time.

Nothing is allocated twice: tensors come memory-mapped from the file, are cast (or not) to the target
dtype, and replace the meta parameters in place. Before any of that, the memory the weights and KV cache
will need is checked against what is free.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cached_property, lru_cache, partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import nn
from tqdm import tqdm

from qwenkit.checkpoint import layout, prepared_cache
from qwenkit.checkpoint.bare import BareNames, lacks_head, without_head
from qwenkit.checkpoint.files import HeapTrimmer, WeightFiles, find_weight_files, release_pages
from qwenkit.checkpoint.sanitize import sanitize
from qwenkit.checkpoint.side_files import sparse_attention_note
from qwenkit.config import ModelConfig, read_hf_config
from qwenkit.distributed import TensorParallel, local_config, parallelize, shard_tensor
from qwenkit.distributed.plan import GPTQ_BUFFERS, rank_range, shard_lora, shard_weight, split_role
from qwenkit.errors import CheckpointError, ConfigError
from qwenkit.kernels import ops as kernel_ops
from qwenkit.load_args import checked_device
from qwenkit.memory import check_fits, weight_bytes
from qwenkit.model import Transformer, score_head
from qwenkit.model.adapter_bank import LoRAPair
from qwenkit.model.rope import inv_freq
from qwenkit.model.served_adapters import AdapterNotServable, check_servable, serve_adapters
from qwenkit.model.transformer import is_headless
from qwenkit.notes import say_once
from qwenkit.paths import not_a_file

if TYPE_CHECKING:
    from qwenkit.quant.affine import AffineWeight
    from qwenkit.quant.on_load import LayerBuilder

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointSource(Protocol):
    """A checkpoint on disk: its Hugging Face config and a lazy stream of its tensors."""

    path: Path
    hf_config: dict[str, Any]

    def tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, Any]]:
        """``(name, tensor)`` pairs; with ``keep_quantized`` a source may yield integer codes (an
        ``AffineWeight``) for weights it stores quantized."""
        ...

    @property
    def total_bytes(self) -> int: ...


@dataclass
class DirectorySource:
    """A Hugging Face checkpoint directory (config.json + safetensors or .bin weights)."""

    path: Path
    hf_config: dict[str, Any]

    @cached_property
    def weights(self) -> WeightFiles:
        return find_weight_files(self.path)

    def tensors(self, keep_quantized: bool = False) -> Iterator[tuple[str, torch.Tensor]]:
        from qwenkit.quant.checkpoint_io import with_default_g_idx  # (qwenkit.quant imports this package)

        return with_default_g_idx(self.hf_config, self.weights)  # plain tensors; a GPTQ one may lack g_idx

    @property
    def total_bytes(self) -> int:
        """The weight files' size (what ``qwenkit info`` shows as stored: GPTQ's packed codes as they are)."""
        return self.weights.total_bytes


def open_checkpoint(path: str | Path) -> CheckpointSource:
    """A model directory or a .gguf file; anything else is a clear error."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        from qwenkit.checkpoint.gguf import read_gguf

        return read_gguf(p)
    if not p.exists():  # a loop of links, or a link to a missing path, is told as what it is
        raise CheckpointError(f"{p} {not_a_file(p) or 'does not exist'}")
    if not p.is_dir():
        raise CheckpointError(f"{p} is neither a model directory nor a .gguf file")
    hf_config = read_hf_config(p)
    return DirectorySource(p, hf_config)


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bfloat16 matmuls run at full speed (1.6x decode, 2x prefill over float32)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype, device: str, fast_kernels: bool = False) -> torch.dtype:
    """'auto': bfloat16 on CUDA (float16 where bf16 is missing); on the CPU, bfloat16 where it runs at full
    speed: a CPU with native bf16, or inference on qwenkit's kernels (``fast_kernels``), whose bf16
    products accumulate in float32 on AVX2 CPUs too (there bfloat16 decoded the Qwen2.5-0.5B shape 3.3x
    faster than float32, its int4 layers 1.7x, and the bundled model 3.5x); else float32."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point or dtype.itemsize < 2:  # it loaded, then failed at every step
            raise ConfigError(f"dtype {dtype} cannot run a model; choose auto, {', '.join(DTYPES)}")
        return dtype
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        if cpu_has_native_bf16():
            return torch.bfloat16
        if fast_kernels:
            from qwenkit import kernels

            return torch.bfloat16 if kernels.available() else torch.float32
        return torch.float32
    if dtype not in DTYPES:
        raise ConfigError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_model(
    path: str | Path | CheckpointSource,
    dtype: str | torch.dtype = "auto",
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    context: int | None = None,
    batch: int = 1,
    progress: bool = True,
    tensor_parallel: TensorParallel | None = None,
    adapter: str | Path | None = None,
    dequantize: bool = False,
    fast_kernels: bool = False,
    adapters: Mapping[str, str | Path] | None = None,
    reserve_adapters: tuple[int, int] | None = None,
) -> tuple[Transformer, ModelConfig]:
    """Load any supported checkpoint. ``context``/``batch`` size the memory check for the KV cache.

    With ``tensor_parallel`` (every rank of the group calls this together), the model is this rank's
    shard: built from the shard's config, loaded with only this rank's slices, and returning full logits;
    the returned config is the shard's heads and FFN width (its KV cache is this rank's share) with the
    whole vocabulary. ``adapter``: a peft-format LoRA directory applied to every token (unmerged);
    ``adapters``: name -> directory, each applied to the requests that name it (``SamplingParams.
    adapter``), the others running on the base model. Both run as side paths beside the base layers,
    which stay as fast as without them (``model.served_adapters``; under tensor parallelism each rank
    serves its slices of the pairs); an ``adapter`` that adapts a router, the output head or the
    embedding wraps its layers in finetune's ``LoRALinear`` instead (unfused, unpacked: slower).

    A GGUF file's quantized projections and embedding run in the file's own precision (integer codes,
    no float copy); ``dequantize`` decodes them to ``dtype`` instead (float weights, as before; other
    checkpoints are unaffected). With
    ``quantize``, each linear layer is rounded to int8/int4 as its weight arrives, so the float model is
    never held whole (a GGUF is then decoded to floats first and re-quantized). ``fast_kernels``: for
    inference, repack bf16 linear layers for the CPU kernels (``quant.dense``, on the CPU) and fuse
    q/k/v and gate/up into one product each (``quant.fused``, on any device); the layers then have no
    ``weight`` parameter to train, nor the checkpoint's module names. ``reserve_adapters``: (slots,
    rank) of adapters to hold pairs for from the start (``served_adapters.reserve_adapters``; under
    tensor parallelism before the collectives, as the served adapters), its memory checked first."""
    device = checked_device(device)
    source = open_checkpoint(path) if isinstance(path, str | Path) else path
    full_config = layout.checked_config(source)  # refuses weights other than config.json promises
    if tensor_parallel is None or tensor_parallel.rank == 0:
        for note in filter(None, (full_config.dual_chunk_note, sparse_attention_note(source.path))):
            say_once(note)
    config = full_config
    if tensor_parallel is not None and tensor_parallel.world > 1:
        config = local_config(full_config, tensor_parallel.world)
        from qwenkit.distributed.checks import check_same_checkpoint

        check_same_checkpoint(source, tensor_parallel)
    torch_dtype = resolve_dtype(dtype, device, fast_kernels and device == "cpu")
    if quantize not in (None, "int8", "int4"):
        raise ConfigError(f"unknown --quantize {quantize!r}; choose int8 or int4")
    if quantize and config.quantization:
        raise ConfigError(
            f"{source.path} is already quantized ({config.quantization.get('quant_method')}); drop --quantize"
        )
    # Integer codes stay so unless floats are asked for or they are re-quantized (a rank: _shard_codes)
    keep_quantized = not (dequantize or quantize)
    runtime_bytes = getattr(source, "runtime_bytes", None)
    # a GGUF knows its codes' bytes; --quantize sizes the quantized model (never the float one it was)
    weights = runtime_bytes(torch_dtype.itemsize, keep_quantized) if runtime_bytes and not quantize else None
    if weights is not None and tensor_parallel is not None:
        weights //= tensor_parallel.world  # a rank's share (its norms' copies are a rounding error)
    if weights is None and lacks_head(source, config):  # an embedding model's bare decoder
        weights = weight_bytes(config, torch_dtype, quantize, headless=True)
    context = context or min(config.max_context, 2048)
    with torch.device("meta"), _no_init():
        model = Transformer(config)
        score_head.attach(model, source)  # a reranker GGUF's rows of "yes" and "no" (``gguf_rank``)
    served = _served_adapters(model, adapter, adapters, tensor_parallel)
    wrapped_adapter = adapter if served is None else None  # finetune's LoRALinear layers
    if served:  # float32 pairs, and their copy in the kernel's tiles
        pairs = [p for each in served.values() for p in each.values()]
        weights = (weights or weight_bytes(config, torch_dtype, quantize)) + sum(
            8 * (p.a.numel() + p.b.numel()) for p in pairs
        )
    ranks = tensor_parallel.local_world if tensor_parallel is not None and device == "cpu" else 1
    check_fits(config, torch_dtype, device, context, batch, quantize, weights=weights, ranks=ranks)
    if config.quantization:
        from qwenkit.quant import prepare_quantized_model

        prepare_quantized_model(model, config.quantization, torch_dtype)
    cache = _prepared_cache_entry(
        source,
        config,
        torch_dtype,
        device,
        quantize,
        dequantize,
        fast_kernels,
        keep_quantized,
        prepared=tensor_parallel is None and wrapped_adapter is None,
    )
    if cache is not None:
        cached = prepared_cache.load(cache, config, model)
        if cached is not None:
            model = _with_served(cached, served, adapter)  # type: ignore[arg-type]
            return _with_reserved(model, reserve_adapters), cached.config
    builder = None
    if keep_quantized or quantize:
        from qwenkit.quant.on_load import LayerBuilder

        builder = LayerBuilder(model, quantize, torch_dtype, device, full_config.tie_word_embeddings)
    with kernel_ops.load_threads(builder is not None and device == "cpu"):
        _assign_all(
            model,
            full_config,
            source,
            torch_dtype,
            device,
            progress,
            tensor_parallel,
            builder,
            keep_quantized,
        )
    if config.quantization:
        from qwenkit.quant import finalize_quantized_model

        finalize_quantized_model(model)  # pack for the device's kernel now, not on the first forward
    model.rotary.inv_freq = inv_freq(config).to(device)
    model.eval().requires_grad_(False)
    if wrapped_adapter is not None:
        from qwenkit.finetune.adapter_io import load_adapter

        tp = tensor_parallel  # its rank's rows of B or columns of A, and of peft's copy of the head
        parts = (partial(shard_lora, tp=tp), partial(shard_weight, tp=tp)) if tp is not None else ()
        load_adapter(model, wrapped_adapter, *parts)
        model.requires_grad_(False)
    if tensor_parallel is not None:
        # the side paths before the collectives: a layer split by its inputs then sums its adapters'
        # partial updates with its own partial output in the one all-reduce
        model = _with_reserved(_with_served(model, served, adapter), reserve_adapters)
        return parallelize(model, tensor_parallel), model.config
    if fast_kernels and wrapped_adapter is None:
        from qwenkit.quant.dense import pack_dense_for_cpu
        from qwenkit.quant.fused import fuse_for_inference

        if device == "cpu":
            pack_dense_for_cpu(model)
        fuse_for_inference(model, release_parts=True)  # q/k/v and gate/up as one product each
    if cache is not None:
        prepared_cache.store(cache, model)
    return _with_reserved(_with_served(model, served, adapter), reserve_adapters), model.config


def _served_adapters(
    model: Transformer,
    adapter: str | Path | None,
    adapters: Mapping[str, str | Path] | None,
    tensor_parallel: TensorParallel | None,
) -> dict[str, dict[str, LoRAPair]] | None:
    """Name -> the pairs of each adapter to serve as side paths (read, checked by name only, on the
    model's skeleton); None where there is none, or where the one ``adapter`` must be wrapped instead."""
    if adapter is not None and adapters:
        raise ConfigError("give one adapter for every request or named adapters, not both")
    if adapter is None and not adapters:
        return None
    named = {_adapter_name(adapter): adapter} if adapter is not None else dict(adapters or {})
    try:
        served = {name: servable_adapter(model, name, path) for name, path in named.items()}
    except AdapterNotServable:
        if adapter is None:
            raise
        return None  # the one adapter of every request is wrapped instead
    if tensor_parallel is None:
        return served
    return {name: shard_adapter(pairs, tensor_parallel) for name, pairs in served.items()}


def shard_adapter(pairs: dict[str, LoRAPair], tp: TensorParallel) -> dict[str, LoRAPair]:
    """This rank's rows of B or columns of A, as its layers' slices (its model is this rank's shard)."""
    return {m: LoRAPair(*shard_lora(m, p.a, p.b, tp), p.scaling) for m, p in pairs.items()}


def servable_adapter(model: Transformer, name: str, path: str | Path) -> dict[str, LoRAPair]:
    """Adapter ``name``'s pairs from ``path``, checked (by module name) to be servable as side paths:
    ``AdapterNotFound`` where there is no adapter, ``AdapterNotServable`` or ``CheckpointError``."""
    from qwenkit.finetune.adapter_io import adapter_pairs

    pairs, copies = adapter_pairs(model, path)[1:]
    for module in [*pairs, *copies]:  # a copy of the embedding would replace the base's, for every slot
        check_servable(module, name)
    return pairs


def _adapter_name(path: str | Path) -> str:
    return Path(path).resolve().name or str(path)


def _with_served(
    model: Transformer, served: dict[str, dict[str, LoRAPair]] | None, adapter: str | Path | None
) -> Transformer:
    """``model`` with the adapters as side paths (the one ``adapter``: the default of every token)."""
    if served is None:
        return model
    serve_adapters(model, served, default=_adapter_name(adapter) if adapter is not None else None)
    return model


def _with_reserved(model: Transformer, reserve: tuple[int, int] | None) -> Transformer:
    """``model`` holding pairs for ``reserve`` = (slots, rank) adapters (``reserve_adapters``), where
    asked; OutOfMemoryError where they would not fit in the free memory, ConfigError where the adapters
    served already exceed them."""
    if reserve is None:
        return model
    from qwenkit.memory import check_free
    from qwenkit.model import served_adapters

    slots, rank = reserve
    if slots < 1 or rank < 1:
        raise ConfigError(f"--max-loras and --max-lora-rank must be at least 1, got {slots} and {rank}")
    check_free(
        served_adapters.reserved_bytes(model, slots, rank),
        model.model.norm.weight.device,
        f"reserve {slots} adapter slots of rank {rank}",
        "ask for fewer (--max-loras) or a lower rank (--max-lora-rank)",
    )
    try:
        served_adapters.reserve_adapters(model, slots, rank)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model


def _prepared_cache_entry(
    source: CheckpointSource,
    config: ModelConfig,
    dtype: torch.dtype,
    device: str,
    quantize: str | None,
    dequantize: bool,
    fast_kernels: bool,
    keep_quantized: bool,
    prepared: bool,
) -> prepared_cache.CacheEntry | None:
    """Where the finished model is cached, for loads that decode or pack weights on the CPU (a GGUF file in
    its own precision, ``--quantize``, GPTQ, and bfloat16 weights packed into the kernels' tiles); None
    for everything else. A bfloat16 checkpoint's packing is a fresh copy of every weight at every start
    (1.0-1.7 s for a Qwen2.5-0.5B on this VM, 2026-12-02, mostly the first touch of new memory) where the
    cached copy maps back in 0.2 s; float32 and float16 loads pack nothing and are not cached."""
    packs_bf16 = fast_kernels and dtype == torch.bfloat16 and kernel_ops.available()
    packs = (
        quantize or config.quantization or (keep_quantized and hasattr(source, "runtime_bytes")) or packs_bf16
    )
    if not (packs and prepared and device == "cpu" and prepared_cache.enabled()):
        return None
    options = {
        "dtype": str(dtype),
        "quantize": quantize,
        "dequantize": dequantize,
        "fast_kernels": fast_kernels,
    }
    return prepared_cache.entry_for(Path(source.path), options)


@contextmanager
def _no_init() -> Iterator[None]:
    """Skip nn.Embedding's and nn.Linear's random init of the skeleton (its weights get replaced): ``normal_``
    on meta imports torch._dynamo (~1 s of start-up), ``kaiming_uniform_`` took a third of its 70 ms."""
    resets = {cls: cls.reset_parameters for cls in (nn.Embedding, nn.Linear)}
    for cls in resets:
        cls.reset_parameters = lambda self: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        for cls, reset in resets.items():
            cls.reset_parameters = reset  # type: ignore[method-assign]


def _assign_all(
    model: Transformer,
    config: ModelConfig,
    source: CheckpointSource,
    dtype: torch.dtype,
    device: str,
    progress: bool,
    tensor_parallel: TensorParallel | None = None,
    builder: LayerBuilder | None = None,
    keep_quantized: bool = False,
) -> None:
    """Assign every tensor to its place; ``builder`` turns linear weights into quantized layers as they
    arrive (integer codes from the file, or ``--quantize``)."""
    parameters = {n: t for n, t in model.named_parameters(remove_duplicate=False)}
    expected = parameters | dict(model.named_buffers())
    expected.pop("rotary.inv_freq", None)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    loaded: set[str] = set()
    # A tied model's lm_head.weight, where its file has one (checked against the embeddings, then let go)
    head: torch.Tensor | None = None
    names = BareNames(source.tensors(keep_quantized=keep_quantized))  # the bare decoder's too (``bare``)
    trimmer = HeapTrimmer()  # GPTQ layers packed as they complete free their unpacking temporaries
    bar_options = {"unit": "B", "unit_scale": True, "desc": "loading", "delay": 1.0, "leave": False}
    bar = tqdm(total=source.total_bytes, disable=not progress, **bar_options)
    with bar:
        for name, tensor in sanitize(config, names):
            shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.codes.shape)
            bar.update(math.prod(shape) * (tensor.element_size() if isinstance(tensor, torch.Tensor) else 4))
            if config.tie_word_embeddings and isinstance(tensor, torch.Tensor):
                if name == "lm_head.weight":
                    head = tensor
                elif name == "model.embed_tokens.weight" and head is not None:  # only the head is held
                    _check_tied_head(head, tensor, source)
                    head = None
            if name not in expected:
                if _is_droppable(name, tensor, config):
                    continue
                raise CheckpointError(
                    f"{source.path}: unexpected tensor {name!r}{_expert_note(name, config)} "
                    f"for a {config.family} model{_architecture_note(config, name)}"
                )
            target = expected[name]
            whole = tensor
            if tensor_parallel is not None and not isinstance(tensor, torch.Tensor):  # GGUF codes
                tensor = _shard_codes(name, tensor, tensor_parallel)
                shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else tuple(tensor.codes.shape)
            elif tensor_parallel is not None:
                tensor = shard_tensor(name, tensor, tensor_parallel)
                shape = tuple(tensor.shape)
            if shape != tuple(target.shape):
                raise CheckpointError(
                    f"{source.path}: tensor {name!r}{_expert_note(name, config)} has shape "
                    f"{shape}, but config.json implies {tuple(target.shape)}"
                )
            # a row-parallel weight under --quantize is rounded whole, as one process rounds it, then split
            columns = _row_columns(name, whole, tensor_parallel)
            if builder is not None and builder.take(name, tensor, whole if columns else None, columns):
                loaded.add(name)
                continue
            del whole
            # Parameters take the model dtype; buffers (GPTQ qweight, scales, g_idx) keep their own.
            cast = tensor.to(dtype if name in parameters else target.dtype)
            copied = cast.data_ptr() != tensor.data_ptr()
            if copied and tensor.device.type == "cpu" and tensor.is_contiguous():
                # a converted copy (float16 file, bfloat16 model): the source's pages were read once, done
                release_pages(tensor.data_ptr(), tensor.nbytes)
            tensor = cast
            _set_tensor(model, name, tensor.to(device))
            loaded.add(name)
            if config.quantization and tensor_parallel is None:  # (a rank's copies are packed at the end)
                _pack_when_complete(model, name, trimmer)
    missing = without_head(model, sorted(set(expected) - loaded), names, source)
    if missing:
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        shown = ", ".join(n + _expert_note(n, config) for n in missing[:5])
        raise CheckpointError(f"{source.path}: missing tensor(s) {shown}{more}{_architecture_note(config)}")
    embedding = getattr(model.model.embed_tokens, "weight", None)
    if head is not None and isinstance(embedding, torch.Tensor):  # the head came after the embeddings
        _check_tied_head(head, embedding.detach(), source)
    tied = config.tie_word_embeddings and not is_headless(model)  # an embedding GGUF's tie: none (bare)
    if tied and isinstance(model.model.embed_tokens, nn.Embedding):
        model.lm_head.weight = model.model.embed_tokens.weight  # (a quantized pair shares codes already)


def _check_tied_head(head: torch.Tensor, embed: torch.Tensor, source: CheckpointSource) -> None:
    """Refuse a tied model whose file holds an lm_head.weight other than its embeddings (a fine-tune that
    trained the head apart, its config.json left tied). Tying dropped that head silently, while
    transformers 5 runs it untied: the logits differed. An identical copy (as .bin files hold) passes."""
    if head.shape != embed.shape:  # the shape check names the mismatch
        return
    rows = 4096  # compared a block at a time: no whole-matrix copy
    for start in range(0, head.shape[0], rows):
        if not torch.equal(head[start : start + rows].to(embed.dtype), embed[start : start + rows]):
            raise CheckpointError(
                f"{source.path}: config.json ties the output head to the embeddings "
                "(tie_word_embeddings=true), but the checkpoint's lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings to false in config.json to run that "
                "lm_head (transformers 5 runs it untied), or remove it to tie"
            )


def _shard_codes(name: str, w: AffineWeight, tp: TensorParallel) -> AffineWeight | torch.Tensor:
    """A rank's share of a GGUF weight in its own codes: its outputs' rows, or its inputs' columns with
    their groups' scales; where a group (or Q6_K's 256-input block) would straddle two ranks, that
    layer's share decoded to floats instead (the codes cannot be cut)."""
    role = split_role(name.rpartition(".")[0])
    if role == "column":
        return w.output_rows(*rank_range(w.out_features, tp))
    if role == "row":
        share = w.input_columns(*rank_range(w.in_features, tp))
        return share if share is not None else shard_tensor(name, w.dequantize(torch.float32), tp)
    return w


def _row_columns(name: str, whole: Any, tensor_parallel: TensorParallel | None) -> tuple[int, int] | None:
    """The (start, end) of this rank's input columns of a row-parallel float weight, else None."""
    module, _, leaf = name.rpartition(".")
    if tensor_parallel is None or tensor_parallel.world == 1 or not isinstance(whole, torch.Tensor):
        return None
    if leaf != "weight" or split_role(module) != "row":
        return None
    return rank_range(whole.shape[1], tensor_parallel)


def _pack_when_complete(model: nn.Module, name: str, trimmer: HeapTrimmer) -> None:
    """Pack a GPTQ layer for its kernel as soon as its last checkpoint tensor is in, and drop the packed
    checkpoint tensors' pages: holding every layer's checkpoint form until the end, then packing, peaked
    at 2.5x the quantized model (Qwen2.5-0.5B shape, int4)."""
    from qwenkit.quant import QuantizedLinear

    module = model.get_submodule(name.rpartition(".")[0])
    if not isinstance(module, QuantizedLinear) or module.impl is not None:
        return
    if any(b.is_meta for b in module._buffers.values() if b is not None):
        return  # more of this layer's tensors (qweight, qzeros, scales, g_idx, bias) are still to come
    consumed = [t for t in (module.qweight, module.qzeros) if t.device.type == "cpu"]
    spans = [(t.data_ptr(), t.nbytes) for t in consumed]
    del consumed
    module.pack()  # drops the checkpoint buffers; bias and anything else it keeps are other tensors' pages
    for address, nbytes in spans:
        release_pages(address, nbytes)
    trimmer.built(module.in_features * module.out_features)


_EXPERT = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.")


def _expert_note(name: str, config: ModelConfig) -> str:
    """For a routed expert's tensor, which expert of which layer it is (and why it does not fit)."""
    m = _EXPERT.match(name)
    if m is None:
        return ""
    layer, expert = int(m.group(1)), int(m.group(2))
    where = f" (expert {expert} of layer {layer}"
    if not config.is_sparse_layer(layer):
        return f"{where}, a dense layer in config.json)"
    if expert >= config.num_experts:
        return f"{where}, but config.json has num_experts={config.num_experts})"
    return where + ")"


def _architecture_note(config: ModelConfig, name: str = "") -> str:
    """Why tensors do not fit: GPTQ ones with no quantization config, or a model that is no causal LM."""
    if name.rpartition(".")[2] in GPTQ_BUFFERS and not config.quantization:
        return "; it is a GPTQ tensor, but config.json has no quantization_config and no quantize_config.json"
    names = config.architectures
    if not names or any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in names):
        return ""
    return (
        f"; config.json's architectures {', '.join(names)} is not a causal language model "
        "(qwenkit runs *ForCausalLM checkpoints)"
    )


def _is_droppable(name: str, tensor: torch.Tensor, config: ModelConfig) -> bool:
    """Tensors safe to ignore: a tied lm_head copy, the all-zero biases old AutoGPTQ wrote everywhere, and
    a zero-width shared expert (transformers builds one for shared_expert_intermediate_size 0 and saves
    its empty tensors and its gate, which add sigmoid(gate) x 0)."""
    if name == "lm_head.weight" and config.tie_word_embeddings:
        return True
    no_shared = config.family == "qwen2_moe" and not config.shared_expert_intermediate_size
    if no_shared and ".mlp.shared_expert" in name:
        empty = isinstance(tensor, torch.Tensor) and tensor.numel() == 0
        return empty or ".mlp.shared_expert_gate." in name
    return name.endswith(".bias") and config.quantization is not None and not bool(tensor.any())


def _set_tensor(model: nn.Module, name: str, tensor: torch.Tensor) -> None:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr in module._parameters:
        module._parameters[attr] = nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[attr] = tensor
