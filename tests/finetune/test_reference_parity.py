"""Fine-tuning numerics against the reference stack, on tiny random Qwen2 and Qwen3 models in float32:
supervised losses and gradients equal transformers' with labels derived here from the chat template; LoRA
initialization, dropout, clipping and AdamW steps equal peft's; DPO's loss and implicit rewards equal the
formula on transformers + peft log-probabilities of trl's completions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from factories import hf_model, save_hf, write_tiny_chat_model

from qwenkit.checkpoint import load_model
from qwenkit.finetune.data import read_records
from qwenkit.finetune.distributed import World
from qwenkit.finetune.encode import IGNORE, Example, encode_all
from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_modules, lora_parameters
from qwenkit.finetune.trainer import TrainArgs, Trainer, enable_gradient_checkpointing
from qwenkit.generate import tokenizer_for

PAD = 151643  # <|endoftext|>
# Qwen2.5's template without its tools branch (its default system prompt, no think block)
QWEN25_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. "
    "You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (message.role == 'system' and loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": "It is 3."},
    ],
    [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes, 你好."}],
    [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
        {"role": "assistant", "content": "d e f"},
        {"role": "user", "content": "g"},
        {"role": "assistant", "content": "done, and a somewhat longer final reply to pad the others"},
    ],
    [{"role": "user", "content": "Count."}, {"role": "assistant", "content": "1 2 3 4 5 6 7 8 9 10"}],
]


@pytest.fixture(scope="module", params=["qwen2", "qwen3"])
def chat_model(request, tmp_path_factory) -> Path:
    """A tiny random chat checkpoint: Qwen3 with its own template, or Qwen2 with Qwen2.5's."""
    path = write_tiny_chat_model(tmp_path_factory.mktemp("chat") / request.param, family=request.param)
    if request.param == "qwen2":
        config = json.loads((path / "tokenizer_config.json").read_text())
        config["chat_template"] = QWEN25_TEMPLATE
        (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def template_labels(hf_tokenizer, messages) -> tuple[list[int], list[int]]:
    """(ids, labels) derived here from transformers' rendering: the tokens lying inside an assistant turn's
    body and its <|im_end|> are labelled, past the header and past Qwen3's empty think block."""
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False)
    enc = hf_tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    header, empty_think, end = "<|im_start|>assistant\n", "<think>\n\n</think>\n\n", "<|im_end|>"
    bodies, at = [], 0
    while (found := text.find(header, at)) != -1:
        start = found + len(header)
        start += len(empty_think) if text.startswith(empty_think, start) else 0
        at = text.index(end, start) + len(end)
        bodies.append((start, at))
    labels = [
        token if any(s <= a and b <= e for s, e in bodies) else IGNORE
        for token, (a, b) in zip(enc["input_ids"], enc["offset_mapping"], strict=True)
    ]
    return enc["input_ids"], labels


