"""An endpoint run records the server's system_fingerprint: resuming it against another model behind
the same URL and name is refused, as a local run is against other weights."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from qwenkit.evaluate.data import EvalDataError
from qwenkit.evaluate.endpoint import EndpointBackend
from qwenkit.evaluate.runner import Settings, run


def test_the_fingerprint_is_recorded_and_checked_on_resume(eval_llm, tmp_path, monkeypatch):
    sys.path.insert(0, str(Path(__file__).parents[1] / "server"))
    from live import LiveServer

    from qwenkit.server import ServerConfig, create_app

    app = create_app(eval_llm, ServerConfig(served_model_name="tiny", response_cache_entries=0))
    settings = Settings(task="gsm8k", limit=1, max_new_tokens=4)
    with LiveServer(app) as server:
        backend = EndpointBackend(server.url, model="tiny", concurrency=1)
        served = app.state.qwenkit.fingerprint
        assert backend.describe()["system_fingerprint"] == served
        first = run(backend, settings, tmp_path / "run", progress=False)
        assert first["record"]["system_fingerprint"] == served
        monkeypatch.setattr(EndpointBackend, "system_fingerprint", lambda self: "fp_qwenkit_another")
        refused = r"holds a run of another model \(system_fingerprint differs\)"
        with pytest.raises(EvalDataError, match=refused):
            run(backend, settings, tmp_path / "run", progress=False)
