"""Direct Preference Optimization: of a LoRA/QLoRA adapter against the base with adapters off (or, started
from an adapter, ``--adapter``, against base + that adapter), or of the whole model (``--method full``)
against its weights before training.

The loss compares each pair's log-ratios ``pi_y - ref_y`` (``pi_y`` / ``ref_y``: the summed log-probabilities
of completion y's tokens under the policy / the reference; Rafailov et al. 2023), as trl 1.16 defines them
for ``delta = (pi_c - ref_c) - (pi_r - ref_r)``:

- ``sigmoid`` (DPO): ``-log sigmoid(beta * delta)``
- ``hinge`` (SLiC): ``relu(1 - beta * delta)``
- ``ipo`` (IPO): ``(delta' - 1 / (2 beta))^2``, delta' from each log-ratio divided by its completion's length
- ``robust`` (rDPO, label smoothing e): ``((1-e) * -log sigmoid(beta delta) - e * -log sigmoid(-beta delta))
  / (1 - 2e)``

and two without a reference, on each completion's mean token log-probability ``a_y = pi_y / length_y``:

- ``simpo`` (SimPO, Meng et al. 2024; trl's CPO with ``cpo_alpha=0``):
  ``-log sigmoid(beta (a_c - a_r) - gamma)``
- ``orpo`` (ORPO, Hong et al. 2024, as trl): the chosen completions' cross entropy (per token, over the
  micro-batch) ``- beta log sigmoid(log odds_c - log odds_r)``, ``log odds_y = a_y - log(1 - exp(a_y))``;
  rewards are ``beta a_y``

``sft_weight`` w adds w times the chosen replies' cross entropy to any of the others (trl's
``loss_type=[..., "sft"]`` with ``loss_weights=[1, w]``: RPO with DPO; LLaMA-Factory's ``pref_ftx``).

The reference needs no second copy of the weights: its log-probabilities are computed for every training
and held-out pair before the first step (the base with adapters off, base + the starting adapter, or the
untouched full model; also when resuming, before the checkpoint is loaded) and kept. Logged with trl's
names: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``,
``logps/chosen``, ``logps/rejected`` (and ``aux_loss`` where a mixture-of-experts model's load-balancing
loss is on).

Data: see ``preference_data``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm import tqdm

from qwenkit.errors import ConfigError
from qwenkit.finetune.encode import IGNORE
from qwenkit.finetune.lora import adapters_disabled, dropout_off, training_base
from qwenkit.finetune.preference_data import Completion, PreferencePair
from qwenkit.finetune.trainer import Trainer, pad_batch, scoring_ntk_alphas

LOSS_TYPES = ("sigmoid", "hinge", "ipo", "robust", "simpo", "orpo")
REFERENCE_FREE = ("simpo", "orpo")
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


def check_loss(
    loss_type: str,
    beta: float,
    label_smoothing: float,
    simpo_gamma: float | None = None,
    sft_weight: float = 0.0,
) -> None:
    """Refuse settings trl would refuse, or that would silently do nothing (or train on NaN losses)."""
    for flag, value in (("--beta", beta), ("--sft-weight", sft_weight), ("--simpo-gamma", simpo_gamma)):
        if value is not None and not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value}")
    if sft_weight < 0:
        raise ConfigError(f"--sft-weight must not be negative, got {sft_weight}")
    if sft_weight and loss_type == "orpo":
        raise ConfigError("--sft-weight: ORPO's loss already holds the chosen replies' cross entropy")
    if simpo_gamma is not None and loss_type != "simpo":
        raise ConfigError("--simpo-gamma applies to --loss-type simpo")
    if loss_type not in LOSS_TYPES:
        raise ConfigError(f"unknown --loss-type {loss_type!r}; choose {', '.join(LOSS_TYPES)}")
    if not beta > 0:
        raise ConfigError(f"--beta must be positive, got {beta}")
    if label_smoothing and loss_type != "robust":
        raise ConfigError("--label-smoothing applies to --loss-type robust")
    if not 0 <= label_smoothing < 0.5:
        raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {label_smoothing}")


def sequence_logps(model, seqs: list[Completion], pad_id: int, device: str) -> torch.Tensor:
    """(N,) summed log-probabilities of each sequence's labelled tokens."""
    ids, labels = pad_batch(seqs, pad_id, device)
    alphas = scoring_ntk_alphas(model, seqs, ids.shape[1])  # held-out pairs of a Qwen v1 model
    logits = (model(ids) if alphas is None else model(ids, ntk_alphas=alphas))[:, :-1].float()  # (N, T-1, V)
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.gather(F.log_softmax(logits, -1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation on either side of -ln 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def chosen_cross_entropy(pi_c: torch.Tensor, chosen_lengths: torch.Tensor) -> torch.Tensor:
    """Per-pair shares of the chosen replies' cross entropy per token over these n pairs (n/T of each
    pair's summed token losses), so that their mean is that cross entropy, as trl computes it."""
    return -pi_c * (len(pi_c) / chosen_lengths.sum().clamp(min=1))


def reference_free_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    beta: float,
    loss_type: str,
    lengths: tuple[torch.Tensor, torch.Tensor],
    simpo_gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(per-pair losses, chosen rewards, rejected rewards) of SimPO or ORPO."""
    avg_c, avg_r = pi_c / lengths[0].clamp(min=1), pi_r / lengths[1].clamp(min=1)
    if loss_type == "simpo":
        losses = -F.logsigmoid(beta * (avg_c - avg_r) - simpo_gamma)
    else:
        log_odds = (avg_c - avg_r) - (log1mexp(avg_c) - log1mexp(avg_r))
        losses = chosen_cross_entropy(pi_c, lengths[0]) - beta * F.logsigmoid(log_odds)
    return losses, beta * avg_c, beta * avg_r


def dpo_loss(
    pi_c: torch.Tensor,
    pi_r: torch.Tensor,
    ref_c: torch.Tensor | None,
    ref_r: torch.Tensor | None,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    lengths: tuple[torch.Tensor, torch.Tensor] | None = None,
    simpo_gamma: float = 0.5,
    sft_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair loss of ``loss_type`` (the module docstring) and trl's per-pair metrics. ``lengths``: the
    chosen and rejected completions' token counts, which ``ipo``, ``simpo``, ``orpo`` and ``sft_weight``
    divide by; ``simpo`` and ``orpo`` take no reference (None)."""
    losses, metrics = _preference_loss(
        pi_c, pi_r, ref_c, ref_r, beta, loss_type, label_smoothing, lengths, simpo_gamma
    )
    if sft_weight:
        if lengths is None:
            raise ValueError("sft_weight needs the completions' lengths")
        losses = losses + sft_weight * chosen_cross_entropy(pi_c, lengths[0])
    return losses, metrics


def _preference_loss(pi_c, pi_r, ref_c, ref_r, beta, loss_type, label_smoothing, lengths, simpo_gamma):
    if loss_type in REFERENCE_FREE:
        if lengths is None:
            raise ValueError(f"the {loss_type} loss needs the completions' lengths")
        losses, chosen_reward, rejected_reward = reference_free_loss(
            pi_c, pi_r, beta, loss_type, lengths, simpo_gamma
        )
        return losses, _metrics(chosen_reward, rejected_reward, pi_c, pi_r)
    if ref_c is None or ref_r is None:
        raise ValueError(f"the {loss_type} loss needs the reference's log-probabilities")
    chosen_ratio, rejected_ratio = pi_c - ref_c, pi_r - ref_r
    delta = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    elif loss_type == "ipo":
        if lengths is None:
            raise ValueError("the ipo loss needs the completions' lengths")
        per_token = chosen_ratio / lengths[0].clamp(min=1) - rejected_ratio / lengths[1].clamp(min=1)
        losses = (per_token - 1 / (2 * beta)) ** 2
    elif loss_type == "robust":
        e = label_smoothing
        losses = (-(1 - e) * F.logsigmoid(beta * delta) + e * F.logsigmoid(-beta * delta)) / (1 - 2 * e)
    else:
        raise ValueError(f"unknown loss type {loss_type!r}")
    return losses, _metrics(beta * chosen_ratio, beta * rejected_ratio, pi_c, pi_r)


def _metrics(chosen_reward, rejected_reward, pi_c, pi_r) -> dict[str, torch.Tensor]:
    return {
        "rewards/chosen": chosen_reward.detach(),
        "rewards/rejected": rejected_reward.detach(),
        "rewards/margins": (chosen_reward - rejected_reward).detach(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "logps/chosen": pi_c.detach(),
        "logps/rejected": pi_r.detach(),
    }


class DPOTrainer(Trainer):
    def __init__(
        self,
        *args: Any,
        beta: float = 0.1,
        loss_type: str = "sigmoid",
        label_smoothing: float = 0.0,
        simpo_gamma: float | None = None,
        sft_weight: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        check_loss(loss_type, beta, label_smoothing, simpo_gamma, sft_weight)
        self.sft_weight = sft_weight
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing
        self.simpo_gamma = 0.5 if simpo_gamma is None else simpo_gamma  # trl's default
        self._ref: dict[int, tuple[float, float]] = {}  # id(pair) -> reference (chosen, rejected) log-probs

    def run_settings(self) -> dict[str, Any]:
        return {
            **super().run_settings(),
            "beta": self.beta,
            "loss_type": self.loss_type,
            "label_smoothing": self.label_smoothing,
            "simpo_gamma": self.simpo_gamma,
            "sft_weight": self.sft_weight,
        }

    def normalizer(self, idx: list[int]) -> float:
        return float(len(idx))

    def before_training(self, eval_pairs: list[PreferencePair] | None) -> None:
        """The reference log-probabilities of every training and held-out pair, on the weights as they are
        now: the base (adapters off), base + the adapter training started from (``--adapter``, its dropout
        off), or for full fine-tuning the model before its first step. Each pair is scored in the mode its
        policy will be: training pairs as a training step runs the model (Qwen v1's LogN attention is off
        there, as in modeling_qwen.py), held-out pairs as ``evaluate`` does, so the policy starts exactly at
        its reference. Replicas share the pairs out and sum the results; each runs the same number of
        forwards (FSDP gathers in each). SimPO and ORPO have no reference."""
        if self.loss_type in REFERENCE_FREE:
            return
        w, r, b = self.world.dp_size, self.world.dp_rank, self.args.batch_size
        sets = [(list(self.examples), True), (list(eval_pairs or []), False)]
        counts = [math.ceil(math.ceil(len(pairs) / w) / b) for pairs, _ in sets]
        bar = tqdm(
            total=sum(counts),
            desc="reference log-probabilities",
            disable=not (self.world.is_main and self.args.progress),
            dynamic_ncols=True,
        )
        self._ref = {}
        # base + the starting adapter (--adapter), as the policy starts; else the base, adapters off
        reference = dropout_off(self.model) if self.args.adapter else adapters_disabled(self.model)
        with bar, torch.no_grad(), reference, training_base(), self.computing():
            for (pairs, training), n_batches in zip(sets, counts, strict=True):
                if not pairs:  # the same on every rank
                    continue
                self.model.train(training)  # no adapter dropout either way
                found = torch.zeros(len(pairs), 2, dtype=torch.float64)
                for k in range(n_batches):
                    chunk = list(range(r + k * b * w, min(len(pairs), r + (k + 1) * b * w), w))
                    batch = [pairs[i] for i in chunk] or [pairs[0]]
                    lp = self.logps(batch)
                    if chunk:
                        found[chunk] = torch.stack([lp[: len(batch)], lp[len(batch) :]], 1).double().cpu()
                    bar.update(1)
                found = self.world.sum_over_replicas(found)
                self._ref.update(
                    {id(p): (float(found[i, 0]), float(found[i, 1])) for i, p in enumerate(pairs)}
                )
        self.model.eval()

    def logps(self, pairs: list[PreferencePair]) -> torch.Tensor:
        """(2n,) summed log-probabilities of the pairs' completions under the model: all chosen, then all
        rejected, in one padded forward."""
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        return sequence_logps(self.model, seqs, self.pad_id, self.args.device)

    def reference_logps(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, torch.Tensor]:
        ref = [self._ref[id(p)] for p in pairs]
        return torch.tensor([x[0] for x in ref]), torch.tensor([x[1] for x in ref])

    def losses(
        self, pairs: list[PreferencePair], lp: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics from the policy's log-probs ``lp`` (all chosen, then all rejected)."""
        n = len(pairs)
        ref_c = ref_r = None
        if self.loss_type not in REFERENCE_FREE:
            ref_c, ref_r = (x.to(lp.device) for x in self.reference_logps(pairs))
        lengths = tuple(
            torch.tensor([float(getattr(p, side).targets) for p in pairs], device=lp.device)
            for side in ("chosen", "rejected")
        )
        return dpo_loss(
            lp[:n],
            lp[n:],
            ref_c,
            ref_r,
            self.beta,
            self.loss_type,
            self.label_smoothing,
            lengths,
            self.simpo_gamma,
            self.sft_weight,
        )

    def pair_losses(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics. On a mixture-of-experts model with the load-balancing loss on, c
        times the balancing loss of the policy's forward over all 2n completions is added to each pair's
        loss, as trl does: their mean is then trl's loss for the batch."""
        with self.routed() as router_logits:
            lp = self.logps(pairs)
        losses, metrics = self.losses(pairs, lp)
        if router_logits:
            lengths = [len(p.chosen.ids) for p in pairs] + [len(p.rejected.ids) for p in pairs]
            aux = self.balancing_loss(router_logits, lengths)
            losses = losses + self.args.router_aux_loss_coef * aux
            metrics["aux_loss"] = aux.detach().expand(len(pairs))
        return losses, metrics

    def batch_loss(self, batch: list[int], normalizer: float):
        pairs = [self.examples[i] for i in batch]
        losses, metrics = self.pair_losses(pairs)
        tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
        return losses.sum() / normalizer, {k: float(v.sum()) for k, v in metrics.items()}, tokens

    @torch.no_grad()
    def evaluate(self, pairs) -> float:
        """Mean loss on held-out pairs; their mean metrics go to ``eval_metrics`` (eval_rewards/...)."""
        self.model.eval()
        sums: dict[str, float] = {}
        total = 0.0
        mine = pairs[self.world.dp_rank :: self.world.dp_size]
        b = self.args.batch_size
        n_batches = math.ceil(math.ceil(len(pairs) / self.world.dp_size) / b)
        for k in range(n_batches):  # the same number of forwards on every rank (FSDP gathers in each)
            chunk = mine[k * b : (k + 1) * b]
            batch = chunk or pairs[:1]
            with training_base(), self.computing():  # as the reference was scored
                lp = self.logps(batch)
            if not chunk:
                continue
            losses, metrics = self.losses(chunk, lp)
            total += float(losses.sum())
            for key, v in metrics.items():
                sums[key] = sums.get(key, 0.0) + float(v.sum())
        n = len(pairs)
        self.eval_metrics = {f"eval_{k}": self.world.all_reduce_sum(sums.get(k, 0.0)) / n for k in METRICS}
        return self.world.all_reduce_sum(total) / n
