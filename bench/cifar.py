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
against the best diffusers variant at each point. ``--rounds N`` repeats each wave N times (the median
is reported); ``--service-variant VAR=VALUE,...`` adds one more service, started with those environment
variables (a ``DIFFUSION_*`` setting, ``OMP_WAIT_POLICY``), measured side by side with the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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


def _wait_ready(proc: subprocess.Popen, url: str, what: str, t0: float, limit_s: float = 900) -> float:
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


# (label, kind, extra command-line arguments[, extra environment]): kind "service" is python -m service, any
# other the app
CPU_SERVERS = (("service", "service", ()), ("diffusers-threads", "diffusers", ()),
               ("diffusers-serial", "diffusers", ("--serial",)))
GPU_SERVERS = (("service (compile + CUDA graphs)", "service", ("--compile", "default", "--cuda-graphs", "true")),
               ("diffusers eager", "diffusers", ()), ("diffusers compiled", "diffusers", ("--compile",)))


# No request of a wave may time out (a CPU's wave of 32 takes minutes); variables, not flags, so that a
# setting an older service lacks is ignored rather than refused
SERVICE_ENV = {"DIFFUSION_REQUEST_TIMEOUT_S": "3600", "DIFFUSION_MAX_TIMEOUT_S": "3600"}


def launch(kind: str, args: tuple, folder: Path, device: str, max_rows: int, log: Path,
           app: str = "bench.diffusers_app", env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """(process, url) of one server: this service on ``folder``'s directory, or ``app`` on ``folder``."""
    from bench.load import free_port

    port = free_port()
    if kind == "service":
        cmd = [sys.executable, "-m", "service", "--port", str(port), "--checkpoint-dir", str(folder.parent),
               "--device", device, "--max-batch-rows", str(max_rows), "--max-images", str(min(8, max_rows)),
               "--max-queue", "4096", "--log-level", "warning",
               "--data-dir", str(log.parent / f"{log.stem}-data")]  # side by side: a data directory each
        env = {**SERVICE_ENV, **(env or {})}
    else:
        cmd = [sys.executable, "-m", app, "--folder", str(folder), "--port", str(port), "--device", device]
    proc = subprocess.Popen([*cmd, *args], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env={**os.environ, **(env or {})})
    return proc, f"http://127.0.0.1:{port}"


@contextlib.contextmanager
def serving(servers, folder: Path, device: str, max_rows: int, log_dir: Path, prefix: str,
            app: str = "bench.diffusers_app", together: bool = False):
    """Every server of ``servers`` ((label, kind, args[, env]) each) running at the same time, so that they are
    measured side by side: yields ({label: (kind, url)}, {label: seconds to ready}); stops them all on exit.
    They start one after another, each timed alone, or with ``together`` all at once (a GPU's compilations
    overlap: each is then timed from the common start)."""
    procs, urls, ready = [], {}, {}
    try:
        pending = []
        for label, kind, args, *env in servers:
            slug = "-".join(re.findall(r"[a-z0-9]+", label.lower()))
            t0 = time.perf_counter()
            proc, url = launch(kind, args, folder, device, max_rows, log_dir / f"{prefix}-{slug}.log", app, *env)
            procs.append(proc)
            urls[label] = (kind, url)
            pending.append((label, proc, url, t0))
            if not together:
                ready[label] = _wait_ready(proc, url, label, t0)
        if together:
            t0 = min(t for *_, t in pending)
            ready.update({label: _wait_ready(proc, url, label, t0) for label, proc, url, _ in pending})
        yield urls, ready
    finally:
        for proc in procs:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()


async def _wave(url: str, bodies: list[dict]) -> tuple[list[float], float, dict[int, int]]:
    """Send ``bodies`` all at once; (latencies of the answered ones, wall seconds, {status: count} of
    the rest: a refusal, a timeout or an error is counted, never fatal)."""
    limits = httpx.Limits(max_connections=len(bodies) + 4, max_keepalive_connections=len(bodies) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        async def one(body):
            t0 = time.perf_counter()
            try:
                status = (await http.post("/generate", json=body)).status_code
            except httpx.HTTPError:
                status = 0  # the connection failed
            return status, time.perf_counter() - t0
        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(b) for b in bodies))
        failed: dict[int, int] = {}
        for status, _ in answers:
            if status != 200:
                failed[status] = failed.get(status, 0) + 1
        return [s for c, s in answers if c == 200], time.perf_counter() - t0, failed