def test_label_mask_is_transformers_assistant_tokens_mask(tmp_path):
    """On Qwen2.5's template with generation markers around each reply and its <|im_end|>, the labels are
    transformers' ``return_assistant_tokens_mask``: a token is labelled when any of its characters is in a
    reply, so a reply opening with newlines, which merge with the header's into one token, keeps them."""
    import shutil

    import transformers
    from factories import qwen3_tokenizer_dir

    from qwenkit.finetune.encode import encode_messages
    from qwenkit.tokenizer import load_tokenizer

    for name in ("tokenizer.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, tmp_path / name)
    config = json.loads((qwen3_tokenizer_dir() / "tokenizer_config.json").read_text())
    marked = QWEN25_TEMPLATE.replace(
        "{%- for message in messages %}",
        "{%- for message in messages %}{%- if message.role == 'assistant' %}"
        "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message.content + '<|im_end|>' }}"
        "{% endgeneration %}{{- '\\n' }}{%- elif true %}",
    ).replace("{%- endif %}{%- endfor %}", "{%- endif %}{%- endif %}{%- endfor %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": marked}))
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    tok = load_tokenizer(tmp_path)
    straddling = [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "\nHello!"},
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "\n\n  y \n"},
    ]
    for messages in [*CONVERSATIONS, straddling]:
        out = hf_tokenizer.apply_chat_template(
            messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        want = [i if m else IGNORE for i, m in zip(out["input_ids"], out["assistant_masks"], strict=True)]
        assert encode_messages(tok, messages) == (out["input_ids"], want)
    assert hf_tokenizer.decode([i for i in want if i != IGNORE]).startswith("\n\nHello!<|im_end|>")


def padded(rows: list[tuple[list[int], list[int]]], pad_id: int = PAD) -> dict[str, torch.Tensor]:
    """transformers' inputs of right-padded rows: ids, attention mask, labels (-100 on the pads)."""
    width = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), width), pad_id)
    labels = torch.full((len(rows), width), IGNORE)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, : len(row_ids)], labels[i, : len(row_ids)] = torch.tensor(row_ids), torch.tensor(row_labels)
        mask[i, : len(row_ids)] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def test_sft_loss_and_gradients_equal_transformers_with_the_templates_labels(chat_model, tmp_path):
    """Multi-turn ChatML conversations of different lengths: qwenkit's ids and label mask equal those derived
    here from transformers' template rendering, and its loss (summed token cross entropy over the labelled
    tokens of the whole batch) and every weight's gradient equal transformers' loss of the padded batch,
    however the batch is split into micro-batches. Averaging the micro-batches' own means instead (the
    gradient-accumulation bug transformers fixed in 4.46) would give another loss."""
    import transformers

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    examples = encode_all(tokenizer_for(chat_model), read_records(data), max_len=4096)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(chat_model))
    rows = [template_labels(hf_tokenizer, m) for m in CONVERSATIONS]
    assert [(e.ids, e.labels) for e in examples] == rows
    assert len({len(ids) for ids, _ in rows}) == len(rows)  # every row padded but the longest

    reference = transformers.AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).train()
    out = reference(**padded(rows))
    out.loss.backward()
    want = {n: p.grad for n, p in reference.named_parameters()}
    micro_means = [reference(**padded(rows[k : k + 2])).loss.item() for k in (0, 2)]

    model, _ = load_model(chat_model, "float32", progress=False)
    model.requires_grad_(True)
    for batch_size, grad_accum in ((4, 1), (2, 2), (1, 4)):
        model.zero_grad(set_to_none=True)
        args = TrainArgs(method="full", batch_size=batch_size, grad_accum=grad_accum, progress=False)
        trainer = Trainer(model, examples, args, World(), PAD, list(model.parameters()))
        loss, _, _ = trainer.accumulate(0)
        assert loss == pytest.approx(out.loss.item(), rel=1e-6), (batch_size, grad_accum)
        got = {n: p.grad for n, p in model.named_parameters()}
        assert got.keys() == want.keys()
        for name, grad in want.items():
            torch.testing.assert_close(got[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # (a random model's token losses are all near log(vocab): the two differ 40x the tolerance above)
    assert sum(micro_means) / 2 != pytest.approx(out.loss.item(), rel=1e-5)


def test_held_out_loss_is_the_token_mean_of_the_whole_set_whatever_the_batch(chat_model, tmp_path):
    """The held-out loss is transformers' loss of the whole set as one padded batch (the mean over all its
    labelled tokens) at any --batch-size; transformers' Trainer reports the mean of each batch's own mean
    (weighted by its examples) as eval_loss, which depends on the batching (README, Loss and steps)."""
    import transformers

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    examples = encode_all(tokenizer_for(chat_model), read_records(data), max_len=4096)
    rows = [(e.ids, e.labels) for e in examples]
    reference = transformers.AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    with torch.no_grad():
        whole = reference(**padded(rows)).loss.item()
        trainer_eval_loss = sum(reference(**padded(rows[k : k + 2])).loss.item() for k in (0, 2)) / 2
    model, _ = load_model(chat_model, "float32", progress=False)
    for batch_size in (1, 2, 4):
        args = TrainArgs(method="full", batch_size=batch_size, progress=False)
        trainer = Trainer(model, examples, args, World(), PAD, list(model.parameters()))
        assert trainer.evaluate(examples) == pytest.approx(whole, rel=1e-6), batch_size
    assert trainer_eval_loss != pytest.approx(whole, rel=1e-5)


def reference_rows(examples: list[Example], batch: list[int]) -> dict[str, torch.Tensor]:
    return padded([(examples[i].ids, examples[i].labels) for i in batch], pad_id=0)


@pytest.mark.parametrize(
    ("family", "rslora", "checkpointing"),
    [("qwen2", False, False), ("qwen3", True, False), ("qwen2", False, True)],
)
def test_lora_init_dropout_clipping_and_adamw_steps_equal_peft(family, rslora, checkpointing, tmp_path):
    """With one seed, qwenkit's new adapter is peft's (A Kaiming-uniform, B zero, drawn in the same order),
    its dropout draws peft's masks (on each adapter's input, in the forward's order) and three steps with
    gradient accumulation, warmup + cosine, weight decay and clipping of the adapters' global norm (torch's
    clip_grad_norm_ over the LoRA parameters alone) give peft + AdamW's losses, norms and weights, also
    with --gradient-checkpointing (the recomputed forward draws the same dropout masks)."""
    import peft
    import transformers
    from transformers.optimization import get_cosine_schedule_with_warmup

    model_dir = save_hf(hf_model(family, tie_word_embeddings=False), tmp_path / "m")
    model, _ = load_model(model_dir, "float32", progress=False)
    torch.manual_seed(0)
    apply_lora(model, LoRAConfig(r=4, alpha=16, dropout=0.1, use_rslora=rslora))
    if checkpointing:
        enable_gradient_checkpointing(model)
    base = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    ref = peft.get_peft_model(
        base,
        peft.LoraConfig(r=4, lora_alpha=16, lora_dropout=0.1, use_rslora=rslora, target_modules=targets),
    ).train()
    ref_params = {n: p for n, p in ref.named_parameters() if p.requires_grad}
    mine = {
        f"base_model.model.{name}.{side}.default.weight": getattr(m, side).weight
        for name, m in lora_modules(model).items()
        for side in ("lora_A", "lora_B")
    }
    assert list(mine) == list(ref_params)
    for name, p in ref_params.items():
        assert torch.equal(mine[name], p), name  # the same initial adapter
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a non-zero B, so A's gradients and the dropout matter
        for name, p in ref_params.items():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
                mine[name].copy_(p)

    examples = []
    for length in (9, 14, 6, 11, 17, 8, 12, 5):
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * 3 + ids[3:]))
    args = TrainArgs(
        batch_size=2,
        grad_accum=2,
        lr=1e-3,
        warmup_ratio=0.3,
        weight_decay=0.1,
        max_grad_norm=0.5,
        max_steps=3,
        progress=False,
    )
    trainer = Trainer(model, examples, args, World(), 0, lora_parameters(model))
    opt = torch.optim.AdamW(ref_params.values(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1)
    schedule = get_cosine_schedule_with_warmup(opt, 1, 3)  # ceil(0.3 x 3) warmup steps
    with torch.no_grad():  # the dropout is on: it changes a batch's loss
        first = reference_rows(examples, trainer.micro_batches(0)[0][0])
        torch.manual_seed(0)
        with_dropout = ref(**first).loss.item()
        without_dropout = ref.eval()(**first).loss.item()
        ref.train()
    assert abs(with_dropout - without_dropout) > 1e-4
    for step in range(3):
        micro, idx = trainer.micro_batches(step)
        n_items = torch.tensor(sum(examples[i].n_labelled for i in idx))  # label 0 is -100 here
        torch.manual_seed(args.seed * 7919 + step)  # the dropout seed qwenkit's step takes
        loss = 0.0
        for batch in micro:
            out = ref(**reference_rows(examples, batch), num_items_in_batch=n_items)
            out.loss.backward()
            loss += out.loss.item()
        norm = float(torch.nn.utils.clip_grad_norm_(list(ref_params.values()), 0.5))
        opt.step()
        schedule.step()
        opt.zero_grad()
        got = trainer.train_step()
        assert got.loss == pytest.approx(loss, rel=1e-6), step
        assert got.grad_norm == pytest.approx(norm, rel=1e-5), step
        assert norm > 0.5  # clipped
        for name, p in ref_params.items():
            torch.testing.assert_close(mine[name], p, rtol=1e-5, atol=1e-7, msg=f"{name} at step {step}")
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)


