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
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw))
    assert main(["--checkpoint-dir", str(tmp_path), "--device", "cpu", "--shutdown-grace-s", grace]) == 0
    assert seen["timeout_graceful_shutdown"] == expected


def test_no_checkpoints_is_exit_2(tmp_path, capsys):
    assert main(["--checkpoint-dir", str(tmp_path), "--device", "cpu"]) == 2
    assert "error" in capsys.readouterr().err
