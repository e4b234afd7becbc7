"""Direct Preference Optimization of a LoRA adapter; the frozen reference is the base with adapters off.

``loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r)))`` where ``pi_y`` / ``ref_y`` are the summed
log-probabilities of completion y's tokens under the policy / reference (Rafailov et al. 2023). The
reference needs no second copy of the weights: it is the same model with every adapter disabled, and its
log-probabilities are computed once per pair and kept. Logged with trl's names: ``rewards/chosen``,
``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``, ``logps/rejected``
(and ``aux_loss`` where a mixture-of-experts model's load-balancing loss is on).

Data: ``{"prompt", "chosen", "rejected"}`` where each is a string or a list of messages, or
``{"messages": [prompt turns], "chosen", "rejected"}``. The completion is the last assistant turn, rendered
with the model's chat template like any SFT example.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from qwenkit.finetune.data import DataError, check_messages, read_objects
from qwenkit.finetune.encode import IGNORE, encode_messages
from qwenkit.finetune.lora import adapters_disabled
from qwenkit.finetune.trainer import Trainer, pad_batch
from qwenkit.tokenizer import Tokenizer, TokenizerError

METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margins",
    "rewards/accuracies",
    "logps/chosen",
    "logps/rejected",
)


@dataclass
class Completion:
    ids: list[int]
    labels: list[int]


@dataclass
class PreferencePair:
    chosen: Completion
    rejected: Completion
    where: str = ""

    @property
    def chosen_ids(self) -> list[int]:
        return self.chosen.ids

    @property
    def rejected_ids(self) -> list[int]:
        return self.rejected.ids


def _reply(where: str, value: Any, name: str) -> dict[str, Any]:
    if isinstance(value, str):
        return {"role": "assistant", "content": value}
    msgs = check_messages(where, value, name)
    if msgs[-1]["role"] != "assistant":
        raise DataError(f"{where}: field '{name}' must end with an assistant message")
    return msgs[-1]


def _prompt(where: str, obj: dict[str, Any]) -> list[dict[str, Any]]:
    if "prompt" in obj:
        p = obj["prompt"]
        if isinstance(p, str):
            if not p:
                raise DataError(f"{where}: field 'prompt' is empty")
            return [{"role": "user", "content": p}]
        return check_messages(where, p, "prompt", need_assistant=False)
    if "messages" in obj:
        return check_messages(where, obj["messages"], "messages", need_assistant=False)
    raise DataError(f"{where}: expected a 'prompt' (or 'messages') field with 'chosen' and 'rejected'")


def only_last_turn(labels: list[int]) -> list[int]:
    """Keep the labels of the last labelled run (the completion); the prompt's own replies are context."""
    end = max(i for i, label in enumerate(labels) if label != IGNORE)
    start = end
    while start > 0 and labels[start - 1] != IGNORE:
        start -= 1
    return [label if start <= i <= end else IGNORE for i, label in enumerate(labels)]


def encode_pair(tokenizer: Tokenizer, where: str, obj: dict[str, Any], max_len: int) -> PreferencePair | None:
    prompt = _prompt(where, obj)
    seqs = []
    for name in ("chosen", "rejected"):
        if name not in obj:
            raise DataError(f"{where}: field '{name}' is missing")
        try:
            ids, labels = encode_messages(
                tokenizer, [*prompt, _reply(where, obj[name], name)], obj.get("tools")
            )
        except TokenizerError as e:
            raise DataError(f"{where}: {e}") from None
        labels = only_last_turn(labels)[:max_len]
        if all(label == IGNORE for label in labels[1:]):
            return None
        seqs.append(Completion(ids[:max_len], labels))
    return PreferencePair(seqs[0], seqs[1], where)


def load_pairs(
    tokenizer: Tokenizer, path: str | Path, max_len: int
) -> tuple[list[PreferencePair], dict[str, int]]:
    pairs, dropped = [], 0
    for where, obj in read_objects(path):
        pair = encode_pair(tokenizer, where, obj, max_len)
        if pair is None:
            dropped += 1
        else:
            pairs.append(pair)
    if not pairs:
        raise DataError(f"{path}: no preference pair has a completion within --max-len {max_len}")
    return pairs, {"pairs": len(pairs), "dropped": dropped}


