"""Adapters in peft's on-disk format, both ways.

``adapter_config.json`` (peft_type LORA, task_type CAUSAL_LM, r, lora_alpha, target_modules, ...) and
``adapter_model.safetensors`` with keys ``base_model.model.<module>.lora_A.weight`` (r, in) and
``.lora_B.weight`` (out, r), metadata ``{"format": "pt"}``. Without the ``base_model.model.`` prefix peft
silently ignores the tensors, so it is always written; reading accepts both, and peft's in-memory
``.default`` adapter name, and the bare decoder's module names (``layers.N.*``: peft on transformers'
``AutoModel``, as Qwen3-Embedding is fine-tuned) as ours (``model.layers.N.*``). Only long-standing
config keys are written, so older peft versions load it too.
"""

from __future__ import annotations

import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from qwenkit.checkpoint.bare import prefixed
from qwenkit.checkpoint.files import load_torch_state
from qwenkit.checkpoint.saver import write_safetensors
from qwenkit.errors import AdapterNotFound, CheckpointError
from qwenkit.finetune.distributed import full_tensor
from qwenkit.finetune.lora import VLLM_DEFAULT_MAX_RANK, LoRAConfig, LoRALinear, apply_lora, lora_modules
from qwenkit.finetune.stacked_experts import from_stacked, is_stacked
from qwenkit.finetune.v1_names import from_v1, is_v1, to_v1
from qwenkit.model.adapter_bank import LoRAPair

