"""Memory estimates for weights and KV cache, and the check that refuses loads that cannot fit.

Refusing up front with both numbers beats dying half-way through a load (or being killed by the OOM
killer with no message at all).
"""

from __future__ import annotations

from pathlib import Path

import torch

from qwenkit.cgroup_memory import CGROUP_ROOT, PROC_CGROUP, cgroup_room
from qwenkit.config import ModelConfig
from qwenkit.errors import OutOfMemoryError

GiB = 1024**3
# Bytes each output row keeps per group of inputs beside its codes, as the CPU kernels hold them: the
# float32 scale and uint8 zero a layer exports, plus the kernel's own float32 scale and shift (int4) or
# float16 scale (int8, one group per row). Leaving them out put SmolLM2's int4 15% under its real size.
_GROUP_BYTES = {"int8": 4 + 1 + 2, "int4": 4 + 1 + 4 + 4}
_CODE_BITS = {"int8": 8, "int4": 4}


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def linear_shapes(config: ModelConfig, active: bool = False) -> list[tuple[int, int]]:
    """(parameters, input width) of the decoder layers' projections, summed over layers by kind: the part
    weight-only quantization shrinks, whose group sizes follow each input width.

    MoE layers count their routed and shared experts (the float router is not a projection here);
    ``active`` counts only the top-k experts a token runs.
    """
    h, f, layers = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    q = config.num_attention_heads * config.head_dim
    kv = config.num_key_value_heads * config.head_dim
    sparse = config.num_sparse_layers
    experts = config.num_experts_per_tok if active else config.num_experts
    mi, si = config.moe_intermediate_size, config.shared_expert_intermediate_size
    return [
        (layers * h * (q + 2 * kv), h),  # q, k, v
        (layers * q * h, q),  # o
        ((layers - sparse) * 2 * h * f, h),  # gate, up
        ((layers - sparse) * f * h, f),  # down
        (sparse * (experts * 2 * h * mi + 2 * h * si), h),
        (sparse * experts * mi * h, mi),
        (sparse * si * h, si),
    ]


