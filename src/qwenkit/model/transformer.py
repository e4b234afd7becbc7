"""The decoder-only network shared by every family, with Hugging Face Qwen2 parameter names.

Qwen v1 checkpoints are renamed into this layout at load time (``checkpoint.sanitize``); the only
v1-specific behaviour left here is switched by config: dynamic NTK, LogN and float32 RoPE.
"""

from __future__ import annotations

import contextlib
import weakref
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from qwenkit import kernels
from qwenkit.config import ModelConfig
from qwenkit.model.adapter_bank import AdapterBank
from qwenkit.model.attention import Attention, AttentionInputs, DecodePools, KVCache
from qwenkit.model.mlp import MLP
from qwenkit.model.moe import MoEMLP
from qwenkit.model.norm import RMSNorm
from qwenkit.model.rope import RotaryEmbedding, logn_scale, ntk_alpha_for_length


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) segment ids -> (B, 1, T, T) bool: causal, and only within the query's own segment."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (same & causal)[:, None]


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoEMLP(config) if config.is_sparse_layer(layer_idx) else MLP(config)
        # The whole layer as one kernel call for decode steps, set only by an inference load on the fast
        # CPU kernels (``quant.fused``) where every part of the layer runs on them.
        self.decode_weights: kernels.DecodeLayerWeights | None = None

    def forward(self, x: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), inputs)
        return x + self.mlp(self.post_attention_layernorm(x))


# What sets ``decode_weights`` on a model's layers: ``quant.fused`` names its ``plan_decode_layers`` when
# imported (which layers run on the kernels is quantization's business, not the network's).
_decode_planner: Callable[[nn.Module], object] | None = None


def set_decode_planner(plan: Callable[[nn.Module], object]) -> None:
    """Name the function that plans a model's whole-layer decode calls (``decode_weights``), which
    :func:`refresh_decode_layers` calls again."""
    global _decode_planner
    _decode_planner = plan


def refresh_decode_layers(model: nn.Module) -> None:
    """Plan the whole-layer decode calls again where the model has them, after a change to the tensors
    they take (served adapters added): the plans hold those tensors, not the modules."""
    if any(
        getattr(m, "decode_weights", None) is not None for m in model.modules() if isinstance(m, DecoderLayer)
    ):
        if _decode_planner is None:  # only quant.fused makes plans, and it names itself when imported
            raise RuntimeError("the model has whole-layer decode plans but no planner to make them again")
        _decode_planner(model)


@dataclass(frozen=True)
class _HeldRuns:
    """A model's runs for one cache: made from these layer weights and pools, kept while they stay the
    same objects (the library holds each run's arguments, so a step passes only what changes)."""

    layers: Sequence[nn.Module]  # the layer list they were made for
    sparse: tuple[int, ...]  # the indices of its layers whose feed-forward routes tokens (MoE)
    weights: list[kernels.DecodeLayerWeights | None]
    pools: list[torch.Tensor]  # the cache's K pools, then its V pools, as they were when the runs were made
    runs: dict[int, kernels.DecodeRun]  # first layer index -> the run of consecutive layers from there


# Per model (while it lives): its runs for the cache it last decoded with.
_HELD: weakref.WeakKeyDictionary[nn.Module, _HeldRuns] = weakref.WeakKeyDictionary()


def _same_objects(a: list, b: list) -> bool:
    return len(a) == len(b) and all(x is y for x, y in zip(a, b, strict=True))


def _step_weights(
    model: nn.Module, layers: Sequence[nn.Module], sparse: tuple[int, ...]
) -> list[kernels.DecodeLayerWeights | None]:
    """Each layer's decode weights for this step, or None where it runs its modules: a MoE layer counting
    its routed tokens (count_routed_tokens) runs its modules, which count, and one whose routed experts
    serve an adapter of this step's tokens runs them one by one. Only the ``sparse`` layers are looked
    into: a step reads a dense layer's one plain attribute (a submodule lookup per layer cost the
    bundled model's 30 layers 0.15 ms a step)."""
    weights = [layer.decode_weights for layer in layers]
    if not sparse:
        return weights
    bank = getattr(model, "adapters", None)  # a Transformer's; a test's stand-in module has none
    used = bank.used if bank is not None else frozenset()
    for i in sparse:
        mlp = layers[i].mlp
        if mlp.routed_tokens is not None or used.intersection(getattr(mlp, "expert_adapters", ())):
            weights[i] = None
    return weights


