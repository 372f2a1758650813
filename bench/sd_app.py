"""What a user would write instead of this service for a Stable Diffusion model: diffusers'
``StableDiffusionPipeline`` behind a hand-written FastAPI app (:mod:`bench.diffusers_app`'s, around
this pipeline). Not part of the product; :mod:`bench.sd` starts it beside the service and sends both
the same requests.

    python -m bench.sd_app --folder /path/to/sd-pipeline --port 8001 [--serial] [--compile] [--device cuda]

``POST /generate`` takes the service's fields that matter here: {"prompt", "negative_prompt",
"guidance_scale", "steps", "seed", "width", "height", "num_images"} (defaults: diffusers' own, 25 steps)
and answers {"images": [base64 PNG]}. The folder's scheduler is replaced by
``DPMSolverMultistepScheduler`` (DPM-Solver++, second order, the folder's training schedule and
spacing), the service's default sampler for these models; every request gets its own copy of it
(diffusers' multistep schedulers keep their history on ``self``). Requests run concurrently in
FastAPI's thread pool, or one at a time behind a lock (``--serial``); bf16 on a GPU, ``--compile``:
``torch.compile`` of the UNet. No safety checker.
"""

from __future__ import annotations

import copy

from bench.diffusers_app import app_around, load
from bench.diffusers_app import main as _main


def create_app(folder: str, device: str, serial: bool, compile: bool):
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    base = load(StableDiffusionPipeline, folder, device, compile, safety_checker=None, requires_safety_checker=False)
    base.scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="dpmsolver++",
                                                             solver_order=2)

    def run(body: dict) -> list:
        pipe = StableDiffusionPipeline(**{**base.components, "scheduler": copy.deepcopy(base.scheduler)},
                                       requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        g = torch.Generator(device).manual_seed(int(body.get("seed", 0)))
        return pipe(body.get("prompt", ""), negative_prompt=body.get("negative_prompt"),
                    guidance_scale=float(body.get("guidance_scale", 7.5)),
                    num_inference_steps=int(body.get("steps", 25)), width=body.get("width"),
                    height=body.get("height"), num_images_per_prompt=int(body.get("num_images", 1)), generator=g,
                    output_type="pil").images

    return app_around(run, serial, warm_up={"prompt": "a warm-up", "steps": 2})


def main(argv=None) -> None:
    _main(argv, create_app, __doc__)


if __name__ == "__main__":
    main()
