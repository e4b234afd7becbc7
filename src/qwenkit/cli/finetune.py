"""``qwenkit finetune MODEL DATA OUT``: supervised fine-tuning (LoRA, QLoRA or full), one or many processes.

The argument parsing lives in ``qwenkit.finetune.command`` because ``torchrun -m qwenkit.finetune`` runs
the same command in every process, and nothing outside cli/ may import cli/.
"""

from qwenkit.finetune.command import main

__all__ = ["main"]
