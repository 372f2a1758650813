"""The CIFAR-sized case: a model the field publishes, served by this service and by what a user would
write instead, side by side in one run. Not a test: it prints (and with --json writes) numbers.

    python -m bench.cifar --device cpu                 # the README's CPU figures (about 15 minutes on 2 cores)
    python -m bench.cifar --device cuda --gpu-servers  # on a GPU (bench/gpu.py runs it as its "cifar" phase)
    python -m bench.cifar --device cpu --mini          # the CI's smoke run

The model is a random-weight ``UNet2DModel`` with google/ddpm-cifar10-32's architecture
(block_out_channels 128-256-256-256, two ResNet blocks per level, attention at 16×16; 35.7M
parameters) and scheduler config (linear β, clip_sample, fixed_small), saved as a diffusers pipeline
folder; speed does not depend on the weights. Every request is DDIM 50 (η = 0), one image, its own
seed. Three servers answer the same requests over HTTP: this service (``python -m service``, default
settings: step-level batching, CPU threads by work), and diffusers' ``DDIMPipeline`` behind a
hand-written FastAPI app (:mod:`bench.diffusers_app`), its requests run concurrently in the thread
pool and, the careful variant, one at a time behind a lock. All three run at once (idle ones cost
nothing) and are measured in turn at each point, single requests round-robin, so that a shared
machine's drift in speed (±30 % over minutes on the project's CPU machine) hits them alike: one
request at a time (p50), and waves of 8 and 32 concurrent requests (images/s, p50); ratios are
against the best diffusers variant at each point.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
NAME = "ddpm-cifar10-32"
ARCH = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2, block_out_channels=(128, 256, 256, 256),
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
MINI_ARCH = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                 down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                 norm_num_groups=8)


def make_folder(work: Path, mini: bool) -> Path:
    """The random-weight model as a diffusers pipeline folder in ``work/models`` (the service's directory)."""
    import torch
    from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel

    folder = work / "models" / NAME
    if not folder.exists():
        torch.manual_seed(0)
        unet = UNet2DModel(**(MINI_ARCH if mini else ARCH))
        scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                  clip_sample=True, variance_type="fixed_small")
        DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(str(folder))
    return folder


def _wait_ready(proc: subprocess.Popen, url: str, what: str, limit_s: float = 900) -> float:
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < limit_s:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return time.perf_counter() - t0
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} never became ready")


CPU_SERVERS = (("service", "service", False), ("diffusers-threads", "diffusers-threads", False),
               ("diffusers-serial", "diffusers-serial", False))
GPU_SERVERS = (("service (compile + CUDA graphs)", "service", True), ("diffusers eager", "diffusers-threads", False),
               ("diffusers compiled", "diffusers-threads", True))


def start(kind: str, folder: Path, device: str, compile: bool, max_rows: int, log: Path):
    """(process, url, seconds to ready) of one of the three servers."""
    from bench.load import free_port

    port = free_port()
    if kind == "service":
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--checkpoint-dir", str(folder.parent),
               "--device", device, "--max-batch-rows", str(max_rows), "--max-images", str(min(8, max_rows)),
               "--max-queue", "4096", "--log-level", "warning"]
        if compile:
            cmd += ["--compile", "default", "--cuda-graphs", "true"]
    else:
        cmd = [sys.executable, "-m", "bench.diffusers_app", "--folder", str(folder), "--port", str(port),
               "--device", device, *(["--serial"] if kind == "diffusers-serial" else []),
               *(["--compile"] if compile else [])]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    url = f"http://127.0.0.1:{port}"
    return proc, url, _wait_ready(proc, url, kind)


async def _wave(url: str, bodies: list[dict]) -> tuple[list[float], float]:
    """Send ``bodies`` all at once; (latencies, wall seconds)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        async def one(body):
            t0 = time.perf_counter()
            r = await http.post("/generate", json=body)
            r.raise_for_status()
            return time.perf_counter() - t0
        t0 = time.perf_counter()
        lat = await asyncio.gather(*(one(b) for b in bodies))
        return list(lat), time.perf_counter() - t0


def _body(kind: str, steps: int) -> dict:
    return {"steps": steps} if kind != "service" else {"model": NAME, "scheduler": "ddim", "steps": steps}


def measure(servers: dict, steps: int, sequential: int, waves: list[int]) -> list[dict]:
    """Every server measured in turn at each point (label -> (kind, url)): single requests round-robin,
    then each wave size on every server, so that a machine's drift in speed hits all of them alike."""
    for kind, url in servers.values():
        asyncio.run(_wave(url, [{**_body(kind, steps), "seed": 999}]))  # first-request effects out of the way
    single: dict[str, list[float]] = {label: [] for label in servers}
    for k in range(sequential):
        for label, (kind, url) in servers.items():
            single[label].append(asyncio.run(_wave(url, [{**_body(kind, steps), "seed": k}]))[1])
    rows = [{"server": label, "ours": servers[label][0] == "service", "concurrent": 1,
             "p50_s": statistics.median(lat), "images_per_s": 1 / statistics.median(lat)} for label, lat in single.items()]
    for c in waves:
        for label, (kind, url) in servers.items():
            lat, wall = asyncio.run(_wave(url, [{**_body(kind, steps), "seed": 100 * c + k} for k in range(c)]))
            rows.append({"server": label, "ours": kind == "service", "concurrent": c, "p50_s": statistics.median(lat),
                         "images_per_s": c / wall, "wall_s": wall})
    return rows


