"""Fine-tuning mixture-of-experts models: LoRA on every routed expert (and the shared one), full training and
QLoRA on quantized experts. Adapters move both ways between qwenkit and peft on transformers 5, which
stacks a layer's experts into one parameter: peft converts qwenkit's per-expert adapters on loading, and
qwenkit splits peft's stacked ones per expert."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from factories import qwen3_tokenizer_dir
from moe_models import hf_moe_model
from safetensors.torch import load_file

from qwenkit.checkpoint import load_model
from qwenkit.finetune.lora import merge_lora
from qwenkit.finetune.run import finetune
from qwenkit.finetune.trainer import TrainArgs

IDS = torch.tensor([[3, 17, 200, 5, 9, 41, 300, 7], [8, 1, 2, 99, 100, 4, 6, 250]])
QUESTIONS = ["What is 2 plus 2?", "Name a yellow fruit.", "What do bees make?", "Which planet is ours?"]


@pytest.fixture(scope="module", params=["qwen2_moe", "qwen3_moe"])
def chat_moe(request, tmp_path_factory):
    """A tiny random MoE checkpoint (Qwen2-MoE: shared expert; Qwen3-MoE: none) with the real tokenizer."""
    path = tmp_path_factory.mktemp(request.param) / "m"
    hf_moe_model(request.param, vocab_size=151936).save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt"):
        shutil.copy(qwen3_tokenizer_dir() / name, path / name)
    return path


@pytest.fixture
def data(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": f"Ahoy! {q[::-1]}"}]}
        for q in QUESTIONS * 2
    ]
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def args(**kw) -> TrainArgs:
    return TrainArgs(**{"max_steps": 3, "lr": 1e-2, "lora_r": 4, "lora_alpha": 8, "batch_size": 4, **kw})


def hf_logits(model_dir, adapter=None, via_peft: bool = False) -> torch.Tensor:
    """transformers 5's logits of IDS; with ``adapter`` folded into its weights by hand (each pair's
    B @ A * alpha / r added to the module it names; an expert's gate_proj and up_proj to the two halves of
    its rows of the stacked gate_up_proj), or loaded through peft."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        if adapter is not None and via_peft:
            return peft.PeftModel.from_pretrained(model, adapter).eval()(IDS).logits
        if adapter is not None:
            alpha = json.loads((adapter / "adapter_config.json").read_text())["lora_alpha"]
            tensors = load_file(adapter / "adapter_model.safetensors")
            for key, a in tensors.items():
                if ".lora_A." not in key:
                    continue
                delta = tensors[key.replace(".lora_A.", ".lora_B.")] @ a * (alpha / a.shape[0])
                name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
                _weight_of(model, name).add_(delta)
        return model(IDS).logits


def _weight_of(model, name: str) -> torch.Tensor:
    """The (out, in) weight, or view of a stacked expert parameter, that a per-expert module name means."""
    parent, _, proj = name.rpartition(".")
    if ".mlp.experts." not in name:
        return model.get_submodule(name).weight
    experts, _, index = parent.rpartition(".")
    stacked = model.get_submodule(experts)
    if proj == "down_proj":
        return stacked.down_proj[int(index)]
    rows = stacked.gate_up_proj[int(index)]
    half = rows.shape[0] // 2
    return rows[:half] if proj == "gate_proj" else rows[half:]


def qwenkit_logits(model_dir, adapter=None) -> torch.Tensor:
    model, _ = load_model(model_dir, "float32", progress=False, adapter=adapter)
    with torch.no_grad():
        return model(IDS)


