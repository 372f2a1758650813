"""The GPU benchmark: this project's paths and what a user would write instead, side by side, in one
run on one machine. Not a test: it prints and writes numbers (JSON + Markdown under --out).

    python -m bench.gpu --device cuda --out bench/results          # the prepared run (bench/gpu.sh)
    python -m bench.gpu --device cpu --mini --out /tmp/b           # the miniature CI runs on the CPU

Phases, in order, each skipped once the time budget is spent (the results so far are written after
every phase, so a run cut short still reports):

- engine: the runner in-process (no HTTP), eager and with compile + CUDA graphs: one image's latency
  and images/s at growing row counts (the latency/throughput curve), start-up (compile + capture).
- reference: the same weights through diffusers' DDIMScheduler loop (eager) and through the best a
  diffusers user can do (compiled network, the whole loop as one CUDA graph); and diffusers'
  UNet2DModel of the same size, both ways.
- service: `python -m service` over HTTP: start-up to /readyz, one request's p50/p99, saturation
  images/s, and the p99 of 10-step requests (every sampler) among saturating 50-step traffic
  against their latency on an idle service.
- cifar: the field's CIFAR-10 DDPM architecture (a random-weight UNet2DModel of google/ddpm-cifar10-32's
  shape, 35.7M) served by this service compiled with CUDA graphs, against diffusers' DDIMPipeline behind
  a FastAPI app, eager and compiled: one request's p50 and images/s at 8 and 32 concurrent requests.
- sd: SD 1.5's architecture (random weights, 512 px, 25-step DPM-Solver++(2M), guidance scale 7.5) served by
  this service compiled with CUDA graphs, against diffusers' StableDiffusionPipeline behind a FastAPI app,
  eager and with a compiled UNet: one request's p50 and images/s of 32 concurrent requests (bench/sd.py).
- train: `python -m training` images/s against a plain diffusers UNet2DModel training step.

Workload (unless --mini): DDIM 50 steps, guidance w = 2, bf16 on a GPU, class-conditional 1×28×28
models with random weights of the named sizes (speed does not depend on the weights).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from bench import reference as ref

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SCHEDULERS = ("ddim", "dpmpp_2m", "pndm", "heun", "ddpm")


@dataclass
class Ctx:
    device: torch.device
    out: Path
    mini: bool
    deadline: float
    work: Path
    results: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def steps(self) -> int:
        return 4 if self.mini else 50

    def rows(self, size: str) -> tuple[int, ...]:
        if self.mini:
            return (1, 4)
        return (1, 16, 64, 256, 512) if size == "small" else (1, 16, 64, 128)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def add(self, **row) -> None:
        row = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        self.results.append(row)
        print(json.dumps(row), flush=True)


# --- models -----------------------------------------------------------------------------------
def checkpoint(ctx: Ctx, size: str) -> Path:
    """A class-conditional model of ``size`` with random weights, saved as training saves it."""
    import diffusion

    path = ctx.work / f"bench-{size}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        cfg = diffusion.model_config(size, (1, 28, 28), num_classes=10, class_names=DIGITS, default_steps=ctx.steps)
        diffusion.save(diffusion.DiffusionModel(cfg), path)
    return path


def pipeline(ctx: Ctx, size: str):
    import diffusion
    return diffusion.load(str(checkpoint(ctx, size)), ctx.device)


def q(values: list[float], pct: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(pct) - 1]


# --- engine -----------------------------------------------------------------------------------
def phase_engine(ctx: Ctx, size: str) -> None:
    from diffusion import Acceleration
    from diffusion.runner import power_of_two_buckets

    pipe = pipeline(ctx, size)
    rows = ctx.rows(size)
    modes = {"eager": Acceleration()}
    if ctx.cuda:
        modes["compile+graphs"] = Acceleration(compile="default", cuda_graphs=True,
                                               buckets=power_of_two_buckets(max(rows)))
    for mode, accel in modes.items():
        t0 = time.perf_counter()
        runner = pipe.runner(max(rows), ctx.steps, accel)
        runner.warm_up()
        ctx.add(phase="engine", size=size, mode=mode, what="start-up (compile, capture)", seconds=time.perf_counter() - t0)
        for n in rows:
            reqs = [pipe.row_request(pipe.resolve(class_label=k % 10), k, "ddim", ctx.steps, guidance=2.0, clip="none")
                    for k in range(n)]

            def run():
                runner.run_to_end(runner.add(reqs)).sum().item()
            times = ref.time_it(run, ctx.device, repeats=3 if n > 1 else 10, budget_s=10)
            s = statistics.median(times)
            ctx.add(phase="engine", size=size, mode=mode, rows=n, latency_s=s, iteration_ms=1000 * s / ctx.steps,
                    images_per_s=n / s)
            if ctx.left() < 0:
                return
        # batch invariance on this device: the same seed alone and among max(rows) others
        reqs = [pipe.row_request(pipe.resolve(class_label=k % 10), k, "ddim", ctx.steps, guidance=2.0, clip="none")
                for k in range(max(rows))]
        alone = runner.run_to_end(runner.add(reqs[:1]))[0]
        crowd = runner.run_to_end(runner.add(reqs))[0]
        ctx.add(phase="engine", size=size, mode=mode, what=f"same seed alone vs among {max(rows)} rows",
                max_abs_diff=(alone - crowd).abs().max().item(), in_pixel_levels=(alone - crowd).abs().max().item() * 127.5)


# --- reference --------------------------------------------------------------------------------
def phase_reference(ctx: Ctx, size: str) -> None:
    pipe = pipeline(ctx, size)
    rows = (1, max(ctx.rows(size)))
    betas, ab = pipe.schedule.betas, pipe.schedule.alphas_cumprod
    unet = ref.unet2d(size).to(ctx.device).eval().requires_grad_(False)
    nets = {"this project's U-Net, same weights": (pipe.net, True),
            f"diffusers UNet2DModel ({sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M)":
                (ref.unet2d_eps2(unet, pipe.autocast), False)}
    for name, (eps2, ours) in nets.items():
        compiled = torch.compile(eps2, dynamic=True) if ctx.cuda else eps2
        for n in rows:
            x_T = torch.randn(n, *pipe.card.image_shape, device=ctx.device)
            if ours:
                conds = torch.stack([pipe.cond_vector(pipe.resolve(class_label=k % 10)) for k in range(n)])
                cond = torch.cat([conds, pipe.null_cond.expand(n, -1)])
            else:
                cond = torch.cat([torch.arange(n, device=ctx.device) % 10, torch.full((n,), 10, device=ctx.device)])
            with torch.no_grad():
                times = ref.time_it(lambda: ref.ddim_eager(eps2, betas, x_T, cond, 2.0, ctx.steps), ctx.device,
                                    repeats=3, budget_s=10)
                ctx.add(phase="reference", size=size, net=name, mode="diffusers DDIMScheduler, eager", rows=n,
                        latency_s=statistics.median(times), images_per_s=n / statistics.median(times))
                t0 = time.perf_counter()
                graphed = ref.GraphedDDIM(compiled, ab, x_T, cond, 2.0, ctx.steps)
                graphed.capture()
                times = ref.time_it(lambda: graphed(x_T), ctx.device, repeats=10 if n == 1 else 3, budget_s=10)
                ctx.add(phase="reference", size=size, net=name, rows=n, warm_s=time.perf_counter() - t0,
                        mode="compiled, whole loop one CUDA graph" if ctx.cuda else "hand-written loop (CPU: no graph)",
                        latency_s=statistics.median(times), images_per_s=n / statistics.median(times))
            if ctx.left() < 0:
                return


# --- service ----------------------------------------------------------------------------------
def start_service(ctx: Ctx, size: str, max_rows: int) -> tuple[subprocess.Popen, str, float]:
    from bench.load import free_port

    import httpx

    ckdir = ctx.work / f"service-{size}"
    ckdir.mkdir(exist_ok=True)
    target = ckdir / checkpoint(ctx, size).name
    if not target.exists():
        target.symlink_to(checkpoint(ctx, size))
    port = free_port()
    args = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--checkpoint-dir", str(ckdir),
            "--device", str(ctx.device), "--max-batch-rows", str(max_rows), "--max-images", str(min(32, max_rows)),
            "--max-queue", "4096", "--log-level", "warning", "--data-dir", str(ctx.work / f"service-{size}-data")]
    if ctx.cuda:
        args += ["--compile", "default", "--cuda-graphs", "true"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(ctx.out / f"service-{size}.log", "w"))
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - t0 < 600:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited with {proc.returncode} (see service-{size}.log)")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return proc, url, time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the service never became ready")


async def _sequential(http, bodies: list[dict]) -> list[float]:
    out = []
    for body in bodies:
        t0 = time.perf_counter()
        r = await http.post("/generate", json=body)
        r.raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


async def _saturate(http, body: dict, clients: int, seconds: float, probe: list[dict] | None = None):
    """``clients`` looping on ``body`` for ``seconds``; with ``probe``, one more client sends those
    requests one after another meanwhile. Returns (images done, wall, bulk latencies, probe latencies)."""
    stop = time.perf_counter() + seconds
    done, bulk, probed = [0], [], []

    async def loop():
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post("/generate", json=body)
            if r.status_code == 200:
                done[0] += body["num_images"]
                bulk.append(time.perf_counter() - t0)

    async def prober():
        k = 0
        await asyncio.sleep(seconds / 4)  # let the load build up first
        while time.perf_counter() < stop:
            probed.extend(await _sequential(http, [probe[k % len(probe)]]))
            k += 1

    t0 = time.perf_counter()
    await asyncio.gather(*[loop() for _ in range(clients)], *([prober()] if probe else []))
    return done[0], time.perf_counter() - t0, bulk, probed


def phase_service(ctx: Ctx, size: str) -> None:
    import httpx

    max_rows = max(ctx.rows(size))
    proc, url, ready_s = start_service(ctx, size, max_rows)
    ctx.add(phase="service", size=size, what="start-up to /readyz (load, compile, capture)", seconds=ready_s)
    one = {"prompt": "nine", "scheduler": "ddim", "steps": ctx.steps, "guidance": 2.0, "num_images": 1}
    short_steps = 3 if ctx.mini else 10
    shorts = [{"prompt": DIGITS[k % 10], "scheduler": s, "steps": short_steps, "guidance": 2.0, "num_images": 1,
               "seed": k} for k, s in enumerate(SCHEDULERS * 4)]
    per = min(32, max_rows)
    bulk = {**one, "num_images": per}
    clients = max(2, 2 * max_rows // per)
    seconds = 1.5 if ctx.mini else 12.0
    try:
        async def main():
            limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
                await _sequential(http, [one, *shorts[:5]])  # first-request effects out of the way
                lat = await _sequential(http, [{**one, "seed": k} for k in range(5 if ctx.mini else 30)])
                ctx.add(phase="service", size=size, what=f"one request, idle (DDIM {ctx.steps}, w=2)",
                        p50_s=q(lat, 50), p99_s=q(lat, 99), n=len(lat))
                idle_short = await _sequential(http, shorts)
                ctx.add(phase="service", size=size, what=f"{short_steps}-step requests, idle (every sampler)",
                        p50_s=q(idle_short, 50), p99_s=q(idle_short, 99), n=len(idle_short))
                images, wall, lat_b, _ = await _saturate(http, bulk, clients, seconds)
                ctx.add(phase="service", size=size, what=f"saturation ({clients} clients x {per} images)",
                        images_per_s=images / wall, p50_s=q(lat_b, 50) if lat_b else None)
                images, wall, lat_b, probed = await _saturate(http, bulk, clients, seconds, probe=shorts)
                ctx.add(phase="service", size=size, what=f"mixed: {short_steps}-step requests among saturating "
                        f"{ctx.steps}-step traffic", images_per_s=images / wall, short_p50_s=q(probed, 50),
                        short_p99_s=q(probed, 99), n=len(probed), idle_p50_s=q(idle_short, 50),
                        ratio_p99_to_idle=q(probed, 99) / q(idle_short, 50))
        asyncio.run(main())
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


# --- training ---------------------------------------------------------------------------------
def fake_mnist(folder: Path, n: int = 4096) -> Path:
    """Random digits-shaped IDX files (training speed does not depend on the pixels)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, count in (("train", n), ("t10k", 256)):
        images = rng.integers(0, 256, (count, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, count, dtype=np.uint8)
        with gzip.open(folder / f"{split}-images-idx3-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 3]) + np.array([count, 28, 28], ">u4").tobytes() + images.tobytes())
        with gzip.open(folder / f"{split}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(bytes([0, 0, 8, 1]) + np.array([count], ">u4").tobytes() + labels.tobytes())
    return folder


def _train_ours(ctx: Ctx, size: str, batch: int, steps: int, compile: bool) -> None:
    out = ctx.work / f"train-{size}-{'compiled' if compile else 'eager'}"
    cmd = [sys.executable, "-m", "training", "--dataset", "mnist", "--data-dir", str(fake_mnist(ctx.work / "mnist")),
           "--model", size, "--batch-size", str(batch), "--max-steps", str(steps), "--log-every", str(max(1, steps // 6)),
           "--sample-every", "0", "--save-every", "0", "--device", str(ctx.device), "--out", str(out), "--name", "bench",
           "--compile", str(compile).lower()]
    t0 = time.perf_counter()
    with open(ctx.out / f"train-{size}.log", "a") as log:
        subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL, stderr=log)
    rows = (out / "loss.csv").read_text().splitlines()[2:]  # the first logged interval includes warm-up
    speeds = [float(r.split(",")[3]) for r in rows if r.strip()]
    ctx.add(phase="train", size=size, what=f"python -m training {size}{' --compile' if compile else ''}", batch=batch,
            steps=steps, images_per_s=statistics.median(speeds) if speeds else None, wall_s=time.perf_counter() - t0)


def phase_train(ctx: Ctx, size: str) -> None:
    batch, steps = (16, 6) if ctx.mini else (256, 120 if size == "small" else 60)
    r = ref.diffusers_train_speed(size, ctx.device, batch, max(3, steps // 2), bf16=ctx.cuda)
    ctx.add(phase="train", size=size, **r)
    _train_ours(ctx, size, batch, steps, compile=False)
    if ctx.cuda and ctx.left() > 60:  # compiling the training step takes a minute or more
        _train_ours(ctx, size, batch, 3 * steps, compile=True)


def _side_by_side(ctx: Ctx, phase: str, result: dict) -> None:
    """A side-by-side result (bench/cifar.py, bench/sd.py) as this phase's rows."""
    for row in result["rows"]:
        ctx.add(phase=phase, **{k: v for k, v in row.items() if k != "ours"})
    for row in result["ratios"]:
        ctx.add(phase=phase, what="this service / best diffusers", **row)
    for server, seconds in result["ready_s"].items():
        ctx.add(phase=phase, server=server, what="start-up to /readyz", seconds=seconds)


def phase_cifar(ctx: Ctx, size: str) -> None:
    """The field's CIFAR-10 DDPM architecture (35.7M, 3×32×32) served by this service (compiled, CUDA
    graphs) and by diffusers' DDIMPipeline behind a FastAPI app, eager and compiled (bench/cifar.py)."""
    from bench import cifar

    servers = cifar.GPU_SERVERS if ctx.cuda else cifar.CPU_SERVERS[:2]
    _side_by_side(ctx, "cifar", cifar.run(str(ctx.device), ctx.work, mini=ctx.mini, sequential=2 if ctx.mini else 5,
                                          waves=[2] if ctx.mini else [8, 32], servers=servers, log_dir=ctx.out))


def phase_sd(ctx: Ctx, size: str) -> None:
    """SD 1.5's architecture (random weights: UNet 860M, VAE, CLIP ViT-L/14 text encoder; 512 px), 25-step
    DPM-Solver++(2M), guidance scale 7.5, served by this service (compiled, CUDA graphs) and by diffusers'
    StableDiffusionPipeline behind a FastAPI app, eager and with a compiled UNet, bf16 (bench/sd.py): one
    request's p50 and images/s of a wave of 32 concurrent requests. The servers start at once (their
    compilations overlap, and dominate: aimed at about 90 s)."""
    from bench import cifar, sd

    servers = cifar.GPU_SERVERS if ctx.cuda else cifar.CPU_SERVERS[:2]
    _side_by_side(ctx, "sd", sd.run(str(ctx.device), ctx.work, mini=ctx.mini, sequential=2 if ctx.mini else 3,
                                    waves=[2] if ctx.mini else [32], servers=servers, log_dir=ctx.out))


def phase_goodput(ctx: Ctx, size: str) -> None:
    """Bursts of 8-image DDIM-50 requests of the default model with a deadline, under admission by rows,
    one request at a time and goodput (bench/goodput.py): answered in time, refused, timed out. On a
    GPU the deadline is 2 s and the bursts 16 and 64 requests (up to 512 images), so that they overload."""
    from bench import goodput

    result = goodput.run(str(ctx.device), ctx.work, mini=ctx.mini, deadline=None if ctx.mini else 2.0,
                         sizes=None if ctx.mini else [16, 64])
    for row in result["rows"]:
        ctx.add(phase="goodput", deadline_s=result["deadline_s"], **row)


PHASES = {"engine": phase_engine, "reference": phase_reference, "service": phase_service, "cifar": phase_cifar,
          "sd": phase_sd, "goodput": phase_goodput, "train": phase_train}
ONCE = ("cifar", "sd", "goodput")  # not per size: after the first size's inference phases


# --- report -----------------------------------------------------------------------------------
def markdown(ctx: Ctx, meta: dict) -> str:
    lines = [f"# GPU benchmark: {meta['device_name']}", "",
             f"torch {meta['torch']}, device {meta['device']}, DDIM {ctx.steps} steps, w = 2, "
             f"{'bf16' if ctx.cuda else 'float32'}, run {meta['started']}{' (miniature)' if ctx.mini else ''}.", ""]
    for phase in PHASES:
        rows = [r for r in ctx.results if r.get("phase") == phase]
        if not rows:
            continue
        keys = [k for k in dict.fromkeys(k for r in rows for k in r) if k != "phase"]
        lines += [f"## {phase}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join("" if r.get(k) is None else str(r.get(k)) for k in keys) + " |" for r in rows]
        lines.append("")
    if ctx.notes:
        lines += ["## notes", ""] + [f"- {n}" for n in ctx.notes] + [""]
    return "\n".join(lines)


def write(ctx: Ctx, meta: dict) -> None:
    ctx.out.mkdir(parents=True, exist_ok=True)
    (ctx.out / "results.json").write_text(json.dumps({"meta": meta, "results": ctx.results, "notes": ctx.notes},
                                                     indent=1))
    (ctx.out / "results.md").write_text(markdown(ctx, meta))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--sizes", default="small,large")
    ap.add_argument("--phases", default=",".join(PHASES))
    ap.add_argument("--budget-s", type=float, default=330.0, help="stop starting new phases after this long")
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--mini", action="store_true", help="tiny model, few steps and rows: the CI's smoke run")
    args = ap.parse_args(argv)
    sizes = ["tiny"] if args.mini else [s.strip() for s in args.sizes.split(",") if s.strip()]
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in phases if p not in PHASES]
    if unknown:
        ap.error(f"unknown phases {unknown}; expected {list(PHASES)}")
    device = torch.device(args.device)
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    ctx = Ctx(device, args.out, args.mini, time.monotonic() + args.budget_s, work)
    meta = {"device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU",
            "torch": torch.__version__, "started": time.strftime("%Y-%m-%d %H:%M:%S"), "sizes": sizes,
            "phases": phases, "steps": ctx.steps, "threads": torch.get_num_threads(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    failures = 0
    # the first size's inference phases, the CIFAR and SD cases (once), then the next size's, then training
    per_size = [p for p in phases if p not in ("train", *ONCE)]
    order = [(p, s) for s in sizes for p in per_size]
    order[len(per_size):len(per_size)] = [(p, sizes[0]) for p in phases if p in ONCE]
    order += [("train", s) for s in sizes if "train" in phases]
    for phase, size in order:
        if ctx.left() < 0:
            ctx.notes.append(f"{phase} {size}: skipped, the {args.budget_s:.0f} s budget was spent")
            continue
        t0 = time.perf_counter()
        try:
            PHASES[phase](ctx, size)
        except Exception as e:  # one phase failing must not lose the others' numbers
            failures += 1
            ctx.notes.append(f"{phase} {size}: failed: {type(e).__name__}: {e}")
            traceback.print_exc()
        print(f"# {phase} {size}: {time.perf_counter() - t0:.1f} s", flush=True)
        write(ctx, meta)
    write(ctx, meta)
    print(markdown(ctx, meta))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
