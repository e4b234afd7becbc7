"""Packing: a row of several short examples computes exactly what the examples compute one by one (each
attends only within itself, positions restart at 0), so packing changes speed, never the loss."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from factories import hf_model, save_hf

from qwenkit.checkpoint import load_model
from qwenkit.finetune.distributed import World
from qwenkit.finetune.encode import IGNORE, Example, pack
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_parameters
from qwenkit.finetune.trainer import TrainArgs, Trainer, n_targets, packed_layout, pad_batch


def short_examples() -> list[Example]:
    """Varied lengths; odd ones are plain text (every token labelled, the first one too)."""
    g = torch.Generator().manual_seed(3)
    out = []
    for i, length in enumerate((7, 12, 5, 9, 15, 6, 11, 8)):
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        labels = list(ids) if i % 2 else [IGNORE] * (length // 2) + ids[length // 2 :]
        out.append(Example(ids, labels, f"d.jsonl:{i + 1}"))
    return out


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def tiny_dir(request, tmp_path_factory):
    return save_hf(hf_model(request.param), tmp_path_factory.mktemp(request.param) / "m")


def test_packed_rows_keep_each_examples_tokens_and_targets():
    examples = short_examples()
    rows = pack(examples, max_len=30)
    assert [r.segments for r in rows] == [(7, 12, 5), (9, 15, 6), (11, 8)]
    assert sum(n_targets(r) for r in rows) == sum(n_targets(e) for e in examples)
    layout = packed_layout(rows, 30, "cpu")
    assert layout.positions[0, :24].tolist() == [*range(7), *range(12), *range(5)]
    assert layout.segment_ids[2].tolist() == [0] * 11 + [1] * 8 + [-1] * 11
    assert packed_layout(examples, 15, "cpu") is None  # unpacked batches take the plain causal path


def test_finetune_data_report_counts_the_packed_rows(tmp_path):
    import json

    from qwenkit.finetune.run import load_examples
    from qwenkit.finetune.trainer import TrainArgs
    from qwenkit.tokenizer import load_tokenizer

    sys.path.insert(0, str(Path(__file__).parents[1] / "tokenizer"))
    from tokenizer_data import QWEN3_DIR

    data = tmp_path / "d.jsonl"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for _ in range(5)))
    tok = load_tokenizer(QWEN3_DIR)
    one = len(load_examples(tok, data, TrainArgs(max_len=64), None)[0][0].ids)
    rows, stats = load_examples(tok, data, TrainArgs(max_len=2 * one, packing=True), None)
    assert [r.segments for r in rows] == [(one, one), (one, one), (one,)]
    assert stats.packed_rows == 3 and stats.summary().endswith(", packed into 3 rows")


def test_packed_logits_equal_one_by_one(tiny_dir):
    model, _ = load_model(tiny_dir, "float32", progress=False)
    examples = short_examples()
    rows = pack(examples, max_len=30)
    ids, _ = pad_batch(rows, pad_id=0, device="cpu")
    layout = packed_layout(rows, ids.shape[1], "cpu")
    with torch.no_grad():
        packed = model(ids, positions=layout.positions, segment_ids=layout.segment_ids)
        leaky = model(ids)  # the whole row causal: later examples see earlier ones
        alone = [model(torch.tensor([e.ids]))[0] for e in examples]
    k, leaks = 0, 0.0
    for r, row in enumerate(rows):
        start = 0
        for length in row.segments:
            torch.testing.assert_close(packed[r, start : start + length], alone[k], rtol=1e-5, atol=1e-5)
            leaks = max(leaks, (leaky[r, start : start + length] - alone[k]).abs().max().item())
            start += length
            k += 1
    assert leaks > 1e-2  # the check above would catch attention across examples


def test_packed_loss_and_gradients_equal_one_by_one(tiny_dir):
    examples = short_examples()
    rows = pack(examples, max_len=30)

    def loss_and_grads(data):
        model, _ = load_model(tiny_dir, "float32", progress=False)
        torch.manual_seed(0)
        apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0))
        with torch.no_grad():  # a non-zero B, so every LoRA factor gets a gradient
            for p in lora_parameters(model):
                p.add_(torch.randn_like(p) * 0.05)
        args = TrainArgs(batch_size=len(data), progress=False)
        trainer = Trainer(model, data, args, World(), pad_id=0, params=lora_parameters(model))
        loss, tokens, _ = trainer.accumulate(0)  # one global batch = every example once
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return loss, tokens, grads, trainer.evaluate(data)

    loss_p, tokens_p, grads_p, eval_p = loss_and_grads(rows)
    loss_1, tokens_1, grads_1, eval_1 = loss_and_grads(examples)
    assert tokens_p == tokens_1 == sum(len(e.ids) for e in examples)
    assert abs(loss_p - loss_1) < 1e-6 and abs(eval_p - eval_1) < 1e-6
    for name in grads_1:
        torch.testing.assert_close(grads_p[name], grads_1[name], rtol=1e-4, atol=1e-7)


def test_segments_refuse_a_kv_cache_step(tiny_dir):
    model, _ = load_model(tiny_dir, "float32", progress=False)
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.tensor([[1, 2]]), segment_ids=torch.zeros(1, 2, dtype=torch.long), cache=object())
