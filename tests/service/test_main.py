"""``python -m service``: the command line reaches uvicorn as the settings say."""

import pytest

from service.__main__ import main
from tests.deploy.helpers import make_checkpoint


@pytest.mark.parametrize("grace,expected", [("0", 0), ("0.5", 1), ("30", 30)])
def test_shutdown_grace_bounds_uvicorn_wait(tmp_path, monkeypatch, grace, expected):
    """uvicorn's graceful-shutdown timeout is the grace rounded up, never None (None waits for open
    connections forever: a grace of 0 or 0.5 used to mean that)."""
    import uvicorn

    make_checkpoint(tmp_path)
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(
        timeout_graceful_shutdown=self.config.timeout_graceful_shutdown, server=self))
    assert main(["--checkpoint-dir", str(tmp_path), "--device", "cpu", "--shutdown-grace-s", grace]) == 0
    assert seen["timeout_graceful_shutdown"] == expected


def test_a_stop_signal_stops_the_job_runner_claiming_at_once(tmp_path, monkeypatch):
    """SIGTERM: jobs are claimed no more while uvicorn waits for connections (before the app's shutdown)."""
    import signal
    from types import SimpleNamespace

    import uvicorn

    make_checkpoint(tmp_path)
    seen = {}
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: seen.update(server=self))
    assert main(["--checkpoint-dir", str(tmp_path), "--device", "cpu"]) == 0
    server = seen["server"]
    runner = SimpleNamespace(draining=False)
    server.config.app.state.jobs = SimpleNamespace(runner=runner)
    server.handle_exit(signal.SIGTERM, None)
    assert runner.draining and server.should_exit


def test_no_checkpoints_is_exit_2(tmp_path, capsys):
    assert main(["--checkpoint-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err
