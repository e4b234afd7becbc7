"""The training loop shared by SFT (full, LoRA, QLoRA) and DPO, in one process or under torchrun.

Batches: step s of epoch e takes the global batch ``order_e[s*G : (s+1)*G]`` (wrapping around at the end
of an epoch), ``G = batch_size * grad_accum * replicas``, where replicas are the data-parallel processes
(the world size over the tensor-parallel size: the ranks of one tensor-parallel group take the same
batch); micro-batch k of replica r is its slice ``k*replicas + r``. The order is a permutation seeded by
(seed, epoch) and dropout is reseeded from (seed, step, replica), so a run resumed from a checkpoint takes
exactly the batches and random numbers of an uninterrupted one; in another split of the same G the batches
alike, but LoRA dropout's masks are drawn per micro-batch (``checkpoints.split_note``).

Loss: summed token cross entropy divided by the labelled tokens of the whole global batch, times the
number of replicas (DDP and FSDP average gradients over them), so gradients do not depend on how a batch
is split into micro-batches and processes.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.checkpoint import checkpoint

from qwenkit.checkpoint.loader import resolve_dtype
from qwenkit.finetune.distributed import World, full_tensor, gradient_sync, unwrap
from qwenkit.finetune.encode import IGNORE, Example
from qwenkit.finetune.router_loss import load_balancing_loss
from qwenkit.finetune.tensor_parallel_moe import sum_partial_grads
from qwenkit.model.moe import MoEMLP, collect_router_logits


@dataclass
class TrainArgs:
    method: str = "lora"  # lora | qlora | full
    epochs: int = 1
    max_steps: int | None = None
    lr: float = 2e-4
    batch_size: int = 4
    grad_accum: int = 1
    max_len: int = 1024
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    adam_beta1: float = 0.9  # transformers' TrainingArguments names and defaults
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    gradient_checkpointing: bool = False
    save_every: int = 0
    keep_checkpoints: int = 3  # the newest N of OUT.training/checkpoints; 0 keeps every one
    eval_every: int = 0
    seed: int = 0
    dtype: str = "float32"
    device: str = "cpu"
    packing: bool = False
    qlora_bits: int = 4
    strategy: str = "ddp"  # ddp | fsdp, with more than one process
    tensor_parallel: int = 1  # > 1: FSDP over replicas x this many tensor-parallel ranks each
    # None: 16 and 32 for a new adapter, the starting adapter's own with ``adapter`` (as is the shape)
    lora_r: int | None = None
    lora_alpha: float | None = None
    lora_dropout: float | None = None  # None: 0.05, or 0 where the targets include MoE experts or routers
    target_modules: tuple[str, ...] = ()
    lora_layers: int | None = None
    use_rslora: bool = False
    progress: bool = True
    adapter: str | None = None  # a LoRA adapter to start from instead of a new one (``start_adapter``)
    # MoE load-balancing loss weight; None: the model config's (on where output_router_logits is)
    router_aux_loss_coef: float | None = None

    # fields that must match for --resume to continue the same run (each changes the steps that follow)
    RESUME_KEYS = (
        "method",
        "adapter",  # before the LoRA shape, which it decides
        "lr",
        "max_len",
        "seed",
        "packing",
        "lora_r",
        "lora_alpha",
        "target_modules",
        "lora_layers",
        "lora_dropout",
        "use_rslora",
        "qlora_bits",
        "dtype",
        "warmup_ratio",
        "weight_decay",
        "max_grad_norm",
        "router_aux_loss_coef",
        "adam_beta1",
        "adam_beta2",
        "adam_epsilon",
    )

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["target_modules"] = list(self.target_modules)
        return d


def mixed_precision(args: TrainArgs) -> torch.dtype | None:
    """The half dtype full fine-tuning computes in over float32 master weights, or None.

    With --method full and --dtype bfloat16/float16 the parameters and AdamW's state stay float32 and the
    forward and backward run under autocast in the half dtype, as transformers' Trainer with --bf16 and
    DeepSpeed's bf16 do: updating half-precision weights in place rounds most small steps away (a tiny
    Qwen2 in bfloat16 at lr 1e-5 changed 12% of its weights in 3 steps, 82% in float32). LoRA needs none:
    its adapters are float32 over a base kept in the dtype asked for."""
    if args.method != "full":
        return None
    dtype = resolve_dtype(args.dtype, args.device)
    return None if dtype == torch.float32 else dtype


def pad_batch(examples: Sequence[Example], pad_id: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded (ids, labels) (B, T). Padding is defined by each example's length, never by ``pad_id``:
    labels past a length are -100; with causal attention, real tokens never see the pads after them."""
    T = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), T), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), T), IGNORE, dtype=torch.long)
    for i, e in enumerate(examples):
        ids[i, : len(e.ids)] = torch.tensor(e.ids)
        labels[i, : len(e.labels)] = torch.tensor(e.labels)
    return ids.to(device), labels.to(device)