def _decode_runs(
    model: nn.Module, layers: Sequence[nn.Module], pools: DecodePools
) -> dict[int, kernels.DecodeRun]:
    """First layer index -> the run of consecutive layers from there with decode weights, each run one
    ``kernels.decode_layers`` call; a layer without them (a part off the kernels) runs its modules."""
    held = _HELD.get(model)
    if held is not None and held.layers is layers:
        weights = _step_weights(model, layers, held.sparse)
        if _same_objects(held.weights, weights) and _same_objects(held.pools, pools.k + pools.v):
            return held.runs
    sparse = tuple(i for i, layer in enumerate(layers) if hasattr(layer.mlp, "routed_tokens"))
    weights = _step_weights(model, layers, sparse)
    runs: dict[int, kernels.DecodeRun] = {}
    i = 0
    while i < len(layers):
        end = i
        while end < len(layers) and weights[end] is not None:
            end += 1
        if end > i:
            idx = [layer.self_attn.layer_idx for layer in layers[i:end]]
            runs[i] = kernels.decode_run(weights[i:end], [pools.k[j] for j in idx], [pools.v[j] for j in idx])
        i = max(end, i + 1)
    _HELD[model] = _HeldRuns(layers, sparse, weights, pools.k + pools.v, runs)
    return runs


def _logn_applies(positions: torch.Tensor, config: ModelConfig) -> bool:
    """Whether LogN scales any query of the step: only positions at or past the trained length, so a
    v1 model's steps within it (every step of most chats) keep the whole-layer decode kernels."""
    return int(positions.max()) >= config.max_position_embeddings


class DecoderStack(nn.Module):
    """Embeddings, layers and the final norm: ``model.*`` in checkpoint names."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


HEADLESS = (
    "this model has no output head (its checkpoint holds the bare decoder, as an embedding model's "
    "does): it computes embeddings, not text"
)


class MissingHead(nn.Module):
    """Where ``lm_head`` is for a checkpoint saved from the bare decoder with no head to tie to (an
    embedding model: Qwen3-Embedding-8B): none is made up, so logits cannot be asked for."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise ValueError(HEADLESS)


def is_headless(model: nn.Module) -> bool:
    return isinstance(getattr(model, "lm_head", None), MissingHead)