def measure(servers: dict, body: Callable[[str, int], dict], sequential: int, waves: list[int],
            rounds: int = 1) -> list[dict]:
    """Every server measured in turn at each point (label -> (kind, url); ``body(kind, seed)`` is a
    request): single requests round-robin, then each wave size on every server, so that a machine's
    drift in speed hits all of them alike. With ``rounds`` > 1 the waves are repeated, round-robin
    again, and each point reports its median round (images/s; its p50 the median of the rounds'). Each
    row also has the highest 1-minute load average seen right after its requests (the servers' own work
    included: a load well above the cores means another process took its share)."""
    for kind, url in servers.values():
        asyncio.run(_wave(url, [body(kind, 999)]))  # first-request effects out of the way
    # (label, c) -> (p50, wall, load, answered) per run; failures by status
    got: dict[tuple[str, int], list[tuple[float, float, float, int]]] = {}
    failed: dict[tuple[str, int], dict[int, int]] = {}
    for c, repeats in [(1, sequential), *((c, rounds) for c in waves)]:
        for r in range(repeats):
            for label, (kind, url) in servers.items():
                seeds = [r] if c == 1 else [100 * c + 1000 * r + k for k in range(c)]
                lat, wall, bad = asyncio.run(_wave(url, [body(kind, seed) for seed in seeds]))
                p50 = statistics.median(lat) if lat else float("nan")
                got.setdefault((label, c), []).append((p50, wall, os.getloadavg()[0], len(lat)))
                for status, n in bad.items():
                    failed.setdefault((label, c), {})[status] = failed.get((label, c), {}).get(status, 0) + n
    rows = []
    for (label, c), runs in got.items():
        wall = statistics.median(w for _, w, _, _ in runs)
        answered = statistics.median(a for *_, a in runs)
        rows.append({"server": label, "ours": servers[label][0] == "service", "concurrent": c,
                     "p50_s": statistics.median(p for p, _, _, _ in runs), "images_per_s": answered / wall,
                     "load": max(x for _, _, x, _ in runs)} | ({"wall_s": wall} if c > 1 else {})
                    | ({"failed": {str(k): v for k, v in failed[label, c].items()}} if (label, c) in failed else {})
                    | ({"rounds_images_per_s": [round(a / w, 4) for _, w, _, a in runs]} if c > 1 and rounds > 1
                       else {}))
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
            out.append({"server": r["server"], "concurrent": r["concurrent"], "throughput_vs": fastest["server"],
                        "throughput_ratio": r["images_per_s"] / fastest["images_per_s"],
                        "p50_vs": quickest["server"], "p50_ratio": quickest["p50_s"] / r["p50_s"]})
    return out


def source_state() -> dict:
    """The commit measured and the files of service/ and diffusion/ changed beside it (a result then says
    which service it measured)."""
    def git(*args):
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else ""
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or None,
            "changed": [line[3:] for line in git("status", "--porcelain", "--", "service", "diffusion").splitlines()]}


def _body(kind: str, steps: int, seed: int) -> dict:
    return {"steps": steps, "seed": seed} | ({"model": NAME, "scheduler": "ddim"} if kind == "service" else {})