@pytest.mark.slow
def test_lora_on_every_expert_loads_in_peft_with_the_same_logits(chat_moe, data, tmp_path):
    """The default targets reach every routed expert (and Qwen2-MoE's shared one). The adapter is written
    per expert, as transformers 4 and vLLM name them, with dropout 0 by default (peft on transformers 5
    refuses any other for stacked experts): the same logits as transformers with the pairs folded in."""
    out = finetune(chat_moe, data, tmp_path / "adapter", args())
    config = json.loads((chat_moe / "config.json").read_text())
    n_experts = config.get("num_experts") or config["num_local_experts"]  # transformers 5 writes the latter
    written = json.loads((out / "adapter_config.json").read_text())
    assert written["lora_dropout"] == 0.0
    tensors = load_file(out / "adapter_model.safetensors")
    prefix = "base_model.model.model.layers"
    for layer in range(config["num_hidden_layers"]):
        for e in range(n_experts):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                assert f"{prefix}.{layer}.mlp.experts.{e}.{proj}.lora_A.weight" in tensors
        has_shared = f"{prefix}.{layer}.mlp.shared_expert.down_proj.lora_B.weight" in tensors
        assert has_shared == bool(config.get("shared_expert_intermediate_size"))
    trained = [k for k, t in tensors.items() if ".experts." in k and "lora_B" in k and t.abs().sum() > 0]
    assert len(trained) > n_experts  # B starts at zero: the experts' gradients reached it

    ref = hf_logits(chat_moe, out)
    assert (ref - hf_logits(chat_moe)).abs().max() > 1e-3  # the adapter changes the answer
    torch.testing.assert_close(qwenkit_logits(chat_moe, out), ref, rtol=1e-4, atol=1e-5)
    if not config.get("shared_expert_intermediate_size"):
        # peft 0.21 stacks the experts' pairs itself. With a shared expert it leaves the routed experts'
        # pairs out (peft issue 3711: the shared expert's modules take the names), so only without one.
        torch.testing.assert_close(hf_logits(chat_moe, out, via_peft=True), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_on_the_router_when_named(chat_moe, data, tmp_path):
    """The router (``mlp.gate``) is left alone by default and adapted when named, as peft adapts it."""
    out = finetune(chat_moe, data, tmp_path / "adapter", args(target_modules=("gate", "q_proj")))
    tensors = load_file(out / "adapter_model.safetensors")
    routers = [k for k in tensors if k.endswith("mlp.gate.lora_B.weight")]
    assert routers and all(tensors[k].abs().sum() > 0 for k in routers)  # trained: routing weights' gradient
    ref = hf_logits(chat_moe, out)
    torch.testing.assert_close(qwenkit_logits(chat_moe, out), ref, rtol=1e-4, atol=1e-5)
    if not json.loads((chat_moe / "config.json").read_text()).get("shared_expert_intermediate_size"):
        # peft 0.21 refuses a Qwen2-MoE router as a module target (its conversion maps it for Qwen3-MoE)
        torch.testing.assert_close(hf_logits(chat_moe, out, via_peft=True), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_lora_dropout_on_experts_is_kept_when_asked_with_a_note(chat_moe, data, tmp_path, capsys):
    out = finetune(chat_moe, data, tmp_path / "adapter", args(max_steps=1, lora_dropout=0.1))
    assert json.loads((out / "adapter_config.json").read_text())["lora_dropout"] == 0.1
    assert "note: --lora-dropout 0.1 on routed experts or routers" in capsys.readouterr().err


def test_peft_stacked_expert_adapter_loads_in_qwenkit_with_the_same_logits(chat_moe, tmp_path):
    """peft on transformers 5 adapts the stacked gate_up_proj and down_proj parameters (one A and B each for
    all experts); qwenkit splits them per expert: the same logits, also once merged into the weights."""
    import peft
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(chat_moe, dtype=torch.float32)
    config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        # the routed experts, and the router
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"],
    )
    peft_model = peft.get_peft_model(model, config)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:  # A and B both random: a wrong expert or a wrong half would show
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    peft_model.eval()
    with torch.no_grad():
        ref = peft_model(IDS).logits
    peft_model.save_pretrained(tmp_path / "peft")
    keys = load_file(tmp_path / "peft" / "adapter_model.safetensors").keys()
    assert "base_model.model.model.layers.0.mlp.experts.base_layer.lora_A.weight" in keys  # stacked

    ours, _ = load_model(chat_moe, "float32", progress=False, adapter=tmp_path / "peft")
    with torch.no_grad():
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-5)
        merge_lora(ours)
        torch.testing.assert_close(ours(IDS), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_full_finetune_of_experts_and_router_loads_in_transformers(chat_moe, data, tmp_path):
    out = finetune(chat_moe, data, tmp_path / "full", args(method="full", max_steps=2, lr=1e-3))
    before, after = load_file(chat_moe / "model.safetensors"), load_file(out / "model.safetensors")
    for name in ("model.layers.0.mlp.gate.weight", "model.layers.0.mlp.experts.0.down_proj.weight"):
        assert name in after and not torch.equal(before[name], after[name]), name  # router and experts train
    torch.testing.assert_close(qwenkit_logits(out), hf_logits(out), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_qlora_trains_adapters_on_int4_experts(chat_moe, data, tmp_path):
    out = finetune(chat_moe, data, tmp_path / "qlora", args(method="qlora", qlora_bits=4))
    tensors = load_file(out / "adapter_model.safetensors")
    trained = [k for k, t in tensors.items() if ".experts." in k and "lora_B" in k and t.abs().sum() > 0]
    assert trained  # gradients flowed through the dequantized int4 experts
    ref = hf_logits(chat_moe, out)  # the adapter applies to the float model, as peft applies it
    torch.testing.assert_close(qwenkit_logits(chat_moe, out), ref, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["qwen2_moe-mixed", "qwen3_moe"])
def test_load_balancing_loss_and_gradients_equal_transformers(variant, tmp_path):
    """A config with output_router_logits turns the load-balancing loss on, with its router_aux_loss_coef:
    on a padded batch, the aux loss, the total loss and the gradients (routers, experts, attention) equal
    transformers 5's with labels and an attention mask, also with gradient checkpointing, and the routers'
    gradients move with it."""
    import transformers
    from factories import save_hf

    from qwenkit.finetune.distributed import World
    from qwenkit.finetune.encode import IGNORE, Example
    from qwenkit.finetune.run import prepare_model
    from qwenkit.finetune.trainer import Trainer, pad_batch

    model_dir = save_hf(
        hf_moe_model(variant, output_router_logits=True, router_aux_loss_coef=0.3), tmp_path / "m"
    )
    g = torch.Generator().manual_seed(0)
    examples = []
    for length, cut in ((11, 4), (7, 2), (9, 5)):
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        examples.append(Example(ids, [IGNORE] * cut + ids[cut:]))

    def ours(coef, checkpointing=False):
        args = TrainArgs(method="full", batch_size=3, progress=False, router_aux_loss_coef=coef)
        args.gradient_checkpointing = checkpointing
        prep = prepare_model(model_dir, args, World(), 16)
        trainer = Trainer(prep.model, examples, args, World(), 0, prep.params)
        loss, _, metrics = trainer.accumulate(0)
        grads = {n: p.grad.clone() for n, p in prep.base.named_parameters()}
        return loss, metrics, grads, trainer.micro_batches(0)[0][0]

    loss, metrics, grads, order = ours(None)  # the config's: on, 0.3
    ids, labels = pad_batch([examples[i] for i in order], 0, "cpu")
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([[len(examples[i].ids)] for i in order])).long()
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    out = hf(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    assert out.aux_loss is not None
    assert metrics["aux_loss"] == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert loss == pytest.approx(out.loss.item(), rel=1e-5)

    sparse = 1  # a sparse layer in both variants
    stacked = hf.model.layers[sparse].mlp.experts
    inter = stacked.down_proj.shape[-1]
    pairs = {
        f"model.layers.{sparse}.mlp.gate.weight": hf.model.layers[sparse].mlp.gate.weight.grad,
        "model.layers.0.self_attn.q_proj.weight": hf.model.layers[0].self_attn.q_proj.weight.grad,
        f"model.layers.{sparse}.mlp.experts.3.gate_proj.weight": stacked.gate_up_proj.grad[3, :inter],
        f"model.layers.{sparse}.mlp.experts.3.up_proj.weight": stacked.gate_up_proj.grad[3, inter:],
        f"model.layers.{sparse}.mlp.experts.5.down_proj.weight": stacked.down_proj.grad[5],
        "model.embed_tokens.weight": hf.model.embed_tokens.weight.grad,
    }
    for name, want in pairs.items():
        torch.testing.assert_close(grads[name], want, rtol=1e-4, atol=1e-6, msg=name)
    # recomputing each layer in the backward leaves the term and its gradients as they are
    _, _, recomputed, _ = ours(None, checkpointing=True)
    for name, grad in grads.items():
        torch.testing.assert_close(recomputed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    _, _, without, _ = ours(0.0)
    router = f"model.layers.{sparse}.mlp.gate.weight"
    assert (without[router] - grads[router]).abs().max() > 1e-3  # the term reaches the routers


@pytest.mark.parametrize("variant", ["dense", "qwen2_moe-mixed", "qwen3_moe"])
def test_activation_estimate_covers_what_autograd_keeps(variant, tmp_path):
    """The memory table's activations (full fine-tuning, no checkpointing) against the bytes autograd
    actually saves for the backward of a forward (every saved tensor's storage once, weights left out):
    at least that, and not more than 1.5 times it. MoE layers count their k experts, shared expert,
    router and the token copies the dispatch makes (before 2026-12-04 they counted a dense FFN of
    intermediate_size: 0.89 of the saved bytes for this Qwen3-MoE)."""
    from factories import hf_model, save_hf

    from qwenkit.finetune.estimate import estimate
    from qwenkit.finetune.trainer import token_losses

    hf = hf_model("qwen3") if variant == "dense" else hf_moe_model(variant)
    model, config = load_model(save_hf(hf, tmp_path / "m"), "float32", progress=False)
    model.train().requires_grad_(True)
    batch, seq = 2, 64
    ids = torch.randint(0, 512, (batch, seq), generator=torch.Generator().manual_seed(0))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: set[int] = set()
    saved = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights | seen:
            seen.add(storage.data_ptr())
            saved += storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        token_losses(model, ids, ids).sum()
    planned = estimate(config, torch.float32, "full", 0, batch, seq, checkpointing=False).activations
    assert saved <= planned <= 1.5 * saved, (saved, planned)


def test_an_idle_quantized_expert_trains_its_adapter_to_zero_gradients_without_dequantizing():
    """While training, an expert no token picked runs on zero rows so that its adapter gets a zero
    gradient (every rank then holds one). On a quantized base that call dequantizes nothing."""
    from torch import nn

    from qwenkit.finetune.lora import LoRAConfig, apply_lora, lora_modules
    from qwenkit.quant import QuantizedLinear, quantize_model_rtn

    model = nn.Sequential()
    model.add_module("down_proj", nn.Linear(64, 32, bias=False))
    quantize_model_rtn(model, bits=4, group_size=32, skip=())
    assert isinstance(model.down_proj, QuantizedLinear)
    apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, target_modules=("down_proj",)))
    lora = lora_modules(model)["down_proj"]
    lora.train()
    calls = []
    lora.base_layer.dequantize_packed = lambda dtype: calls.append(dtype)  # must not be reached
    y = lora(torch.zeros(0, 64, requires_grad=True))
    y.sum().backward()
    assert y.shape == (0, 32) and calls == []
    assert torch.equal(lora.lora_A.weight.grad, torch.zeros(4, 64))
    assert torch.equal(lora.lora_B.weight.grad, torch.zeros(32, 4))


def test_a_stacked_adapter_of_another_expert_count_is_refused(tmp_path):
    """8 experts' stacked pairs on a 4-expert model: the rows divide all the same (as rank 8 for 4
    experts), so the adapter's own rank decides, and the load is refused naming both counts."""
    from factories import save_hf
    from safetensors.torch import save_file

    from qwenkit.errors import CheckpointError

    model_dir = save_hf(hf_moe_model("qwen3_moe", num_experts=4, num_experts_per_tok=2), tmp_path / "m")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    config = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["q_proj"]}
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    key = "base_model.model.model.layers.0.mlp.experts.base_layer"
    pairs = {
        f"{key}.lora_A.weight": torch.randn(8 * 4, 64),
        f"{key}.lora_B.weight": torch.randn(2 * 32, 8 * 4),
    }
    save_file(pairs, adapter / "adapter_model.safetensors")
    with pytest.raises(
        CheckpointError, match="32 rank rows, 8 experts of rank 4, but this model has 4 experts"
    ):
        load_model(model_dir, "float32", progress=False, adapter=adapter)