# (module name, lora_A, lora_B) -> the part of the pair a model holds (a tensor-parallel rank's slices)
PairPart = Callable[[str, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
# (module name, weight) -> the part of a whole weight a model holds (a tensor-parallel rank's rows)
CopyPart = Callable[[str, torch.Tensor], torch.Tensor]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."
# peft config fields that make its forward something other than x @ A.T @ B.T * scaling on the named
# modules. Some of these files hold only lora_A/lora_B, so without this check they loaded and ran wrong:
# an activated LoRA everywhere instead of after its invocation tokens, layer_replication's adapters on
# the wrong layers.
UNSUPPORTED_VARIANTS = {
    "use_dora": "DoRA",
    "alora_invocation_tokens": "activated LoRA, applied only after its invocation tokens",
    "layer_replication": "adapters on peft's copies of base layers",
    "use_bdlora": "block-diagonal LoRA",
    "lora_bias": "a bias on lora_B",
    "trainable_token_indices": "trained embedding rows",
    "arrow_config": "Arrow routing",
    "kasa_config": "KaSA",
    "monteclora_config": "MonteCLoRA",
    # its lora_A is narrower than the layer's input, so it was refused as an adapter of another model
    "use_qalora": "QALoRA, whose lora_A reads the input averaged in groups of qalora_group_size",
}
# peft inits that move the base weights (W - B0·A0 kept as the base: PiSSA, OLoRA, CorDA, LoRA-GA;
# LoftQ's quantized residual): their saved pairs add up to the model only on that changed base, and peft
# rebuilds it while loading, so on the model's own weights they ran 0.1-0.2 logits off peft's
BASE_CHANGING_INITS = ("pissa", "olora", "corda", "lora_ga", "loftq")
_KEY = re.compile(r"^(?:base_model\.model\.)?(.+)\.(lora_A|lora_B)(?:\.default)?\.weight$")
# peft saves a whole copy of the embedding and output head it holds an adapter for (save_embedding_layers,
# on by default when one is a target), and loading puts it in place of the model's own weights
_EMBEDDING_COPY = re.compile(
    r"^(?:base_model\.model\.)?((?:.+\.)?(?:embed_tokens|lm_head))(?:\.base_layer)?\.weight$"
)
_EMBEDDING_LORA = re.compile(r"^(?:base_model\.model\.)?(.+)\.lora_embedding_[AB](?:\.default)?$")
# VeLoRA (velora_config) compresses the activations kept for the backward pass: its forward, and peft's
# merge, are plain LoRA, and the projection it compresses with is training state (it was refused as an
# unknown tensor)
_VELORA_STATE = re.compile(r"^(?:base_model\.model\.)?.+\.lora_velora_embed(?:\.default)?$")


def adapter_config_json(config: LoRAConfig, base_model: str) -> dict[str, Any]:
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": config.use_rslora,
        "use_dora": False,
        "modules_to_save": None,
        "target_modules": sorted(config.target_modules),
        "inference_mode": True,
        "init_lora_weights": True,
        "layers_to_transform": None
        if config.layers_to_transform is None
        else list(config.layers_to_transform),
        "layers_pattern": None if config.layers_to_transform is None else "layers",
        "rank_pattern": dict(config.rank_pattern),
        "alpha_pattern": dict(config.alpha_pattern),
        "revision": None,
    }


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter tensors under peft's file keys (full tensors: call after gathering any shards)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{PREFIX}{name}.lora_A.weight"] = full_tensor(m.lora_A.weight).detach().cpu().contiguous()
        out[f"{PREFIX}{name}.lora_B.weight"] = full_tensor(m.lora_B.weight).detach().cpu().contiguous()
    return out


def save_adapter(
    model: nn.Module,
    out_dir: str | Path,
    config: LoRAConfig,
    base_model: str,
    tensors: dict[str, torch.Tensor] | None = None,
) -> None:
    """Write the two peft files into ``out_dir`` (an existing directory, usually an atomic temp dir)."""
    out = Path(out_dir)
    if config.r > VLLM_DEFAULT_MAX_RANK:
        print(
            f"note: rank {config.r} is above vLLM's default --max-lora-rank {VLLM_DEFAULT_MAX_RANK}; "
            f"serve it there with --max-lora-rank {config.r}",
            file=sys.stderr,
        )
    tensors = tensors or adapter_state_dict(model)
    data = adapter_config_json(config, base_model)
    model_config = getattr(model, "config", None)
    if getattr(model_config, "family", None) == "qwen":  # name v1's own modules (fused c_attn, w1/w2)
        modules, c_attn_alpha = to_v1(_group(tensors, out), config.r, config.alpha, config.use_rslora)
        tensors = {f"{PREFIX}{n}.{part}.weight": t for n, pair in modules.items() for part, t in pair.items()}
        data["target_modules"] = sorted({n.rsplit(".", 1)[-1] for n in modules})
        if data["layers_pattern"]:
            data["layers_pattern"] = "h"
        if c_attn_alpha is not None:
            data["rank_pattern"] = {"c_attn": 3 * config.r}
            data["alpha_pattern"] = {"c_attn": c_attn_alpha}
    (out / CONFIG_NAME).write_text(json.dumps(data, indent=2) + "\n")
    write_safetensors(out / WEIGHTS_NAME, tensors, {"format": "pt"})


def _group(tensors: dict[str, torch.Tensor], where) -> dict[str, dict[str, torch.Tensor]]:
    """{module: {"lora_A": A, "lora_B": B}} from file keys (with or without the peft prefix)."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None and (e := _EMBEDDING_LORA.match(key)):
            raise CheckpointError(
                f"{where}: {e.group(1)} has a LoRA on the embedding (lora_embedding_A/B), which qwenkit "
                "does not apply; train the adapter without the embedding in target_modules"
            )
        if m is None:
            raise CheckpointError(
                f"{where}: unexpected adapter tensor {key!r} (only lora_A/lora_B are supported)"
            )
        grouped.setdefault(prefixed(m.group(1)), {})[m.group(2)] = t
    for module, pair in grouped.items():
        if set(pair) != {"lora_A", "lora_B"}:
            raise CheckpointError(f"{where}: module {module} has {sorted(pair)} but needs lora_A and lora_B")
    return grouped


def read_adapter(
    path: str | Path,
) -> tuple[LoRAConfig, dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, torch.Tensor]]:
    """(config, {module name: {"lora_A": A, "lora_B": B}}, raw config, {module name: weight}) from a peft
    adapter directory; the last: peft's copies of the embedding or output head (``check_copies``)."""
    try:
        return _read_adapter(Path(path))
    except OSError as e:  # a directory the OS refuses (permission, a name too long): one line, no 500
        raise CheckpointError(f"{path}: cannot read the adapter: {e.strerror or e}") from None


def _read_adapter(
    d: Path,
) -> tuple[LoRAConfig, dict[str, dict[str, torch.Tensor]], dict[str, Any], dict[str, torch.Tensor]]:
    cfg_file = d / CONFIG_NAME
    if not cfg_file.is_file():
        raise AdapterNotFound(f"{d} is not an adapter directory: {CONFIG_NAME} not found")
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_file}: cannot read: {e}") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{cfg_file}: must hold a JSON object, not {type(raw).__name__}")
    if raw.get("peft_type") != "LORA":
        raise CheckpointError(
            f"{cfg_file}: field 'peft_type' must be \"LORA\" (got {raw.get('peft_type')!r})"
        )
    for key, what in UNSUPPORTED_VARIANTS.items():
        if raw.get(key):
            raise CheckpointError(f"{cfg_file}: {key} ({what}) is not supported; qwenkit applies plain LoRA")
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(BASE_CHANGING_INITS):
        raise CheckpointError(
            f"{cfg_file}: init_lora_weights {init!r} trains against a base peft changed at init, which "
            "qwenkit does not rebuild; save the adapter with peft's path_initial_model_for_weight_conversion "
            "(a plain LoRA adapter) and use that"
        )
    if raw.get("modules_to_save"):
        raise CheckpointError(f"{cfg_file}: modules_to_save {raw['modules_to_save']} is not supported")
    if raw.get("bias", "none") != "none":  # peft saves the base layers' biases, trained with it
        raise CheckpointError(
            f"{cfg_file}: bias={raw['bias']!r} (the base layers' biases trained with the adapter) is not "
            "supported; qwenkit applies plain LoRA"
        )
    if raw.get("fan_in_fan_out"):
        raise CheckpointError(f"{cfg_file}: fan_in_fan_out=true (Conv1D layers) is not supported")
    targets = raw.get("target_modules")
    tensors = _read_tensors(d)
    if raw.get("velora_config"):
        tensors = {k: t for k, t in tensors.items() if not _VELORA_STATE.match(k)}
    copies = {prefixed(m.group(1)): tensors.pop(k) for k in list(tensors) if (m := _EMBEDDING_COPY.match(k))}
    grouped = _group(tensors, d)
    if not grouped:
        raise CheckpointError(f"{d}: the adapter holds no tensors")
    layers = raw.get("layers_to_transform")
    if isinstance(layers, int):
        layers = [layers]
    names = sorted({n.rsplit(".", 1)[-1] for n in grouped})
    config = LoRAConfig(
        r=_number(cfg_file, raw, "r", 8, whole=True),
        alpha=_number(cfg_file, raw, "lora_alpha", 8, whole=False),
        dropout=0.0,
        target_modules=tuple(targets) if isinstance(targets, list) and targets else tuple(names),
        layers_to_transform=tuple(layers) if layers else None,
        use_rslora=bool(raw.get("use_rslora", False)),
        rank_pattern=dict(raw.get("rank_pattern") or {}),
        alpha_pattern=dict(raw.get("alpha_pattern") or {}),
    )
    return config, grouped, raw, copies


