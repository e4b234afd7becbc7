"""The commands' argument parser: a bad option is one line on stderr and exit 2, as every other user error.

argparse's own error prints the whole usage block first (13-19 lines for `chat` and `serve`) and then
``prog: error: ...``; the README promises one line, the same shape as the errors the commands raise.
Beside cli/ rather than in it: finetune's command lives in finetune/, which may not import cli/.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn


class _Probe(Exception):
    """An error met while looking for unknown options (see ``CommandParser.error``)."""


class CommandParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``error: <what>; see `<prog> --help``` and exit 2."""

    _given: list[str] | None = None
    _probing = False

    def parse_known_args(self, args=None, namespace=None):  # argparse's signature
        if not self._probing:
            self._given = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str) -> NoReturn:
        if self._probing:
            raise _Probe(message)
        # argparse checks for missing arguments before unknown ones: `--promt hi` said -p was required
        unknown = self._unknown_options() if " required" in message else []
        if unknown:
            message = f"unrecognized arguments: {' '.join(unknown)}"
        self.exit(2, f"error: {message}; see `{self.prog} --help`\n")

    def _unknown_options(self) -> list[str]:
        """The options given that this parser does not know, found by parsing again with nothing required."""
        required = [a for a in self._actions if a.required] + [
            g for g in self._mutually_exclusive_groups if g.required
        ]
        for item in required:
            item.required = False
        self._probing = True
        try:
            _, extra = super().parse_known_args(self._given or [], argparse.Namespace())
        except _Probe:
            return []
        finally:
            self._probing = False
            for item in required:
                item.required = True
        return [a for a in extra if a.startswith("-") and a != "-"]


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