@pytest.mark.parametrize("variant", ["qwen2_moe-mixed", "qwen3_moe"])
def test_dpo_adds_the_load_balancing_loss_as_trl_does(variant, tmp_path):
    """DPO on a config with output_router_logits: each pair's loss gains c x the balancing loss of the
    policy's forward over all chosen and rejected rows (pads masked), as trl adds transformers' aux_loss.
    The loss and the adapters' gradients equal that computed on transformers + peft, and the term moves
    the gradients (it is not silently off)."""
    import peft
    import torch.nn.functional as F
    import transformers
    from factories import save_hf

    from qwenkit.finetune.distributed import World
    from qwenkit.finetune.dpo import DPOTrainer
    from qwenkit.finetune.encode import IGNORE
    from qwenkit.finetune.lora import lora_modules
    from qwenkit.finetune.preference_data import Completion, PreferencePair
    from qwenkit.finetune.run import prepare_model
    from qwenkit.finetune.trainer import pad_batch

    model_dir = save_hf(
        hf_moe_model(variant, output_router_logits=True, router_aux_loss_coef=0.3), tmp_path / "m"
    )
    g = torch.Generator().manual_seed(1)

    def completion(length: int, cut: int) -> Completion:
        ids = torch.randint(0, 512, (length,), generator=g).tolist()
        return Completion(ids, [IGNORE] * cut + ids[cut:])

    pairs = [
        PreferencePair(completion(9, 4), completion(6, 4)),
        PreferencePair(completion(7, 3), completion(11, 3)),
    ]
    beta, targets = 0.5, ("q_proj", "v_proj")

    def ours(coef):
        args = TrainArgs(batch_size=2, progress=False, lora_r=4, lora_alpha=8, lora_dropout=0.0)
        args.target_modules, args.router_aux_loss_coef = targets, coef
        prep = prepare_model(model_dir, args, World(), 16)
        with torch.no_grad():  # B = 0 would make policy == reference
            for m in lora_modules(prep.base).values():
                m.lora_B.weight.copy_(
                    torch.randn(m.lora_B.weight.shape, generator=torch.Generator().manual_seed(2))
                )
        trainer = DPOTrainer(prep.model, pairs, args, World(), 0, prep.params, beta=beta)
        trainer.before_training(None)  # the reference log-probs, on the weights as they are
        loss, metrics, _ = trainer.batch_loss([0, 1], normalizer=2.0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in prep.base.named_parameters() if p.grad is not None}
        return loss.item(), metrics, grads, lora_modules(prep.base)

    loss, metrics, grads, modules = ours(None)  # the config's: on, 0.3

    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    policy = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets))
    ).train()
    with torch.no_grad():
        for name, m in modules.items():
            theirs = policy.get_submodule(f"base_model.model.{name}")
            theirs.lora_A["default"].weight.copy_(m.lora_A.weight)
            theirs.lora_B["default"].weight.copy_(m.lora_B.weight)
    seqs = [p.chosen for p in pairs] + [p.rejected for p in pairs]
    ids, labels = pad_batch(seqs, 0, "cpu")
    mask = (torch.arange(ids.shape[1])[None] < torch.tensor([[len(s.ids)] for s in seqs])).long()

    def logps(out) -> torch.Tensor:
        target = labels[:, 1:]
        lp = torch.gather(F.log_softmax(out.logits[:, :-1].float(), -1), 2, target.clamp(min=0)[..., None])
        return (lp.squeeze(-1) * (target != IGNORE)).sum(-1)

    with torch.no_grad(), policy.disable_adapter():
        ref = logps(policy(input_ids=ids, attention_mask=mask))
    out = policy(input_ids=ids, attention_mask=mask)
    pi = logps(out)
    assert out.aux_loss is not None
    margin = beta * ((pi[:2] - ref[:2]) - (pi[2:] - ref[2:]))
    want = (-F.logsigmoid(margin) + 0.3 * out.aux_loss).mean()  # trl: losses + coef * aux_loss, then the mean
    want.backward()

    assert metrics["aux_loss"] / 2 == pytest.approx(out.aux_loss.item(), rel=1e-5)
    assert loss == pytest.approx(want.item(), rel=1e-5)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"):
        theirs = policy.get_submodule(f"base_model.model.{name}")
        for part in ("lora_A", "lora_B"):
            torch.testing.assert_close(
                grads[f"{name}.{part}.weight"],
                getattr(theirs, part)["default"].weight.grad,
                rtol=1e-4,
                atol=1e-6,
            )
    _, without, plain, _ = ours(0.0)
    assert "aux_loss" not in without
    key = "model.layers.1.self_attn.q_proj.lora_A.weight"
    assert (plain[key] - grads[key]).abs().max() > 1e-4  # the term reaches the adapters
