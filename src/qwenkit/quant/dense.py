"""bfloat16 Linear layers in the CPU kernels' tile layout, for CPU inference.

PyTorch's bf16 matrix-vector product reads weights at about half the memory bandwidth on the CPUs we
measured (``benchmarks/bench_cpu_kernels.py``); :func:`qwenkit.kernels.linear_bf16` reads them at about
all of it, but only from its own layout (16 output rows per sequential stream). So at load time, for
inference on the CPU, every plain bf16 ``nn.Linear`` is repacked once into that layout (the original is
freed: one copy of each weight), and every call goes through the kernel,
for prompts too: measured beside torch's GEMM at 64 and 512 rows it is within 0-30% of it, while
unpacking the weight for torch costs more than the product. On CPUs with AMX (Sapphire Rapids and later)
the products run on AMX tiles, which read this same layout (QWENKIT_AMX=off: the vector tiles).
A tied input embedding reads its rows straight out of the packed output head.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenkit import kernels
from qwenkit.checkpoint.files import release_pages, trim_heap
from qwenkit.kernels.ops import TILE, PackedBf16
from qwenkit.model.modules import replace_module
from qwenkit.model.moe import RouterLinear


class PackedBf16Linear(nn.Module):
    """``y = x @ W.T + b`` with a bf16 W in the kernels' tile layout."""

    @property
    def kernel(self) -> str:
        """What runs this layer (``qwenkit profile`` prints it): the loaded build's instruction set."""
        level = kernels.isa_level()
        if level in ("avx2", "avxvnni"):  # the same bf16 tiles: AVX-VNNI has no bf16
            return "qwenkit AVX2 BF16 (FMA)"
        if level == "avx512vnni":  # AVX-512 without BF16: vdpbf16ps as two FMAs
            return "qwenkit AVX-512 BF16 (FMA)"
        if kernels.bf16_runs_on_amx(self.in_features):
            return "qwenkit AMX BF16 (tdpbf16ps)"
        return "qwenkit AVX-512 BF16 (vdpbf16ps)"

    def __init__(self, weight: torch.Tensor | PackedBf16, bias: torch.Tensor | None) -> None:
        """From a (out, in) weight (packed here), or one already packed (fused projections)."""
        super().__init__()
        self.packed = weight if isinstance(weight, PackedBf16) else kernels.prepare_bf16(weight)
        self.out_features, self.in_features = self.packed.out_features, self.packed.in_features
        self.register_buffer("packed_weight", self.packed.weight)  # memory accounting sees it
        self.register_buffer("bias", None if bias is None else bias.detach().to(torch.bfloat16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.bfloat16:
            return kernels.linear_bf16(x, self.packed, self.bias)
        return F.linear(x, self.unpacked().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def unpacked(self) -> torch.Tensor:
        """The (out, in) bf16 weight (a copy)."""
        return kernels.unpack_bf16(self.packed)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """(len(ids), in) rows of the weight, read from their tiles without unpacking the rest."""
        w = self.packed.weight
        kp = self.in_features + self.in_features % 2
        v = w.view(w.shape[0], kp // 2, TILE, 2)[ids // TILE, :, ids % TILE]  # (len, Kp/2, 2)
        return v.reshape(len(ids), kp)[:, : self.in_features]

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed bf16"


class PackedBf16Embedding(nn.Module):
    """The input embedding of a tied model: rows of the packed output head (one copy of the matrix)."""

    def __init__(self, source: PackedBf16Linear) -> None:
        super().__init__()
        self.source = source
        self.num_embeddings, self.embedding_dim = source.out_features, source.in_features

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)


def pack_dense_for_cpu(model: nn.Module) -> int:
    """Repack every plain bf16 ``nn.Linear`` of a CPU model for the AVX-512 kernels; returns how many.

    Nothing changes (returns 0) when the kernels are not available, e.g. on another CPU, without a
    compiler, or under ``QWENKIT_KERNELS=torch``. A MoE router keeps its module and float weight and gets
    the packed copy beside it (a router is small); other ``nn.Linear`` subclasses keep their own forward.
    """
    if not kernels.available():
        return 0
    embeddings: dict[int, list[str]] = {}
    for name, m in model.named_modules(remove_duplicate=False):
        if isinstance(m, nn.Embedding):
            embeddings.setdefault(id(m.weight), []).append(name)
    count = 0
    for name, m in list(model.named_modules()):
        if type(m) not in (nn.Linear, RouterLinear) or not _bf16_on_cpu(m.weight):
            continue
        if type(m) is RouterLinear:  # stays a router (float, never quantized); the kernel runs its product
            m.packed = kernels.prepare_bf16(m.weight.detach())
            count += 1
            continue
        weight = m.weight.detach()
        packed = PackedBf16Linear(pack_releasing(weight), m.bias)
        replace_module(model, name, packed)
        for emb_name in embeddings.pop(id(m.weight), []):
            replace_module(model, emb_name, PackedBf16Embedding(packed))
        # The float weight is now unreachable, but a memory-mapped checkpoint keeps its file open for the
        # other tensors: drop its pages, or every weight would count twice until the process ends.
        release_pages(weight.data_ptr(), weight.nbytes)
        del weight, m
        count += 1
    trim_heap()  # the packing temporaries
    return count


PACK_BLOCK_ELEMENTS = 1 << 22  # weights packed a step: 8 MiB of bf16 beside their tiles


def pack_releasing(weight: torch.Tensor) -> PackedBf16:
    """``kernels.prepare_bf16(weight)``, a block of whole tiles of rows at a time, each block's source
    pages dropped as soon as it is packed: a memory-mapped checkpoint's pages of the weight never all
    count beside its tiles. The tied output head of a Qwen2.5-0.5B-shape GPTQ checkpoint (272 MiB, bf16)
    packed at once peaked at 1.65x the model (1.17x before packing). For a weight nobody reads after
    (:func:`pack_dense_for_cpu`'s own); the tiles are the same bytes as one pass's."""
    n, k = weight.shape
    rows = max(TILE, PACK_BLOCK_ELEMENTS // max(1, k) // TILE * TILE)
    release = weight.is_contiguous()  # each block's span is its own rows
    if n <= rows:
        return kernels.prepare_bf16(weight)
    tiles: torch.Tensor | None = None
    for i in range(0, n, rows):
        block = weight[i : i + rows]
        part = kernels.prepare_bf16(block).weight
        if tiles is None:
            tiles = part.new_empty((-(-n // TILE), *part.shape[1:]))
        tiles[i // TILE : i // TILE + part.shape[0]] = part
        del part
        if release:
            release_pages(block.data_ptr(), block.nbytes)
    assert tiles is not None
    return PackedBf16(tiles, k, n)


def _bf16_on_cpu(weight: torch.Tensor) -> bool:
    return weight.dtype == torch.bfloat16 and weight.device.type == "cpu"