def ratios(rows: list[dict]) -> list[dict]:
    """Each of this service's rows against the best diffusers server at the same concurrency: the
    fastest in images/s for throughput, the quickest p50 for latency (they can differ)."""
    out = []
    for r in (r for r in rows if r["ours"]):
        theirs = [x for x in rows if not x["ours"] and x["concurrent"] == r["concurrent"]]
        if theirs:
            fastest = max(theirs, key=lambda x: x["images_per_s"])
            quickest = min(theirs, key=lambda x: x["p50_s"])
            out.append({"concurrent": r["concurrent"], "throughput_vs": fastest["server"],
                        "throughput_ratio": r["images_per_s"] / fastest["images_per_s"],
                        "p50_vs": quickest["server"], "p50_ratio": quickest["p50_s"] / r["p50_s"]})
    return out


def run(device: str, work: Path, mini: bool = False, steps: int | None = None, waves: list[int] | None = None,
        sequential: int = 3, servers=CPU_SERVERS, log_dir: Path | None = None) -> dict:
    """Every server of ``servers`` ((label, kind, compile) each) in turn, on the same model and requests."""
    steps = steps or (3 if mini else 50)
    waves = waves or ([2] if mini else [8, 32])
    folder = make_folder(work, mini)
    procs, urls, ready = [], {}, {}
    try:
        for label, kind, compile in servers:  # all up at once: measured side by side
            log = (log_dir or work) / f"cifar-{kind}{'-compiled' if compile else ''}.log"
            proc, url, ready[label] = start(kind, folder, device, compile, max(waves), log)
            procs.append(proc)
            urls[label] = (kind, url)
        rows = measure(urls, steps, sequential, waves)
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    import torch
    from diffusers import UNet2DModel
    params = sum(p.numel() for p in UNet2DModel.from_pretrained(str(folder / "unet")).parameters())
    return {"device": device, "steps": steps, "parameters": params, "ready_s": ready, "rows": rows,
            "ratios": ratios(rows), "torch": torch.__version__}


def table(result: dict) -> str:
    lines = [f"DDIM {result['steps']} steps, {result['parameters'] / 1e6:.1f}M-parameter UNet2DModel (3×32×32), "
             f"device {result['device']}, start-up to ready: "
             + ", ".join(f"{k} {v:.1f} s" for k, v in result["ready_s"].items()), "",
             "| server | concurrent requests | images/s | p50 s |", "|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['concurrent']} | {r['images_per_s']:.3f} | {r['p50_s']:.2f} |" for r in result["rows"]]
    lines += ["", "| concurrent | images/s, ours / best diffusers | p50, best diffusers / ours |", "|---|---|---|"]
    lines += [f"| {r['concurrent']} | {r['throughput_ratio']:.2f}× ({r['throughput_vs']}) | {r['p50_ratio']:.2f}× "
              f"({r['p50_vs']}) |" for r in result["ratios"]]
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-servers", action="store_true", help="the GPU's servers: this service compiled with CUDA "
                    "graphs, diffusers eager and compiled (bf16)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--waves", default=None, help="comma-separated concurrent request counts (default 8,32)")
    ap.add_argument("--sequential", type=int, default=3, help="requests one at a time for the p50")
    ap.add_argument("--mini", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the tables of a --json result and stop")
    args = ap.parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        result["ratios"] = ratios(result["rows"])
        print(table(result))
        return
    with tempfile.TemporaryDirectory(prefix="bench-cifar-") as tmp:
        result = run(args.device, Path(tmp), args.mini, args.steps,
                     [int(w) for w in args.waves.split(",")] if args.waves else None, args.sequential,
                     GPU_SERVERS if args.gpu_servers else CPU_SERVERS)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