def check_copies(
    model: nn.Module, path: str | Path, copies: dict[str, torch.Tensor], part: CopyPart | None = None
) -> None:
    """CheckpointError unless each of peft's saved copies (``read_adapter``) is this model's own weight:
    the adapter is applied to the model's weights, so one trained with other embeddings (a resized
    vocabulary, trained rows) would run wrong. ``part``: (module name, copy) -> the part of it this
    model holds (a tensor-parallel rank's vocabulary rows)."""
    for name, copy in copies.items():
        if part is not None:
            copy = part(name, copy)
        try:
            module = model.get_submodule(name)
        except AttributeError:
            module = None
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.is_floating_point() and not weight.is_meta:
            same = weight.shape == copy.shape and torch.equal(copy.to(weight.device, weight.dtype), weight)
        else:  # a quantized layer holds no float weight to compare: its shape (a resized vocabulary)
            rows = getattr(module, "out_features", getattr(module, "num_embeddings", None))
            cols = getattr(module, "in_features", getattr(module, "embedding_dim", None))
            same = (rows, cols) == tuple(copy.shape)
        if not same:
            raise CheckpointError(
                f"{path}: the adapter holds its own {name} weights (peft's save_embedding_layers), which "
                "are not this model's; qwenkit applies an adapter to the model's own weights: merge it "
                "with peft instead"
            )


def _number(cfg_file: Path, raw: dict[str, Any], key: str, default: float, whole: bool) -> Any:
    """``raw[key]`` as a number (a positive int where ``whole``), or an error naming the field."""
    value = raw.get(key, default)
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or (whole and (value <= 0 or value != int(value))):
        kind = "a positive whole number" if whole else "a number"
        raise CheckpointError(f"{cfg_file}: field {key!r} must be {kind} (got {value!r})")
    return int(value) if whole else float(value)


