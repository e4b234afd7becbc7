"""``qwenkit`` itself: the version, and one-line errors for bad options in every command (exit 2)."""

from __future__ import annotations

import importlib
import subprocess
import sys
from importlib.metadata import version

import pytest

from qwenkit.cli import COMMANDS, main


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"qwenkit {version('qwenkit')}\n"
    assert main(["-V"]) == 0
    assert capsys.readouterr().out.startswith("qwenkit 0.")


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_bad_option_is_one_line(command, capsys):
    """argparse's own error printed the usage block (13-19 lines) before the error; each command's
    parser now prints one line that names the option and where the help is, and exits 2."""
    entry = importlib.import_module(f"qwenkit.cli.{command}").main
    with pytest.raises(SystemExit) as stop:
        entry(["--no-such-option"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.endswith(f"; see `qwenkit {command} --help`\n"), err
    assert err.count("\n") == 1
    assert "--no-such-option" in err or " required" in err


def test_bad_choice_through_the_console_script():
    """As a user runs it: an invalid --dtype value, one line naming the value and the choices."""
    run = subprocess.run(
        [sys.executable, "-m", "qwenkit.cli", "chat", "--dtype", "float7"], capture_output=True, text=True
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr == (
        "error: argument --dtype: invalid choice: 'float7' (choose from 'auto', 'float32', 'bfloat16', "
        "'float16'); see `qwenkit chat --help`\n"
    )