@dataclass
class PackedLayout:
    """Per-token positions and segment ids of a batch of packed rows (see ``encode.pack``)."""

    positions: torch.Tensor  # (B, T) position within each token's own example
    segment_ids: torch.Tensor  # (B, T) which example of its row a token belongs to; -1 for padding


def packed_layout(examples: Sequence[Example], T: int, device: str) -> PackedLayout | None:
    """The layout of a padded batch, or None when no row is packed (plain causal attention)."""
    if not any(e.segments for e in examples):
        return None
    positions = torch.zeros((len(examples), T), dtype=torch.long)
    segment_ids = torch.full((len(examples), T), -1, dtype=torch.long)
    for i, e in enumerate(examples):
        start = 0
        for s, length in enumerate(e.segments or (len(e.ids),)):
            positions[i, start : start + length] = torch.arange(length)
            segment_ids[i, start : start + length] = s
            start += length
    return PackedLayout(positions.to(device), segment_ids.to(device))


def scoring_ntk_alphas(model: nn.Module, examples: Sequence[Any], T: int) -> torch.Tensor | None:
    """(B, T) Qwen v1 dynamic-NTK alphas of a right-padded batch scored outside training: modeling_qwen.py
    fixes each sequence's alpha from its own unpadded length there (and keeps 1 in training, the default);
    a packed row's examples each from theirs. None where every alpha is 1."""
    base = unwrap(model)
    if model.training or not base.config.use_dynamic_ntk:
        return None
    alphas = torch.ones(len(examples), T)
    for i, e in enumerate(examples):
        start = 0
        for length in getattr(e, "segments", ()) or (len(e.ids),):
            alphas[i, start : start + length] = base.ntk_alpha(length)
            start += length
    return alphas if bool((alphas != 1).any()) else None


