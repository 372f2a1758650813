"""Load benchmark: the running service under N concurrent clients, against the same requests sent
one at a time, and against the loop a user would write with diffusers' DDIMScheduler around the same
weights (one request per forward pass). Not a test: it prints numbers.

    python -m bench.load --checkpoint-dir checkpoints --clients 8 --requests 32 --device cpu
    python -m bench.load --url http://host:8000 --model mnist-text-compact ...   # a service already running
    python -m bench.load --synthetic compact ...   # random weights of that size (speed only), in a temp dir

Requests are a fixed mix (seeded): scheduler, steps and guidance drawn per request, prompts = class
names. Each mode reports images/s, p50/p95/p99 latency and the model evaluations (NFE) it needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from diffusion.samplers import SAMPLERS

SCHEDULERS = ("ddim", "ddpm", "pndm", "heun", "dpmpp_2m")


def make_requests(n: int, steps: list[int], class_names: list[str], seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [{"prompt": rng.choice(class_names), "scheduler": rng.choice(SCHEDULERS), "steps": rng.choice(steps),
             "guidance": rng.choice([0.0, 1.0, 2.0, 3.0]), "seed": k} for k in range(n)]


def nfe(req: dict) -> int:
    return SAMPLERS[req["scheduler"]].evaluations(req["steps"])


def summary(name: str, latencies: list[float], wall: float, images: int, evaluations: int) -> dict:
    q = statistics.quantiles(latencies, n=100, method="inclusive") if len(latencies) > 1 else latencies * 99
    return {"mode": name, "requests": len(latencies), "images": images, "wall_s": round(wall, 2),
            "images_per_s": round(images / wall, 2), "p50_s": round(q[49], 3), "p95_s": round(q[94], 3),
            "p99_s": round(q[98], 3), "nfe": evaluations}


async def drive(url: str, requests: list[dict], clients: int, model: str | None) -> tuple[list[float], float]:
    """``clients`` concurrent clients, each taking the next request when its last one returns."""
    queue = list(reversed(requests))
    latencies: list[float] = []

    async def client(http: httpx.AsyncClient):
        while queue:
            body = queue.pop()
            t0 = time.perf_counter()
            r = await http.post("/generate", json={**body, **({"model": model} if model else {})})
            r.raise_for_status()
            latencies.append(time.perf_counter() - t0)

    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        start = time.perf_counter()
        await asyncio.gather(*[client(http) for _ in range(clients)])
        return latencies, time.perf_counter() - start


def diffusers_loop(checkpoint: Path, requests: list[dict], device: str) -> tuple[list[float], float, int]:
    """What a user writes with diffusers: DDIMScheduler + the same ε-network, one request at a time,
    conditional and unconditional halves in one forward pass (classifier-free guidance)."""
    import torch
    from diffusers import DDIMScheduler

    import diffusion

    pipe = diffusion.load(str(checkpoint), device)
    sched = DDIMScheduler(num_train_timesteps=pipe.card.num_timesteps, trained_betas=pipe.schedule.betas.cpu().numpy(),
                          clip_sample=False, set_alpha_to_one=True, timestep_spacing="trailing",
                          prediction_type=pipe.card.prediction)
    latencies, evaluations = [], 0
    start = time.perf_counter()
    for req in requests:
        t0 = time.perf_counter()
        with torch.no_grad():
            cond = pipe.cond_vector(pipe.resolve(prompt=req["prompt"]))
            g = torch.Generator(device).manual_seed(req["seed"])
            x = torch.randn((1, *pipe.card.image_shape), generator=g, device=device)
            sched.set_timesteps(req["steps"], device=device)
            c = torch.stack([cond, pipe.null_cond[0]])
            w = req["guidance"]
            for t in sched.timesteps:
                out = pipe.net(x.expand(2, -1, -1, -1), t.reshape(1).expand(2).to(device), c)
                eps = (1 + w) * out[:1] - w * out[1:]
                x = sched.step(eps, t, x).prev_sample
                evaluations += 1
            x.cpu()
        latencies.append(time.perf_counter() - t0)
    return latencies, time.perf_counter() - start, evaluations


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(checkpoint_dir: Path, device: str, max_rows: int,
                  compile: str = "off") -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
                             "--checkpoint-dir", str(checkpoint_dir), "--device", device,
                             "--max-batch-rows", str(max_rows), "--compile", compile, "--log-level", "warning",
                             "--data-dir", tempfile.mkdtemp(prefix="bench-service-data-")],
                            cwd=Path(__file__).resolve().parents[1], stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(2400):  # compiling every bucket can take minutes
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.terminate()
    raise SystemExit("the service never became ready")


def synthetic_checkpoint(size: str, directory: Path) -> Path:
    import torch

    import diffusion

    torch.manual_seed(0)
    names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
    cfg = diffusion.model_config(size, (1, 28, 28), num_classes=10, class_names=names,
                                 text=diffusion.TextEncoderConfig())
    return diffusion.save(diffusion.DiffusionModel(cfg), directory / f"synthetic-{size}.safetensors")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint-dir", type=Path, default=Path("checkpoints"))
    ap.add_argument("--model", default=None, help="model name (default: the service's default model)")
    ap.add_argument("--synthetic", choices=["tiny", "compact", "small", "large"], default=None,
                    help="benchmark a random-weight model of this size instead (speed is all that is measured)")
    ap.add_argument("--url", default=None, help="a running service (default: start one)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--steps", default="10,20,30", help="step counts to draw from")
    ap.add_argument("--max-batch-rows", type=int, default=64)
    ap.add_argument("--compile", default="off",
                    help="comma-separated service --compile modes, each measured with the concurrent clients "
                         "(e.g. off,reduce-overhead on a GPU); ignored with --url")
    ap.add_argument("--skip-sequential", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args(argv)

    tmp = tempfile.TemporaryDirectory()
    ckdir = args.checkpoint_dir
    if args.synthetic:
        ckdir = Path(tmp.name)
        synthetic_checkpoint(args.synthetic, ckdir)
    modes = [None] if args.url else [m.strip() for m in args.compile.split(",") if m.strip()]
    results = []
    for i, mode in enumerate(modes):
        proc, url = (None, args.url) if mode is None else start_service(ckdir, args.device, args.max_batch_rows, mode)
        label = "" if mode in (None, "off") else f", compile={mode}"
        try:
            info = httpx.get(f"{url}/models", timeout=10).json()
            model = args.model or info["default"]
            meta = next(m for m in info["models"] if m["name"] == model)
            requests = make_requests(args.requests, [int(s) for s in args.steps.split(",")], meta["class_names"])
            total_nfe = sum(nfe(r) for r in requests)
            lat, wall = asyncio.run(drive(url, requests, args.clients, model))
            results.append(summary(f"service, {args.clients} concurrent clients{label}", lat, wall, len(requests),
                                   total_nfe))
            if i == 0 and not args.skip_sequential:
                lat, wall = asyncio.run(drive(url, requests, 1, model))
                results.append(summary(f"service, one request at a time{label}", lat, wall, len(requests), total_nfe))
        finally:
            if proc is not None:
                proc.terminate()
                proc.wait()
    checkpoint = next(p for p in sorted(ckdir.glob("*.safetensors")) if p.stem == model)
    lat, wall, evaluations = diffusers_loop(checkpoint, requests, args.device)
    results.append(summary("diffusers DDIMScheduler loop (same weights)", lat, wall, len(requests), evaluations))
    print(f"model {model}, device {args.device}, {len(requests)} requests, steps {args.steps}, "
          f"torch threads {os.environ.get('OMP_NUM_THREADS', 'default')}")
    print(f"{'mode':48s} {'img/s':>7s} {'p50 s':>7s} {'p95 s':>7s} {'p99 s':>7s} {'wall s':>7s} {'NFE':>6s}")
    for r in results:
        print(f"{r['mode']:48s} {r['images_per_s']:7.2f} {r['p50_s']:7.3f} {r['p95_s']:7.3f} {r['p99_s']:7.3f} "
              f"{r['wall_s']:7.2f} {r['nfe']:6d}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