def sequence_logps(model, seqs: list[Completion], pad_id: int, device: str) -> torch.Tensor:
    """(N,) summed log-probabilities of each sequence's labelled tokens."""
    ids, labels = pad_batch(seqs, pad_id, device)
    logits = model(ids)[:, :-1].float()  # (N, T-1, V)
    target = labels[:, 1:]
    mask = target != IGNORE
    logp = torch.gather(F.log_softmax(logits, -1), 2, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (logp * mask).sum(-1)


def dpo_loss(
    pi_c: torch.Tensor, pi_r: torch.Tensor, ref_c: torch.Tensor, ref_r: torch.Tensor, beta: float
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-pair sigmoid DPO loss and trl's per-pair metrics."""
    chosen_reward = beta * (pi_c - ref_c)
    rejected_reward = beta * (pi_r - ref_r)
    losses = -F.logsigmoid(chosen_reward - rejected_reward)
    metrics = {
        "rewards/chosen": chosen_reward.detach(),
        "rewards/rejected": rejected_reward.detach(),
        "rewards/margins": (chosen_reward - rejected_reward).detach(),
        "rewards/accuracies": (chosen_reward > rejected_reward).float(),
        "logps/chosen": pi_c.detach(),
        "logps/rejected": pi_r.detach(),
    }
    return losses, metrics


class DPOTrainer(Trainer):
    beta: float = 0.1

    def __init__(self, *args: Any, beta: float = 0.1, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.beta = beta
        self._ref: dict[tuple[int, int], tuple[float, float]] = {}

    def normalizer(self, idx: list[int]) -> float:
        return float(len(idx))

    def reference_logps(self, pairs: list[PreferencePair], key: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reference log-probs, computed once per pair (base model = adapters off, no dropout anywhere)."""
        missing = [i for i, _ in enumerate(pairs) if (key, id(pairs[i])) not in self._ref]
        if missing:
            with torch.no_grad(), adapters_disabled(self.model):
                seqs = [pairs[i].chosen for i in missing] + [pairs[i].rejected for i in missing]
                lp = sequence_logps(self.model, seqs, self.pad_id, self.args.device)
            for j, i in enumerate(missing):
                self._ref[(key, id(pairs[i]))] = (float(lp[j]), float(lp[len(missing) + j]))
        ref = [self._ref[(key, id(p))] for p in pairs]
        return torch.tensor([r[0] for r in ref]), torch.tensor([r[1] for r in ref])

    def pair_losses(self, pairs: list[PreferencePair]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Per-pair losses and metrics. On a mixture-of-experts model with the load-balancing loss on, c
        times the balancing loss of the policy's forward over all 2n completions is added to each pair's
        loss, as trl does: their mean is then trl's loss for the batch."""
        ref_c, ref_r = self.reference_logps(pairs, 0)
        seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
        with self.routed() as router_logits:
            lp = sequence_logps(self.model, seqs, self.pad_id, self.args.device)
        n = len(pairs)
        losses, metrics = dpo_loss(lp[:n], lp[n:], ref_c.to(lp.device), ref_r.to(lp.device), self.beta)
        if router_logits:
            aux = self.balancing_loss(router_logits, [len(s.ids) for s in seqs])
            losses = losses + self.args.router_aux_loss_coef * aux
            metrics["aux_loss"] = aux.detach().expand(n)
        return losses, metrics

    def batch_loss(self, batch: list[int], normalizer: float):
        pairs = [self.examples[i] for i in batch]
        losses, metrics = self.pair_losses(pairs)
        tokens = sum(len(p.chosen.ids) + len(p.rejected.ids) for p in pairs)
        return losses.sum() / normalizer, {k: float(v.sum()) for k, v in metrics.items()}, tokens

    @torch.no_grad()
    def evaluate(self, pairs) -> float:
        """Mean DPO loss on held-out pairs; their mean metrics go to ``eval_metrics`` (eval_rewards/...)."""
        self.model.eval()
        sums: dict[str, float] = {}
        total = 0.0
        mine = pairs[self.world.dp_rank :: self.world.dp_size]
        for i in range(0, len(mine), self.args.batch_size):
            chunk = mine[i : i + self.args.batch_size]
            ref_c, ref_r = self.reference_logps(chunk, 1)
            lp = sequence_logps(
                self.model,
                [p.chosen for p in chunk] + [p.rejected for p in chunk],
                self.pad_id,
                self.args.device,
            )
            losses, metrics = dpo_loss(lp[: len(chunk)], lp[len(chunk) :], ref_c, ref_r, self.beta)
            total += float(losses.sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v.sum())
        n = len(pairs)
        self.eval_metrics = {f"eval_{k}": self.world.all_reduce_sum(v) / n for k, v in sums.items()}
        return self.world.all_reduce_sum(total) / n