def _read_tensors(d: Path) -> dict[str, torch.Tensor]:
    if (d / WEIGHTS_NAME).is_file():
        try:
            with safe_open(str(d / WEIGHTS_NAME), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        except Exception as e:  # safetensors raises its own error types for every corruption
            raise CheckpointError(f"{d / WEIGHTS_NAME}: cannot read: {e}") from None
    if (d / LEGACY_WEIGHTS_NAME).is_file():
        return load_torch_state(d / LEGACY_WEIGHTS_NAME)
    raise CheckpointError(f"{d}: neither {WEIGHTS_NAME} nor {LEGACY_WEIGHTS_NAME} found")


def adapter_pairs(
    model: nn.Module, path: str | Path
) -> tuple[LoRAConfig, dict[str, LoRAPair], dict[str, torch.Tensor]]:
    """The adapter's config, its update of each module under this model's module names (a Qwen v1
    adapter's fused ``c_attn`` split into q/k/v, stacked experts into one pair per expert), and peft's
    copies of the embedding or output head it holds (``read_adapter``, ``check_copies``)."""
    config, grouped, _, copies = read_adapter(path)

    def scaling_of(name: str, r: int) -> float:
        return config.scaling(r, config.for_module(name)[1])

    if is_v1(grouped):
        modules = from_v1(grouped, scaling_of)
    elif is_stacked(grouped):
        modules = from_stacked(grouped, model, scaling_of, lambda name: config.for_module(name)[0])
    else:
        for n, pair in grouped.items():  # peft sizes each pair from the config and refuses other tensors
            r = config.for_module(n)[0]
            if pair["lora_A"].shape[0] != r:
                raise CheckpointError(
                    f"{path}: {n} has lora_A of rank {pair['lora_A'].shape[0]}, but {CONFIG_NAME} gives it "
                    f"rank {r}; the weights and the config are of different adapters"
                )
        modules = {n: (pair, scaling_of(n, pair["lora_A"].shape[0])) for n, pair in grouped.items()}
    pairs = {n: LoRAPair(p["lora_A"], p["lora_B"], scaling) for n, (p, scaling) in modules.items()}
    return config, pairs, copies


@torch.no_grad()
def load_adapter(
    model: nn.Module, path: str | Path, part: PairPart | None = None, copy_part: CopyPart | None = None
) -> LoRAConfig:
    """Wrap the adapter's modules in ``LoRALinear`` and fill them; shapes must match this model exactly.

    ``part``: (module name, lora_A, lora_B) -> the pair this model holds of them (a tensor-parallel rank's
    slices, ``distributed.plan.shard_lora``); the pairs are checked against the model after it.
    ``copy_part``: the same for peft's copies of the embedding or head (``check_copies``)."""
    config, pairs, copies = adapter_pairs(model, path)
    check_copies(model, path, copies, copy_part)
    if part is not None:
        pairs = {n: LoRAPair(*part(n, p.a, p.b), p.scaling) for n, p in pairs.items()}
    missing = [n for n in pairs if not _has_linear(model, n)]
    if missing:
        raise CheckpointError(f"{path}: adapter targets {missing[0]}, which this model does not have")
    # Exact module names: only the modules the file names get an adapter.
    exact = {
        "target_modules": tuple(pairs),
        "layers_to_transform": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }
    apply_lora(model, LoRAConfig(**{**config.__dict__, **exact}))
    wrapped = lora_modules(model)
    for name, pair in pairs.items():
        _fill(wrapped[name], name, pair, path)
    return config


def _has_linear(model: nn.Module, name: str) -> bool:
    try:
        m = model.get_submodule(name)
    except AttributeError:
        return False
    return hasattr(m, "in_features") and hasattr(m, "out_features")


def _fill(m: LoRALinear, name: str, pair: LoRAPair, path) -> None:
    a, b, scaling = pair.a, pair.b, pair.scaling
    r = a.shape[0]
    if (
        a.dim() != 2
        or b.dim() != 2
        or tuple(a.shape) != (r, m.in_features)
        or tuple(b.shape)
        != (
            m.out_features,
            r,
        )
    ):
        raise CheckpointError(
            f"{path}: adapter for another model shape: {name} has lora_A {tuple(a.shape)} and lora_B "
            f"{tuple(b.shape)}, but this model needs ({r}, {m.in_features}) and ({m.out_features}, {r})"
        )
    device = m.lora_A.weight.device
    m.lora_A = nn.Linear(m.in_features, r, bias=False, device=device, dtype=torch.float32)
    m.lora_B = nn.Linear(r, m.out_features, bias=False, device=device, dtype=torch.float32)
    m.lora_A.weight.copy_(a.float())
    m.lora_B.weight.copy_(b.float())
    m.r, m.scaling = r, scaling
