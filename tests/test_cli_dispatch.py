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


@pytest.mark.parametrize("module", ["qwenkit", "qwenkit.cli"])
def test_python_dash_m_runs_the_command(module):
    """`python -m qwenkit` once failed ("No module named qwenkit.__main__"); both spellings run the CLI."""
    done = subprocess.run([sys.executable, "-m", module, "--version"], capture_output=True, text=True)
    assert (done.returncode, done.stdout) == (0, f"qwenkit {version('qwenkit')}\n"), done.stderr
    done = subprocess.run([sys.executable, "-m", module, "nosuch"], capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: unknown command 'nosuch' ")


def test_unknown_command_is_one_line(capsys):
    """An unknown command printed a line, a blank line and the 20-line usage, where the README (and every
    other user error) promises one `error: ...` line; it names the commands, or the one meant."""
    assert main(["nosuch"]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "error: unknown command 'nosuch' (the commands: generate, chat, info, tokenize, template, embed, "
        "convert, quantize, profile, serve, eval, finetune, dpo, merge, filter); see `qwenkit --help`\n"
    )
    assert main(["genrate", "-p", "hi"]) == 2
    assert (
        capsys.readouterr().err
        == "error: unknown command 'genrate' (did you mean 'generate'?); see `qwenkit --help`\n"
    )


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
    assert "--no-such-option" in err  # not the required argument it also lacks, which argparse checks first


def test_a_misspelt_option_is_named_before_a_missing_argument(capsys):
    """`generate --promt hi` said "one of the arguments -p/--prompt --prompt-ids is required", sending the
    user to an option they had typed; the misspelt option is the problem to name."""
    from qwenkit.cli import generate

    with pytest.raises(SystemExit) as stop:
        generate.main(["--promt", "hi", "--max-tokens", "3"])
    assert stop.value.code == 2
    assert (
        capsys.readouterr().err == "error: unrecognized arguments: --promt; see `qwenkit generate --help`\n"
    )
    with pytest.raises(SystemExit):  # no unknown option: the missing one is still what is said
        generate.main(["--max-tokens", "3"])
    assert "is required" in capsys.readouterr().err


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


def test_a_file_that_cannot_be_written_is_one_line(capsys):
    """OSError (a read-only directory, a full disk, a path through a file) is the user's to mend: one
    line with the reason and the path, exit 2, not a traceback."""
    from qwenkit.cli import run_command

    def denied(argv):
        raise PermissionError(13, "Permission denied", "/data/out/.x.partial-1")

    def moved(argv):
        raise IsADirectoryError(21, "Is a directory", "/tmp/.out.1", None, "out")  # as os.replace raises

    assert run_command(denied, []) == 2
    assert capsys.readouterr().err == "error: Permission denied: /data/out/.x.partial-1\n"
    assert run_command(moved, []) == 2
    assert capsys.readouterr().err == "error: Is a directory: /tmp/.out.1 -> out\n"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--lr", "-1"], "--lr must be a positive number, got -1.0"),
        (["--lr", "nan"], "--lr must be a positive number, got nan"),
        (["--lr", "1e38"], "--lr must be at most 3.4e+37 (AdamW's first step overflows float32), got 1e+38"),
        (
            ["--adam-beta1", "0.99", "--lr", "1e37"],
            "--lr must be at most 3.4e+36 (AdamW's first step overflows float32), got 1e+37",
        ),
        (["--adam-beta1", "1"], "--adam-beta1 must be in [0, 1), got 1.0"),
        (["--adam-beta2", "-0.1"], "--adam-beta2 must be in [0, 1), got -0.1"),
        (["--adam-beta2", "nan"], "--adam-beta2 must be in [0, 1), got nan"),
        (["--adam-epsilon", "0"], "--adam-epsilon must be a positive number, got 0.0"),
        (["--adam-epsilon", "inf"], "--adam-epsilon must be a positive number, got inf"),
        (["--epochs", "0"], "--epochs must be at least 1, got 0"),
        (["--max-steps", "0"], "--max-steps must be at least 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
        (["--lora-r", "0"], "--lora-r must be at least 1, got 0"),
        (["--warmup-ratio", "1"], "--warmup-ratio must be in [0, 1), got 1.0"),
        (["--lora-dropout", "-0.1"], "--lora-dropout must be in [0, 1), got -0.1"),
        (["--weight-decay", "-1"], "--weight-decay must be 0 or more, got -1.0"),
        (["--max-len", "1"], "--max-len must be at least 2 (a token and the next), got 1"),
        (["--eval-every", "5"], "--eval-every applies with --eval-data (the held-out data to evaluate)"),
    ],
)
@pytest.mark.parametrize("command", ["finetune", "dpo"])
def test_training_numbers_no_run_can_use_are_refused_first(command, args, message, tmp_path, capsys):
    """Before anything loads (torch's optimizer raised a traceback for a negative rate; --epochs 0 wrote
    an untrained adapter; --max-steps 0 meant no limit)."""
    argv = [command, str(tmp_path / "model"), str(tmp_path / "data.jsonl"), str(tmp_path / "out"), *args]
    assert main(argv) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_while_the_command_imports_is_quiet(monkeypatch, capsys):
    """Importing a command takes torch's import (most of a second): Ctrl-C there exits 130 with no
    traceback, as it does later."""
    import qwenkit.cli

    def interrupted(name):
        raise KeyboardInterrupt

    monkeypatch.setattr(qwenkit.cli, "_import_without_gc", interrupted)
    assert qwenkit.cli.main(["chat", "-p", "hi"]) == 130
    assert capsys.readouterr().err == "\n"


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_a_reader_gone_before_the_usage_is_quiet(flag):
    """`qwenkit --help | head -1` once ended in a BrokenPipeError traceback: the usage was printed to a pipe
    whose reader had closed it."""
    child = subprocess.Popen(
        [sys.executable, "-m", "qwenkit", flag], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    child.stdout.close()
    assert (child.wait(timeout=60), child.stderr.read()) == (0, b"")


def test_every_command_runs_without_docstrings():
    """Under ``python -OO`` (PYTHONOPTIMIZE=2, as some container images set) docstrings are None: `qwenkit
    eval` built its description from its module's docstring and every run of it, ``--help`` included,
    ended in an AttributeError traceback."""
    code = (
        "import sys\nfrom qwenkit.cli import COMMANDS, main\nfor c in COMMANDS:\n"
        "    try:\n        main([c, '--help'])\n    except SystemExit as e:\n"
        "        print(c, e.code, file=sys.stderr)\n"
    )
    done = subprocess.run([sys.executable, "-OO", "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines() == [f"{c} 0" for c in COMMANDS]
    assert "usage: qwenkit eval " in done.stdout
