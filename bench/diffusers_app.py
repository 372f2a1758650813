"""What a user would write instead of this service: diffusers' ``DDIMPipeline`` behind a hand-written
FastAPI app. Not part of the product; :mod:`bench.cifar` starts it beside the service and sends
both the same requests (:mod:`bench.sd_app` is the same app around ``StableDiffusionPipeline``).

    python -m bench.diffusers_app --folder /path/to/pipeline --port 8001 [--serial] [--compile] [--device cuda]

``POST /generate`` {"steps", "seed"} answers {"images": [base64 PNG]}. A sync endpoint, so FastAPI runs
each request in its thread pool, concurrently (``--serial`` puts one lock around the pipeline, which
is what a careful user does on a CPU). Each request gets its own copy of the scheduler: diffusers'
schedulers keep their timesteps on ``self``, and one shared by two threads mixes their plans. On a
GPU the pipeline runs in bf16 (``--compile``: ``torch.compile`` of the U-Net). One small request
runs before /readyz turns ready, so first-call costs (compilation, allocator and oneDNN warm-up) are
paid at start-up, as a careful user would.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io
import threading
from collections.abc import Callable


def load(cls, folder: str, device: str, compile: bool, **kwargs):
    """``cls.from_pretrained(folder)`` offline on ``device``: bf16 on a GPU, float32 on the CPU;
    ``compile``: ``torch.compile`` of its U-Net (the pipeline reads its config through the wrapper)."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    pipe = cls.from_pretrained(folder, local_files_only=True, dtype=dtype, **kwargs).to(device)
    if compile:
        pipe.unet = torch.compile(pipe.unet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pngs(images) -> list[str]:
    out = []
    for img in images:
        buf = io.BytesIO()
        img.save(buf, format="PNG")
        out.append(base64.b64encode(buf.getvalue()).decode())
    return out


def app_around(run: Callable[[dict], list], serial: bool, warm_up: dict):
    """A FastAPI app whose ``POST /generate`` answers ``run(body)``'s PIL images as base64 PNGs (one
    request at a time with ``serial``) and ``GET /readyz``; ``run(warm_up)`` once first."""
    import torch
    from fastapi import FastAPI

    lock = threading.Lock() if serial else contextlib.nullcontext()
    with torch.no_grad():
        run(warm_up)
    app = FastAPI()

    @app.post("/generate")
    def generate(body: dict) -> dict:
        with lock, torch.no_grad():
            images = run(body)
        return {"images": pngs(images)}

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


def create_app(folder: str, device: str, serial: bool, compile: bool):
    import torch
    from diffusers import DDIMPipeline

    base = load(DDIMPipeline, folder, device, compile)

    def run(body: dict) -> list:
        pipe = DDIMPipeline(unet=base.unet, scheduler=copy.deepcopy(base.scheduler))
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator(device).manual_seed(int(body.get("seed", 0)))
        return pipe(batch_size=1, generator=g, num_inference_steps=int(body.get("steps", 50)), eta=0.0,
                    output_type="pil").images

    return app_around(run, serial, warm_up={"steps": 2})


def main(argv=None, create=create_app, doc: str = __doc__) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serial", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    uvicorn.run(create(args.folder, args.device, args.serial, args.compile), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
