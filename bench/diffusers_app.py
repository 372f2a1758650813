"""What a user would write instead of this service: diffusers' ``DDIMPipeline`` behind a hand-written
FastAPI app. Not part of the product; :mod:`bench.cifar` starts it beside the service and sends
both the same requests.

    python -m bench.diffusers_app --folder /path/to/pipeline --port 8001 [--serial] [--compile] [--device cuda]

``POST /generate`` {"steps", "seed"} answers {"images": [base64 PNG]}. A sync endpoint, so FastAPI runs
each request in its thread pool, concurrently (``--serial`` puts one lock around the pipeline, which
is what a careful user does on a CPU). Each request gets its own copy of the scheduler: diffusers'
schedulers keep their timesteps on ``self``, and one shared by two threads mixes their plans. On a
GPU the network runs in bf16 (``--compile``: ``torch.compile`` of the U-Net).
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import copy
import io
import threading


def create_app(folder: str, device: str, serial: bool, compile: bool):
    import torch
    from diffusers import DDIMPipeline
    from fastapi import FastAPI

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    base = DDIMPipeline.from_pretrained(folder).to(device)
    base.unet.to(dtype)
    if compile:
        base.unet = torch.compile(base.unet)
    base.set_progress_bar_config(disable=True)
    lock = threading.Lock() if serial else contextlib.nullcontext()
    app = FastAPI()

    @app.post("/generate")
    def generate(body: dict) -> dict:
        with lock, torch.no_grad():
            pipe = DDIMPipeline(unet=base.unet, scheduler=copy.deepcopy(base.scheduler))
            pipe.set_progress_bar_config(disable=True)
            g = torch.Generator(device).manual_seed(int(body.get("seed", 0)))
            images = pipe(batch_size=1, generator=g, num_inference_steps=int(body.get("steps", 50)), eta=0.0,
                          output_type="pil").images
        out = []
        for img in images:
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            out.append(base64.b64encode(buf.getvalue()).decode())
        return {"images": out}

    @app.get("/readyz")
    def ready() -> dict:
        return {"status": "ready"}

    return app


def main(argv=None) -> None:
    import uvicorn

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--serial", action="store_true")
    ap.add_argument("--compile", action="store_true")
    args = ap.parse_args(argv)
    uvicorn.run(create_app(args.folder, args.device, args.serial, args.compile), host="127.0.0.1", port=args.port,
                log_level="warning")


if __name__ == "__main__":
    main()
