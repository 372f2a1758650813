"""``python -m service [--host H] [--port P] [--checkpoint-dir DIR] [--device cuda|cpu] …``

Every option is a field of :class:`service.settings.Settings` and also an environment variable
(``--max-batch-rows`` ⇔ ``DIFFUSION_MAX_BATCH_ROWS``); the command line wins.
"""

from __future__ import annotations

import os

# One intra-op thread for every thread of the process but the engine's, which sets its own count per
# iteration (service/engine/threads.py). Set before torch is imported, since OpenMP reads it once: a
# thread pool that any other thread (model loading, PNG encoding) started would otherwise make every
# OpenMP worker sleep between parallel regions instead of spinning, about 40 % slower on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# The engine's OpenMP workers sleep between parallel regions instead of spinning: spinning workers
# collapse when anything else wants the cores (measured on 2 cores, one request with a busy process
# beside: reduced SD 9.8 s spinning, 3.9 s passive; CIFAR DDIM-50 31 s, 13 s), for about 6 % on an idle
# machine (SD 2.07 → 2.20 s).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402

from pydantic import ValidationError  # noqa: E402


def parse_args(argv: list[str] | None = None) -> dict:
    from service.settings import Settings

    parser = argparse.ArgumentParser(prog="python -m service", description="Serve diffusion checkpoints over HTTP.")
    for name, field in Settings.model_fields.items():
        env = "DIFFUSION_" + name.upper()
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar="VALUE",
                            help=f"{field.description or ''} [env {env}]")
    return {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}


def main(argv: list[str] | None = None) -> int:
    options = parse_args(argv)
    import uvicorn

    from service import logs
    from service.api import create_app
    from service.registry import NoCheckpoints, find_checkpoints
    from service.settings import Settings

    try:
        settings = Settings(**options)
    except ValidationError as e:
        print(f"invalid settings:\n{e}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        find_checkpoints(settings.checkpoint_dir)  # fail now, clearly, rather than inside the server
    except NoCheckpoints as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    app = create_app(settings)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            """SIGTERM / SIGINT: the job runner claims nothing more and job event streams end (their
            clients resume elsewhere with Last-Event-ID) while uvicorn waits for connections to close."""
            jobs = getattr(app.state, "jobs", None)
            if jobs is not None:
                jobs.runner.draining = True
            super().handle_exit(sig, frame)

    # uvicorn waits this long for open connections, then cancels them. Never None: that would wait
    # forever (a grace of 0 or 0.5 used to mean that); 0 cancels at once, fractions round up.
    Server(uvicorn.Config(app, host=settings.host, port=settings.port, log_config=None, access_log=False,
                          timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_s))).run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