def quantized_bytes(parameters: int, in_features: int, quantize: str) -> int:
    """Bytes of ``parameters`` weights with ``in_features`` inputs a row under ``--quantize``: codes plus
    each row's per-group scales at the group size ``--quantize`` picks for that width."""
    from qwenkit.quant.rtn import default_group_size  # the one place that choice is made

    if parameters == 0:
        return 0
    group = default_group_size(_CODE_BITS[quantize], in_features)
    group = in_features if group == -1 else group
    groups_per_row = -(-in_features // group)
    rows = parameters // in_features
    return parameters * _CODE_BITS[quantize] // 8 + rows * groups_per_row * _GROUP_BYTES[quantize]


def weight_bytes(
    config: ModelConfig,
    dtype: torch.dtype,
    quantize: str | None = None,
    active: bool = False,
    headless: bool = False,
) -> int:
    """Bytes the weights take in memory at this dtype, or with weight-only int8/int4 linear layers.

    ``--quantize`` also quantizes ``lm_head`` to int8; a tied embedding is served from that same
    quantized matrix, so it is counted once. ``active``: only the weights one token computes with
    (a MoE model's top-k experts per layer; the whole model when dense). ``headless``: the checkpoint
    has no output head to load (``bare.lacks_head``: an embedding model's untied bare decoder).
    """
    head = config.vocab_size * config.hidden_size
    unloaded = head if headless and not config.tie_word_embeddings else 0
    params = (config.num_active_parameters if active else config.num_parameters) - unloaded
    total = params * dtype_bytes(dtype)
    if quantize is None:
        return total
    shapes = linear_shapes(config, active)
    linear = sum(n for n, _ in shapes)
    quantized = sum(quantized_bytes(n, width, quantize) for n, width in shapes)
    if unloaded:
        return total - linear * dtype_bytes(dtype) + quantized
    quantized += quantized_bytes(head, config.hidden_size, "int8")
    return total - (linear + head) * dtype_bytes(dtype) + quantized


def kv_cache_bytes(config: ModelConfig, dtype: torch.dtype, tokens: int) -> int:
    return config.kv_cache_bytes_per_token(dtype_bytes(dtype)) * tokens


def free_bytes(device: str) -> int:
    """Memory a new allocation can use: available RAM, or free memory on the CUDA device."""
    if device.startswith("cuda"):
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    return available_ram()


def available_ram(
    meminfo: Path = Path("/proc/meminfo"), cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP
) -> int:
    """RAM a new allocation can use: Linux's ``MemAvailable``, or less where a container's memory limit
    leaves less (``cgroup_memory``: /proc/meminfo is the node's there)."""
    room = cgroup_room(cgroup_root, proc_cgroup)
    node = _node_available_ram(meminfo)
    return node if room is None else min(node, room)


def _node_available_ram(meminfo: Path) -> int:
    """``MemAvailable``, which is what psutil reports there, read without importing psutil (about 10 ms
    of every start). psutil itself where the file or the line is missing, or the value is one psutil
    does not take as it stands (0, or above ``MemTotal``)."""
    fields = {}
    try:
        with meminfo.open("rb") as f:
            for line in f:
                name, _, rest = line.partition(b":")
                if name in (b"MemTotal", b"MemAvailable"):
                    fields[name] = int(rest.split()[0]) * 1024  # in kB
    except (OSError, ValueError, IndexError):
        fields = {}
    available = fields.get(b"MemAvailable", 0)
    if 0 < available <= fields.get(b"MemTotal", 0):
        return available
    import psutil

    return int(psutil.virtual_memory().available)


def check_free(need: int, device: torch.device, what: str, advice: str) -> None:
    """OutOfMemoryError unless ``need`` bytes are free on ``device``: "not enough free RAM to
    {what}: ... {advice}"."""
    have = free_bytes(str(device))
    if need > have:
        where = "GPU memory" if device.type == "cuda" else "RAM"
        raise OutOfMemoryError(
            f"not enough free {where} to {what}: up to {format_bytes(need)}, but {format_bytes(have)} "
            f"is free; {advice}"
        )


def check_fits(
    config: ModelConfig,
    dtype: torch.dtype,
    device: str,
    context: int,
    batch: int = 1,
    quantize: str | None = None,
    free: int | None = None,
    weights: int | None = None,
    ranks: int = 1,
) -> int:
    """Raise OutOfMemoryError unless weights + KV cache for ``batch`` x ``context`` tokens fit.

    ``weights``: the weights' bytes when the checkpoint knows them better than the estimate (a GGUF
    file's integer codes). ``ranks``: the tensor-parallel ranks loading a shard of this size into the
    same memory at once (on the CPU, every rank on this machine; a GPU is each rank's own), so all of
    them must fit."""
    if weights is None:
        weights = weight_bytes(config, dtype, quantize)
    need = weights + kv_cache_bytes(config, dtype, context * batch)
    have = free_bytes(device) if free is None else free
    if need * ranks > have:
        where = "GPU memory" if device.startswith("cuda") else "RAM"
        what = f"the weights ({dtype_name(dtype)}{', ' + quantize if quantize else ''}) and a KV cache of "
        if ranks > 1:
            what = f"{ranks} tensor-parallel ranks on this machine, each with its share of {what}"
        split = ", or split it over GPUs (--tensor-parallel N)" if device.startswith("cuda") else ""
        if ranks > 1:
            split = "; ranks on one machine's CPU split the work, not the memory they need together"
        raise OutOfMemoryError(
            f"not enough free {where}: {what}{batch * context:,} tokens need {need * ranks / GiB:.2f} GiB, "
            f"but only {have / GiB:.2f} GiB is free; try a shorter context (--max-context; serve: "
            f"--max-model-len), fewer rows (serve: --max-batch; eval: --batch-size), a lower precision, "
            f"or --quantize int8/int4{split}"
        )
    return need


def format_bytes(n: int) -> str:
    """GiB for model-sized numbers, MiB below one GiB (so small models don't print 0.00 GiB)."""
    return f"{n / GiB:.2f} GiB" if n >= GiB else f"{n / 2**20:.1f} MiB"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
