"""`qwenkit eval --no-progress` (for scripts and logs) draws no progress bar at all: neither the items' nor
the model loading's, which a large model or `--quantize` shows after a second."""

from __future__ import annotations

import qwenkit.checkpoint.loader as loader
from qwenkit.cli import main as qwenkit_main
from qwenkit.cli.eval import build_parser

ARGS = ["--task", "mmlu", "--limit", "1", "--subjects", "virology"]


def _loading_bars(monkeypatch) -> list[bool]:
    """Whether each loading bar the loader makes is shown (the real tqdm, its ``disable`` recorded)."""
    shown: list[bool] = []
    real = loader.tqdm

    def recording(*args, **kwargs):
        shown.append(not kwargs.get("disable", False))
        return real(*args, **kwargs)

    monkeypatch.setattr(loader, "tqdm", recording)
    monkeypatch.setenv("QWENKIT_PREPARED_CACHE", "off")  # every load reads the file (a cached one has no bar)
    return shown


def test_no_progress_hides_the_loading_bar(tiny_chat_model, tmp_path, monkeypatch):
    shown = _loading_bars(monkeypatch)
    out = tmp_path / "quiet"
    assert qwenkit_main(["eval", str(tiny_chat_model), *ARGS, "--no-progress", "--output", str(out)]) == 0
    assert shown == [False]


def test_the_loading_bar_is_shown_by_default(tiny_chat_model, tmp_path, monkeypatch):
    shown = _loading_bars(monkeypatch)
    assert qwenkit_main(["eval", str(tiny_chat_model), *ARGS, "--output", str(tmp_path / "run")]) == 0
    assert shown == [True]


def test_help_says_what_the_options_do():
    text = " ".join(build_parser().format_help().split())
    assert "--no-progress no progress bars (model loading, items)" in text
    assert "compare saved runs (--output directories or their results.json)" in text