def run(device: str, work: Path, mini: bool = False, steps: int | None = None, waves: list[int] | None = None,
        sequential: int = 3, servers=CPU_SERVERS, log_dir: Path | None = None, rounds: int = 1) -> dict:
    """Every server of ``servers`` ((label, kind, args) each) in turn, on the same model and requests."""
    steps = steps or (3 if mini else 50)
    waves = waves or ([2] if mini else [8, 32])
    folder, source = make_folder(work, mini), source_state()  # what the servers load now
    with serving(servers, folder, device, max(waves), log_dir or work, "cifar") as (urls, ready):
        rows = measure(urls, lambda kind, seed: _body(kind, steps, seed), sequential, waves, rounds)
    import torch
    from diffusers import UNet2DModel
    params = sum(p.numel() for p in UNet2DModel.from_pretrained(str(folder / "unet")).parameters())
    return {"device": device, "steps": steps, "parameters": params, "ready_s": ready, "rows": rows,
            "ratios": ratios(rows), "torch": torch.__version__, "source": source}


def tables(result: dict) -> list[str]:
    """The rows and the ratios of a result, as Markdown lines."""
    lines = ["| server | concurrent requests | images/s | p50 s | load | not answered |", "|---|---|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['concurrent']} | {r['images_per_s']:.3f} | {r['p50_s']:.2f} | "
              f"{r.get('load', 0):.1f} | {', '.join(f'{n}× {k}' for k, n in r.get('failed', {}).items()) or '–'} |"
              for r in result["rows"]]
    lines += ["", "| ours | concurrent | images/s, ours / best diffusers | p50, best diffusers / ours |",
              "|---|---|---|---|"]
    lines += [f"| {r['server']} | {r['concurrent']} | {r['throughput_ratio']:.2f}× ({r['throughput_vs']}) | "
              f"{r['p50_ratio']:.2f}× ({r['p50_vs']}) |" for r in result["ratios"]]
    return lines


def table(result: dict) -> str:
    return "\n".join([f"DDIM {result['steps']} steps, {result['parameters'] / 1e6:.1f}M-parameter UNet2DModel "
                      f"(3×32×32), device {result['device']}, start-up to ready: "
                      + ", ".join(f"{k} {v:.1f} s" for k, v in result["ready_s"].items()), "", *tables(result)])


def command_line(argv, doc: str, run, table, prefix: str, rounds: int = 1, **options) -> None:
    """The command line of a side-by-side benchmark: ``run(device, work, mini, steps, waves, sequential,
    servers, rounds=, **options)`` (``options``: extra arguments, by name, of both)."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--gpu-servers", action="store_true", help="the GPU's servers: this service compiled with CUDA "
                    "graphs, diffusers eager and compiled (bf16)")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--waves", default=None, help="comma-separated concurrent request counts (default 8,32)")
    ap.add_argument("--sequential", type=int, default=3, help="requests one at a time for the p50")
    ap.add_argument("--rounds", type=int, default=rounds, help="times each wave is repeated (the median is reported)")
    ap.add_argument("--service-variant", action="append", default=[], metavar="VAR=VALUE[,VAR=VALUE]",
                    help="one more service beside the others, with these environment variables (DIFFUSION_* "
                    "settings, OMP_*): a change measured side by side; may be repeated")
    for name, (default, help) in options.items():
        ap.add_argument("--" + name.replace("_", "-"), default=default, help=help)
    ap.add_argument("--mini", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--table", type=Path, default=None, help="print the tables of a --json result and stop")
    args = ap.parse_args(argv)
    if args.table:
        result = json.loads(args.table.read_text())
        result["ratios"] = ratios(result["rows"])
        print(table(result))
        return
    base = GPU_SERVERS if args.gpu_servers else CPU_SERVERS
    variants = tuple((f"service {v.replace(',', ' ')}", *base[0][1:3], dict(kv.split("=", 1) for kv in v.split(",")))
                     for v in args.service_variant)
    servers = (base[0], *variants, *base[1:])
    with tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-") as tmp:
        result = run(args.device, Path(tmp), args.mini, args.steps,
                     [int(w) for w in args.waves.split(",")] if args.waves else None, args.sequential, servers,
                     rounds=args.rounds, **{name: getattr(args, name) for name in options})
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


def main(argv=None) -> None:
    command_line(argv, __doc__, run, table, "cifar")


if __name__ == "__main__":
    main()
