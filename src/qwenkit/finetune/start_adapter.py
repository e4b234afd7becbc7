"""Training that starts from an existing LoRA adapter (``--adapter DIR``): SFT then DPO without a merge.

The policy starts as that adapter: its rank, alpha, rsLoRA, target modules and layers are read from its
``adapter_config.json`` and its weights from its file, by the reader ``generate --adapter`` and ``merge``
use (``adapter_io.load_adapter``). A LoRA option given beside it must agree with it, for a run that
silently trained another shape than the one asked for is worse than a refusal. DPO's reference is then
base + that adapter, as trl's recipe of loading the SFT adapter twice (``ref_adapter_name``).
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from qwenkit.errors import ConfigError
from qwenkit.finetune.adapter_io import CONFIG_NAME, load_adapter, read_adapter
from qwenkit.finetune.lora import LoRAConfig, lora_modules
from qwenkit.finetune.trainer import TrainArgs


def check_method(method: str, adapter: str | None) -> None:
    """Refuse ``--method full`` from an adapter: the whole model trains, not an adapter."""
    if adapter is not None and method == "full":
        raise ConfigError(
            f"--adapter {adapter} trains that LoRA adapter, --method full the whole model: merge the "
            "adapter first (qwenkit merge MODEL ADAPTER OUT) and fine-tune the merged model"
        )


def top_layers(layers: tuple[int, ...] | None, n_layers: int) -> int | None:
    """The N of --lora-layers N that ``layers`` (an adapter's layers_to_transform) are, or None if none."""
    if layers is None:
        return n_layers
    if sorted(layers) == list(range(n_layers - len(layers), n_layers)):
        return len(layers)
    return None


def starting_adapter(args: TrainArgs, n_layers: int) -> LoRAConfig:
    """The LoRA shape of ``args.adapter``, its config checked; LoRA options of ``args`` given beside it
    (not None, or rsLoRA on) must agree with it, and ``args`` then records the adapter's shape."""
    check_method(args.method, args.adapter)
    assert args.adapter is not None
    config = read_adapter(args.adapter)[0]
    where = Path(args.adapter) / CONFIG_NAME
    layers = config.layers_to_transform
    top = top_layers(layers, n_layers)
    targets = ",".join(sorted(config.target_modules))
    rows = (  # flag, as asked (None: not asked), as the adapter has it, the adapter's field and value
        ("--lora-r", args.lora_r, config.r, f"r {config.r}"),
        ("--lora-alpha", args.lora_alpha, config.alpha, f"lora_alpha {config.alpha:g}"),
        ("--rslora", True if args.use_rslora else None, config.use_rslora, "use_rslora false"),
        (
            "--target-modules",
            ",".join(sorted(args.target_modules)) or None,
            targets,
            f"target_modules {targets}",
        ),
        ("--lora-layers", args.lora_layers, top, f"layers_to_transform {list(layers) if layers else 'all'}"),
    )
    for flag, asked, has, field in rows:
        if asked is not None and asked != has:
            raise ConfigError(
                f"{_given(flag, asked)} disagrees with the adapter's {field} ({where}); --adapter "
                f"trains that adapter as it is: drop {flag}"
            )
    args.lora_r, args.lora_alpha, args.use_rslora = config.r, config.alpha, config.use_rslora
    args.target_modules = tuple(sorted(config.target_modules))
    args.lora_layers = None if top == n_layers else top
    args.adapter = str(Path(args.adapter).resolve())  # what training_args.json and --resume name
    return config


def _given(flag: str, asked: object) -> str:
    if asked is True:
        return flag
    return f"{flag} {asked:g}" if isinstance(asked, float) else f"{flag} {asked}"


def load_starting_adapter(model: nn.Module, path: str) -> list[str]:
    """Wrap ``model``'s layers in the adapter at ``path``, trainable (no dropout yet: ``set_dropout``);
    returns the wrapped module names."""
    load_adapter(model, path)
    return list(lora_modules(model))