PAIRS = [
    {
        "prompt": [{"role": "user", "content": "Number 3?"}],
        "chosen": [{"role": "assistant", "content": "Gladly: 3 is fine."}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
    {
        "prompt": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello"},
            {"role": "user", "content": "Sum 2 and 3"},
        ],
        "chosen": [{"role": "assistant", "content": "5"}],
        "rejected": [{"role": "assistant", "content": "6, I think, or maybe 7"}],
    },
    {
        "prompt": [{"role": "user", "content": "你好"}],
        "chosen": [{"role": "assistant", "content": "你好！有什么可以帮你？"}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    },
]


def completion_logps(model, hf_tokenizer, prompt, reply, skip: int) -> float:
    """trl's completion of ``reply`` (the template's prompt + reply past the prompt with its generation
    prompt), less its first ``skip`` tokens: their summed log-probabilities under a transformers model."""
    ids = hf_tokenizer.apply_chat_template(prompt + reply, tokenize=True, return_dict=True)["input_ids"]
    kwargs = {"tokenize": True, "return_dict": True, "add_generation_prompt": True}
    start = len(hf_tokenizer.apply_chat_template(prompt, **kwargs)["input_ids"]) + skip
    with torch.no_grad():
        logp = F.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)
    return sum(float(logp[t - 1, ids[t]]) for t in range(start, len(ids)))


def test_dpo_loss_and_rewards_equal_the_formula_on_peft_logps_of_trls_completions(chat_model, tmp_path):
    """The sigmoid DPO loss and trl's metrics of a batch equal the formula on log-probabilities summed over
    trl's completions (reply, <|im_end|>, newline) by transformers + peft (policy: the adapter qwenkit
    wrote; reference: the base). Qwen3's empty think block opens both completions of a pair: qwenkit leaves it
    out of the rewards and log-probabilities, and the loss and margins are trl's either way."""
    import peft
    import transformers
    from factories import randomize_lora, save_lora

    from qwenkit.finetune.dpo import DPOTrainer
    from qwenkit.finetune.preference_data import load_pairs

    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in PAIRS))
    pairs, _ = load_pairs(tokenizer_for(chat_model), data, max_len=256)
    model, _ = load_model(chat_model, "float32", progress=False)
    config = LoRAConfig(r=4, alpha=8, dropout=0.0)
    torch.manual_seed(0)  # lora_A: the same whichever tests ran before
    apply_lora(model, config)
    randomize_lora(model, seed=0, std=0.3)
    adapter = save_lora(model, tmp_path / "adapter", config, chat_model)
    args = TrainArgs(batch_size=3, progress=False)
    trainer = DPOTrainer(model, pairs, args, World(), PAD, lora_parameters(model), beta=0.3)
    trainer.before_training(None)
    loss, metrics, _ = trainer.batch_loss([0, 1, 2], normalizer=3.0)

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(chat_model))
    base = transformers.AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32).eval()
    policy = peft.PeftModel.from_pretrained(
        transformers.AutoModelForCausalLM.from_pretrained(chat_model, dtype=torch.float32), adapter
    ).eval()
    think = 4 if "qwen3" in chat_model.name else 0  # <think>\n\n</think>\n\n
    for skip in {0, think}:
        rows = torch.tensor(
            [
                [
                    completion_logps(m, hf_tokenizer, p["prompt"], p[side], skip)
                    for m in (policy, base)
                    for side in ("chosen", "rejected")
                ]
                for p in PAIRS
            ],
            dtype=torch.float64,
        )
        pc, pr, rc, rr = rows.unbind(1)
        chosen, rejected = 0.3 * (pc - rc), 0.3 * (pr - rr)
        assert loss.item() == pytest.approx(float(-F.logsigmoid(chosen - rejected).mean()), abs=1e-5)
        assert metrics["rewards/margins"] == pytest.approx(float((chosen - rejected).sum()), abs=1e-4)
        if skip == think:  # qwenkit's completions
            assert metrics["rewards/chosen"] == pytest.approx(float(chosen.sum()), abs=1e-4)
            assert metrics["rewards/rejected"] == pytest.approx(float(rejected.sum()), abs=1e-4)
            assert metrics["rewards/accuracies"] == float((chosen > rejected).sum())
            assert metrics["logps/chosen"] == pytest.approx(float(pc.sum()), rel=1e-5)
            assert metrics["logps/rejected"] == pytest.approx(float(pr.sum()), rel=1e-5)
    assert abs(metrics["rewards/margins"]) > 1e-2  # the adapter makes a difference
