"""The images' HEALTHCHECK reads QWENKIT_PORT as `qwenkit serve` reads it: empty or blank is unset
(8000), so the check asks the port the server listens on."""

from __future__ import annotations

import runpy
import urllib.request

import pytest
from deploy_files import DEPLOY


class Answer:
    status = 200

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def run_healthcheck(monkeypatch, port: str | None) -> tuple[list[str], int]:
    asked: list[str] = []

    def urlopen(url, timeout):
        asked.append(url)
        return Answer()

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    if port is None:
        monkeypatch.delenv("QWENKIT_PORT", raising=False)
    else:
        monkeypatch.setenv("QWENKIT_PORT", port)
    with pytest.raises(SystemExit) as exit_:
        runpy.run_path(str(DEPLOY / "healthcheck.py"))
    return asked, exit_.value.code


@pytest.mark.parametrize(
    ("port", "url"), [(None, 8000), ("", 8000), (" ", 8000), ("9000", 9000), (" 9000 ", 9000)]
)
def test_health_check_asks_the_port_serve_listens_on(monkeypatch, port, url):
    from qwenkit.cli.serve import build_parser

    if port is None:
        monkeypatch.delenv("QWENKIT_PORT", raising=False)
    else:
        monkeypatch.setenv("QWENKIT_PORT", port)
    assert build_parser().parse_args([]).port == url
    assert run_healthcheck(monkeypatch, port) == ([f"http://127.0.0.1:{url}/health"], 0)
