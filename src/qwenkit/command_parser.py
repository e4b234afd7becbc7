"""The commands' argument parser: a bad option is one line on stderr and exit 2, as every other user error.

argparse's own error prints the whole usage block first (13-19 lines for `chat` and `serve`) and then
``prog: error: ...``; the README promises one line, the same shape as the errors the commands raise.
Beside cli/ rather than in it: finetune's command lives in finetune/, which may not import cli/.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NoReturn


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``error: <what>; see `<prog> --help``` and exit 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")


def int_at_least(low: int, unit: str = "") -> Callable[[str], int]:
    """An argparse ``type``: an integer of at least ``low``, else the option's one-line error."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}{unit}, got {value}")
        return value

    return parse