class Transformer(nn.Module):
    """``model(input_ids)`` -> logits. Optional per-row positions, KV cache and NTK alphas for the engine."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DecoderStack(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary = RotaryEmbedding(config)
        # LoRA adapters served beside the base weights (``served_adapters.serve_adapters``), or None
        self.adapters: AdapterBank | None = None

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        ntk_alphas: list[float] | torch.Tensor | None = None,
        logits_index: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        adapter_slots: Sequence[int] | None = None,
        hidden_index: torch.Tensor | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """input_ids (B, T) -> logits (B, T, V), or (K, V) at ``logits_index`` when given.

        positions: absolute position of each token (default 0..T-1). ntk_alphas: Qwen v1 dynamic-NTK alpha
        per row (or per token), fixed by each sequence's prompt length (``rope.ntk_alpha_for_length``).
        logits_index: (K,) indices into the flattened B*T tokens; only those get the output head.
        segment_ids: (B, T) int, for rows that pack several sequences: a token attends only to earlier
        tokens of its own segment (pass each segment's positions from 0 too). Not with a cache.
        adapter_slots: with served adapters, the slot of each of the B*T tokens (``AdapterBank``; default:
        the bank's default adapter for every token).
        hidden_index: (H,) indices into the flattened tokens whose final-norm hidden states (H, hidden) come
        back beside the logits, as ``(logits, hidden)`` (embeddings); needs ``logits_index``, which may be
        empty: no output head runs then, so a headless embedding model computes them.
        """
        B, T = input_ids.shape
        selected = (
            self.adapters.selected(adapter_slots, B * T, input_ids.device)
            if self.adapters is not None
            else contextlib.nullcontext(False)
        )
        with selected as adapted:  # the head runs inside too, as it always did
            x = self._forward(input_ids, positions, cache, ntk_alphas, segment_ids, adapted)
            return self._outputs(x, logits_index, hidden_index)

    def _outputs(
        self,
        x: torch.Tensor,
        logits_index: torch.Tensor | None,
        hidden_index: torch.Tensor | None,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """The final norm and the head over the tokens asked for (``forward``'s two index arguments)."""
        if hidden_index is None and logits_index is None:
            return self.lm_head(self.model.norm(x))
        flat = x.reshape(-1, x.shape[-1])  # (B*T, hidden)
        if hidden_index is None:
            return self.lm_head(self.model.norm(flat[logits_index]))  # (K, V)
        if logits_index is None:
            raise ValueError("hidden_index needs logits_index (which may be empty)")
        hidden = self.model.norm(flat[hidden_index])
        if logits_index.numel() == 0:  # an embedding-only step: the head (if any) is not run
            return flat.new_empty((0, self.config.vocab_size)), hidden
        return self.lm_head(self.model.norm(flat[logits_index])), hidden

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor | None,
        cache: KVCache | None,
        ntk_alphas: list[float] | torch.Tensor | None,
        segment_ids: torch.Tensor | None,
        adapted: bool,
    ) -> torch.Tensor:
        """The last layer's output (B, T, hidden), before the final norm."""
        B, T = input_ids.shape
        if positions is None:
            positions = torch.arange(T, device=input_ids.device).expand(B, T)
        x = self.model.embed_tokens(input_ids)  # (B, T, hidden)
        cos, sin = self.rotary(positions, ntk_alphas)
        if self.config.family != "qwen":
            # transformers rotates in the activation dtype: cast once per step, not in every layer
            cos, sin = cos.to(x.dtype), sin.to(x.dtype)
        logn = None
        if self.config.use_logn_attn and not self.training:  # as modeling_qwen.py: inference only
            logn = logn_scale(positions, self.config.max_position_embeddings)
        mask = None
        if segment_ids is not None:
            if cache is not None:
                raise ValueError("segment_ids apply to a whole-sequence forward, not to a KV-cache step")
            mask = segment_mask(segment_ids)
        inputs = AttentionInputs(cos=cos, sin=sin, logn=logn, cache=cache, mask=mask)
        # A decode step the cache can hand to kernels.decode_layers (every row one token, B == 1 as the
        # engine flattens its rows) runs each run of consecutive layers that have decode weights as one
        # call, x kept 2-D, served adapters' updates included; any other layer runs its modules.
        layers = self.model.layers
        pools = cache.decode_pools() if cache is not None and B == 1 else None
        if pools is not None and logn is not None and _logn_applies(positions, self.config):
            pools = None  # the kernels do not scale queries: a step past v1's trained length runs modules
        runs = _decode_runs(self, layers, pools) if pools is not None else {}
        i = 0
        while i < len(layers):
            run = runs.get(i)
            if run is None:
                x = layers[i](x, inputs)
                i += 1
                continue
            rot = (cos[:, 0], sin[:, 0])  # (1, rows, rot), RoPE's dtype
            slots = self.adapters.slots if adapted else None
            x = kernels.decode_layers(x[0], run, pools.slots, pools.gather, pools.positions, *rot, slots)[
                None
            ]
            i += run.layers
        return x

    def ntk_alpha(self, prompt_length: int) -> float:
        """The dynamic-NTK alpha a sequence keeps for its whole life (1.0 unless v1 NTK is on)."""
        if not self.config.use_dynamic_ntk:
            return 1.0
        return ntk_alpha_for_length(prompt_length, self.config.max_position_embeddings)
