"""Jobs, measured side by side in one run. Not a test: it prints (and with --json writes) numbers.

    python -m bench.jobs --device cpu            # the default model, as the README starts it
    python -m bench.jobs --device cpu --mini     # seconds: CI's smoke run

1. **Overhead.** One service (default settings, the default model ``mnist-text-compact``); C
   clients (8, 32) each send requests one after another, 1 image, DDIM 20, "nine", their own seeds:
   through ``POST /generate``, or through ``POST /jobs`` followed by its ``/events`` stream until
   ``done`` (what a job client does). Rounds alternate the two; images/s per path, median of the
   rounds. Goal: jobs within 5 % of /generate.
2. **Pulling replicas against round-robin.** Two replicas of the service pull jobs from one Redis
   (``--jobs-url``); two other replicas (each its own SQLite) sit behind nginx round-robin and get
   the same work through ``/generate``. The work: long jobs (1000 steps, 2 images) sent at the start,
   then short ones (10 steps, 1 image) arriving at a steady rate while they run. Reported: the short
   jobs' p50 and p99 from submission to result, and images/s over the whole run (all images over the
   time to the last one). Goal: a better short p99 at no loss of images/s. Needs ``redis-server`` and
   ``nginx`` on the PATH (Debian's packages).

The two pairs of replicas run one after the other (they would share the cores otherwise).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.cifar import ROOT, launch, serving, source_state, _wait_ready
from bench.load import free_port

MODEL = ROOT / "checkpoints" / "mnist-text-compact.safetensors"


def body(seed: int, steps: int, images: int = 1) -> dict:
    return {"prompt": "nine", "num_images": images, "scheduler": "ddim", "steps": steps, "seed": seed}


async def via_job(http: httpx.AsyncClient, payload: dict) -> int:
    """Submit a job and follow its events to the end; the images it made."""
    r = await http.post("/jobs", json=payload)
    r.raise_for_status()
    job = r.json()["id"]
    event = None
    async with http.stream("GET", f"/jobs/{job}/events") as stream:
        async for line in stream.aiter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event in ("done", "error", "cancelled"):
                if event != "done":
                    raise RuntimeError(f"job {job}: {event} {line[6:300]}")
                return len(json.loads(line[6:])["images"])
    raise RuntimeError(f"job {job}: the stream ended early")


async def via_generate(http: httpx.AsyncClient, payload: dict) -> int:
    r = await http.post("/generate", json=payload)
    r.raise_for_status()
    return len(r.json()["images"])


async def closed_loop(url: str, clients: int, per_client: int, steps: int, path: str, seed: int) -> float:
    """``clients`` clients, each ``per_client`` requests in a row; images/s."""
    send = via_job if path == "jobs" else via_generate
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=3600, limits=limits) as http:
        async def client(c: int) -> int:
            return sum([await send(http, body(seed + 1000 * c + k, steps)) for k in range(per_client)])
        t0 = time.perf_counter()
        images = sum(await asyncio.gather(*(client(c) for c in range(clients))))
        return images / (time.perf_counter() - t0)


def overhead(device: str, work: Path, mini: bool) -> list[dict]:
    sizes, rounds, per_client, steps = ([2], 1, 2, 5) if mini else ([8, 32], 3, 4, 20)
    rows = []
    with serving((("service", "service", ()),), MODEL, device, 64, work, "jobs-overhead") as (urls, _):
        url = urls["service"][1]
        asyncio.run(closed_loop(url, 1, 1, steps, "generate", 1))  # calibration, threads
        asyncio.run(closed_loop(url, 1, 1, steps, "jobs", 2))
        for clients in sizes:
            rates: dict[str, list[float]] = {"generate": [], "jobs": []}
            for k in range(rounds):
                for path in ("generate", "jobs") if k % 2 == 0 else ("jobs", "generate"):
                    rates[path].append(asyncio.run(closed_loop(url, clients, per_client, steps, path, 10 ** 6 * k)))
            row = {"clients": clients, "generate_images_per_s": statistics.median(rates["generate"]),
                   "jobs_images_per_s": statistics.median(rates["jobs"]), "rounds": rates}
            row["ratio"] = row["jobs_images_per_s"] / row["generate_images_per_s"]
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


# --- pulling replicas against round-robin ----------------------------------------------------------

NGINX_CONF = """
worker_processes 1;
error_log {root}/nginx-error.log warn;
pid {root}/nginx.pid;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {root}/body; proxy_temp_path {root}/proxy; fastcgi_temp_path {root}/fcgi;
    uwsgi_temp_path {root}/uwsgi; scgi_temp_path {root}/scgi;
    upstream replicas {{ server {a}; server {b}; keepalive 64; }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://replicas; proxy_http_version 1.1; proxy_set_header Connection "";
            proxy_read_timeout 3600s; proxy_buffering off;
        }}
    }}
}}
"""


async def mixed(urls: list[str], path: str, long_jobs: int, long_steps: int, long_images: int, shorts: int,
                every_s: float) -> dict:
    """The long jobs at once, then a short one every ``every_s`` (to the replicas in turn: for round-robin
    the one URL is nginx's); the shorts' latencies and the run's images/s."""
    send = via_job if path == "jobs" else via_generate
    limits = httpx.Limits(max_connections=long_jobs + shorts + 8, max_keepalive_connections=long_jobs + shorts + 8)
    clients = [httpx.AsyncClient(base_url=u, timeout=7200, limits=limits) for u in urls]
    try:
        t0 = time.perf_counter()
        done: list[float] = []

        async def one(k: int, payload: dict, short: bool):
            started = time.perf_counter()
            images = await send(clients[k % len(clients)], payload)
            done.append(time.perf_counter())
            return images, (time.perf_counter() - started) if short else None

        tasks = [asyncio.ensure_future(one(k, body(50_000 + 10 * k, long_steps, long_images), False))
                 for k in range(long_jobs)]
        await asyncio.sleep(every_s)
        for k in range(shorts):
            tasks.append(asyncio.ensure_future(one(long_jobs + k, body(90_000 + k, 10), True)))
            await asyncio.sleep(every_s)
        results = await asyncio.gather(*tasks)
    finally:
        for c in clients:
            await c.aclose()
    latencies = sorted(s for _, s in results if s is not None)
    images = sum(i for i, _ in results)
    return {"short_p50_s": statistics.median(latencies),
            "short_p99_s": latencies[min(len(latencies) - 1, int(round(0.99 * (len(latencies) - 1))))],
            "short_max_s": latencies[-1], "images": images, "images_per_s": images / (max(done) - t0)}


def start_redis(work: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--port", str(port), "--bind", "127.0.0.1", "--dir",
                             str(work), "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(400):
        try:
            if client.ping():
                return proc, f"redis://127.0.0.1:{port}/0"
        except redis.exceptions.ConnectionError:
            time.sleep(0.025)
    raise RuntimeError("redis-server did not start")


def replicas(device: str, work: Path, label: str, args: tuple, max_rows: int) -> list[tuple[subprocess.Popen, str]]:
    out = []
    for name in ("a", "b"):
        t0 = time.perf_counter()
        proc, url = launch("service", args, MODEL, device, max_rows, work / f"{label}-{name}.log")
        out.append((proc, url))
        _wait_ready(proc, url, f"{label}-{name}", t0)
    return out


def stop(procs) -> None:
    for proc in procs:
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()


def pull_vs_round_robin(device: str, work: Path, mini: bool, long_jobs: int = 4, long_images: int = 2,
                        shorts: int = 40) -> dict:
    if not (shutil.which("redis-server") and shutil.which("nginx")):
        print("skipped: pulling replicas against round-robin needs redis-server and nginx", flush=True)
        return {}
    long_steps, every_s = (60, 0.3) if mini else (1000, 0.5)
    if mini:
        long_jobs, shorts = 2, 4
    max_rows = 16
    out = {"long_jobs": long_jobs, "long_steps": long_steps, "long_images": long_images, "shorts": shorts,
           "short_steps": 10, "short_every_s": every_s, "max_batch_rows": max_rows}
    # pulling: two replicas on one Redis
    redis_proc, redis_url = start_redis(work)
    pulling = replicas(device, work, "pull", ("--jobs-url", redis_url), max_rows)
    try:
        for _, url in pulling:  # calibrate each replica's cost model before the run
            asyncio.run(closed_loop(url, 1, 1, 10, "generate", 7))
        out["pull"] = asyncio.run(mixed([u for _, u in pulling], "jobs", long_jobs, long_steps, long_images, shorts,
                                        every_s))
        print(json.dumps({"pull": out["pull"]}), flush=True)
    finally:
        stop([p for p, _ in pulling] + [redis_proc])
    # round-robin: two replicas behind nginx, /generate
    pushed = replicas(device, work, "rr", (), max_rows)
    port = free_port()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_CONF.format(root=work, port=port, a=pushed[0][1][7:], b=pushed[1][1][7:]))
    nginx = subprocess.Popen([shutil.which("nginx"), "-p", f"{work}/", "-c", str(conf), "-g", "daemon off;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        for _ in range(200):
            try:
                if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        for _, u in pushed:
            asyncio.run(closed_loop(u, 1, 1, 10, "generate", 7))
        out["round_robin"] = asyncio.run(mixed([url], "generate", long_jobs, long_steps, long_images, shorts,
                                               every_s))
        print(json.dumps({"round_robin": out["round_robin"]}), flush=True)
    finally:
        stop([nginx] + [p for p, _ in pushed])
    out["short_p99_ratio"] = out["pull"]["short_p99_s"] / out["round_robin"]["short_p99_s"]
    out["images_per_s_ratio"] = out["pull"]["images_per_s"] / out["round_robin"]["images_per_s"]
    return out


def run(device: str, work: Path, mini: bool = False, parts: str = "overhead,replicas", **mix) -> dict:
    result = {"device": device, "model": MODEL.stem, "cpu_count": os.cpu_count(), "source": source_state()}
    if "overhead" in parts:
        result["overhead"] = overhead(device, work, mini)
    if "replicas" in parts:
        result["replicas"] = pull_vs_round_robin(device, work, mini, **mix)
    return result


def table(result: dict) -> str:
    lines = []
    if result.get("overhead"):
        lines += [f"Jobs against /generate ({result['device']}, 1 image, DDIM 20, clients in a closed loop):", "",
                  "| clients | /generate images/s | jobs images/s | jobs / generate |", "|---|---|---|---|"]
        lines += [f"| {r['clients']} | {r['generate_images_per_s']:.2f} | {r['jobs_images_per_s']:.2f} | "
                  f"{r['ratio']:.3f} |" for r in result["overhead"]]
    r = result.get("replicas")
    if r:
        lines += ["", f"Two replicas: {r['long_jobs']} long jobs ({r['long_steps']} steps, {r['long_images']} images) "
                  "at once, then "
                  f"{r['shorts']} short ones (10 steps, 1 image) every {r['short_every_s']:g} s:", "",
                  "| replicas | short p50 s | short p99 s | short max s | images/s |", "|---|---|---|---|---|"]
        for name, label in (("pull", "pulling from Redis (jobs)"), ("round_robin", "nginx round-robin (/generate)")):
            x = r[name]
            lines.append(f"| {label} | {x['short_p50_s']:.2f} | {x['short_p99_s']:.2f} | {x['short_max_s']:.2f} | "
                         f"{x['images_per_s']:.2f} |")
        lines.append(f"\nshort p99 pull / round-robin: {r['short_p99_ratio']:.2f}; images/s: "
                     f"{r['images_per_s_ratio']:.2f}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mini", action="store_true")
    parser.add_argument("--parts", default="overhead,replicas")
    parser.add_argument("--long-jobs", type=int, default=4)
    parser.add_argument("--long-images", type=int, default=2)
    parser.add_argument("--shorts", type=int, default=40)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = run(args.device, Path(work), args.mini, args.parts, long_jobs=args.long_jobs,
                     long_images=args.long_images, shorts=args.shorts)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