def token_losses(
    model: nn.Module,
    ids: torch.Tensor,
    labels: torch.Tensor,
    layout: PackedLayout | None = None,
    ntk_alphas: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, T-1) float32 cross entropy of each next token, 0 where the label is -100. ``ntk_alphas``: see
    ``scoring_ntk_alphas``."""
    extra: dict[str, Any] = {} if ntk_alphas is None else {"ntk_alphas": ntk_alphas}
    if layout is not None:
        extra |= {"positions": layout.positions, "segment_ids": layout.segment_ids}
    logits = model(ids, **extra)  # (B, T, V)
    target = labels[:, 1:]
    ce = F.cross_entropy(
        logits[:, :-1].flatten(0, 1).float(), target.flatten(), ignore_index=IGNORE, reduction="none"
    )
    return ce.view(target.shape)


def n_targets(e: Example) -> int:
    """Tokens that are predicted and labelled (the first token is never predicted)."""
    return sum(label != IGNORE for label in e.labels[1:])


def enable_gradient_checkpointing(model: nn.Module) -> None:
    """Recompute each decoder layer in the backward pass; parameter names stay untouched."""
    for layer in unwrap(model).model.layers:
        forward = layer.forward

        def checkpointed(*args, _forward=forward, **kwargs):
            return checkpoint(_forward, *args, use_reentrant=False, **kwargs)

        layer.forward = checkpointed


def warmup_steps(total: int, ratio: float) -> int:
    """Steps of linear warmup: ``ceil(ratio * total)``, as transformers' ``TrainingArguments`` counts them (a
    ratio whose product is under one step still warms up for one)."""
    return math.ceil(ratio * total)


def lr_lambda(total: int, warmup: int) -> Callable[[int], float]:
    """Linear warmup from 0, then cosine decay to zero: transformers' ``get_cosine_schedule_with_warmup``
    (step s < warmup takes s / warmup of the peak, so the first step's rate is 0 and the peak is at
    step ``warmup``), so a run logs the rates a transformers or trl run of the same settings does."""

    def f(step: int) -> float:
        if step < warmup:
            return step / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return f


@dataclass
class StepResult:
    loss: float
    tokens: int
    seconds: float
    grad_norm: float
    extra: dict[str, float] = field(default_factory=dict)


class Trainer:
    """Owns the order of examples and one optimizer step; SFT and DPO differ only in ``batch_loss``."""

    def __init__(
        self,
        model: nn.Module,
        examples: Sequence[Any],
        args: TrainArgs,
        world: World,
        pad_id: int,
        params: list[nn.Parameter],
    ) -> None:
        self.model, self.examples, self.args, self.world, self.pad_id = model, examples, args, world, pad_id
        self.params = params
        self.global_batch = args.batch_size * args.grad_accum * world.dp_size
        self.steps_per_epoch = max(1, math.ceil(len(examples) / self.global_batch))
        self.total_steps = args.max_steps or args.epochs * self.steps_per_epoch
        decay = [p for p in params if p.dim() >= 2]
        rest = [p for p in params if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": args.weight_decay}]
        if rest:
            groups.append({"params": rest, "weight_decay": 0.0})
        # Under FSDP a parameter is a DTensor, and each op on one goes through DTensor's dispatch: one
        # multi-tensor (foreach) update a group instead of one per tensor (a 32-expert MoE has 846 of them;
        # their per-tensor updates took 0.3 s a step over 2 ranks)
        sharded = any(isinstance(p, DTensor) for p in params)
        self.optimizer = torch.optim.AdamW(
            groups,
            lr=args.lr,
            betas=(args.adam_beta1, args.adam_beta2),
            eps=args.adam_epsilon,
            foreach=True if sharded else None,
        )
        warmup = warmup_steps(self.total_steps, args.warmup_ratio)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(self.total_steps, warmup)
        )
        self.step = 0
        self.step_indices: list[int] = []  # the global batch of the step being accumulated
        # experts a token is routed to (MoE models: what the load-balancing loss counts), else 0
        self.moe_top_k = next((m.top_k for m in unwrap(model).modules() if isinstance(m, MoEMLP)), 0)
        self.eval_metrics: dict[str, float] = {}  # extra held-out figures a subclass reports
        self.compute_dtype = mixed_precision(args)

    def computing(self) -> contextlib.AbstractContextManager:
        """Where the model runs: under autocast to the half dtype over float32 masters (``mixed_precision``),
        for training, evaluation and a reference alike, so each sees the same function of the weights."""
        if self.compute_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.args.device.split(":")[0], dtype=self.compute_dtype)

    def run_settings(self) -> dict[str, Any]:
        """What --resume must find unchanged beyond ``TrainArgs.RESUME_KEYS``: the global batch (any process
        count may take it on; another size draws other batches), and a subclass's loss settings."""
        return {"global_batch": self.global_batch}

    # ---- which examples -------------------------------------------------------------------------------
    def global_indices(self, step: int) -> list[int]:
        epoch, s = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.args.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.examples), generator=g).tolist()
        n = len(order)
        return [order[(s * self.global_batch + j) % n] for j in range(self.global_batch)]

    def micro_batches(self, step: int) -> tuple[list[list[int]], list[int]]:
        """(this rank's micro-batches, the whole global batch) of ``step``."""
        idx = self.global_indices(step)
        b, w, r = self.args.batch_size, self.world.dp_size, self.world.dp_rank
        mine = [idx[(k * w + r) * b : (k * w + r + 1) * b] for k in range(self.args.grad_accum)]
        return mine, idx

    # ---- one step --------------------------------------------------------------------------------------
    def normalizer(self, idx: list[int]) -> float:
        return float(sum(n_targets(self.examples[i]) for i in idx))

    def before_training(self, eval_examples: Sequence[Any] | None) -> None:
        """Runs once on the weights training starts from, before a checkpoint is loaded for --resume
        (DPO computes its reference there); nothing to do for supervised fine-tuning."""

    def routed(self) -> contextlib.AbstractContextManager[list[torch.Tensor]]:
        """Collects the routers' logits of the forwards run inside it, where the load-balancing loss is on
        (an empty list otherwise)."""
        if self.args.router_aux_loss_coef:
            return collect_router_logits(unwrap(self.model))
        return contextlib.nullcontext([])

    def balancing_loss(self, router_logits: list[torch.Tensor], lengths: list[int]) -> torch.Tensor:
        """The load-balancing loss of one right-padded forward over rows of these lengths (pads left out,
        as transformers leaves out what the attention mask masks)."""
        device = router_logits[0].device
        real = torch.arange(max(lengths), device=device) < torch.tensor(lengths, device=device)[:, None]
        return load_balancing_loss(router_logits, self.moe_top_k, real)

    def batch_loss(self, batch: list[int], normalizer: float) -> tuple[torch.Tensor, dict[str, float], int]:
        """(loss to backpropagate, summed metrics, tokens processed) for one micro-batch.

        With a load-balancing weight c (mixture-of-experts models), c times the micro-batch's balancing loss
        is added, weighted by its share of the global batch's tokens: one micro-batch holding the whole
        batch gives transformers' loss exactly (cross entropy + c * aux)."""
        examples = [self.examples[i] for i in batch]
        ids, labels = pad_batch(examples, self.pad_id, self.args.device)
        layout = packed_layout(examples, ids.shape[1], self.args.device)
        with self.routed() as router_logits:
            total = token_losses(self.model, ids, labels, layout).sum()
        tokens = sum(len(e.ids) for e in examples)
        loss, extra = total / normalizer, {}
        if router_logits:
            aux = self.balancing_loss(router_logits, [len(e.ids) for e in examples])
            step_tokens = sum(len(self.examples[i].ids) for i in self.step_indices)
            loss = loss + self.args.router_aux_loss_coef * aux * (tokens / step_tokens)
            extra["aux_loss"] = aux.item() * len(batch)  # summed, then divided by the batch's examples
        return loss, extra, tokens

    def accumulate(self, step: int) -> tuple[float, int, dict[str, float]]:
        """Forward and backward over this rank's share of ``step``; returns (global loss, tokens, metrics)."""
        # tensor-parallel ranks of one replica draw the same dropout masks on their replicated inputs
        torch.manual_seed(self.args.seed * 7919 + step * self.world.dp_size + self.world.dp_rank)
        random.seed(step)
        mine, idx = self.micro_batches(step)
        self.step_indices = idx  # the whole global batch of this step (its token count weighs the aux loss)
        norm = self.normalizer(idx)
        loss_sum, tokens, metrics = 0.0, 0, {}
        self.model.train()
        for k, batch in enumerate(mine):
            with gradient_sync(self.model, k == len(mine) - 1):
                with self.computing():  # the backward runs each op in the dtype its forward took
                    loss, extra, n = self.batch_loss(batch, norm)
                (loss * self.world.dp_size).backward()
            loss_sum += loss.item()
            tokens += n
            for key, v in extra.items():
                metrics[key] = metrics.get(key, 0.0) + v
        if self.world.tp > 1:  # experts' replicated LoRA factors: gradients summed over the ranks
            sum_partial_grads(unwrap(self.model), self.world.mesh["tp"].get_group())
        loss_sum = self.world.all_reduce_sum(loss_sum)
        tokens = int(self.world.all_reduce_sum(tokens))
        metrics = {k: self.world.all_reduce_sum(v) / len(idx) for k, v in metrics.items()}
        return loss_sum, tokens, metrics

    def train_step(self) -> StepResult:
        t0 = time.perf_counter()
        loss, tokens, metrics = self.accumulate(self.step)
        grad_norm = clip_grad_norm(self.params, self.args.max_grad_norm or float("inf"))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return StepResult(loss, tokens, time.perf_counter() - t0, grad_norm, metrics)

    @torch.no_grad()
    def evaluate(self, examples: Sequence[Example]) -> float:
        """Mean token cross entropy over ``examples`` (split over processes, summed exactly)."""
        self.model.eval()
        total, count = 0.0, 0.0
        mine = list(range(self.world.dp_rank, len(examples), self.world.dp_size))
        n_batches = math.ceil(math.ceil(len(examples) / self.world.dp_size) / self.args.batch_size)
        for b in range(n_batches):  # the same number of forwards on every rank (FSDP gathers in each)
            chunk = mine[b * self.args.batch_size : (b + 1) * self.args.batch_size]
            batch = [examples[j] for j in chunk] or [examples[0]]
            ids, labels = pad_batch(batch, self.pad_id, self.args.device)
            with self.computing():
                losses = token_losses(
                    self.model,
                    ids,
                    labels,
                    packed_layout(batch, ids.shape[1], self.args.device),
                    scoring_ntk_alphas(self.model, batch, ids.shape[1]),
                )
            if chunk:
                total += losses.sum().item()
                count += sum(n_targets(e) for e in batch)
        return self.world.all_reduce_sum(total) / max(1.0, self.world.all_reduce_sum(count))


def clip_grad_norm(params: Sequence[nn.Parameter], max_norm: float) -> float:
    """``clip_grad_norm_`` over parameters that may live on different device meshes (under FSDP x TP the
    tensor-parallel weights are on the 2-D mesh, the replicated norms on "dp" alone): one norm per mesh,
    combined, then every gradient scaled by the same factor. Returns the total norm before clipping."""
    by_mesh: dict[Any, list[nn.Parameter]] = {}
    for p in params:
        if p.grad is not None:
            by_mesh.setdefault(getattr(p.grad, "device_mesh", None), []).append(p)
    if not by_mesh:
        return 0.0
    norms = [
        full_tensor(torch.nn.utils.get_total_norm([p.grad for p in group])) for group in by_mesh.values()
    ]
    total = torch.stack([n.float().cpu() for n in norms]).norm()
    coef = float(torch.clamp(max_norm / (total + 1e-6), max=1.0))  # as clip_grad_norm_ computes it
    if coef < 1.0:
        for group in by_mesh.values():  # one multi-tensor op a mesh (each DTensor op is a dispatch)
            torch._foreach_mul_([p.grad for p in group], coef)
    return float(total)
