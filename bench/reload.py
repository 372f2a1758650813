"""Models that change while the service runs: how long a new checkpoint takes to be served, and what
reloading one model costs the requests of another. Not a test: it prints (and with --json writes)
numbers.

    python -m bench.reload --device cpu            # the default model's architecture, as the README runs it
    python -m bench.reload --device cpu --mini     # seconds: a smoke run

One service (``python -m service``, default settings: ``model_control=poll``, ``poll_s`` 5) serves a
directory with two models, ``a`` and ``b``, both copies of the default model
(``checkpoints/mnist-text-compact.safetensors``: what a user trains and serves).

1. **Landing → first image.** On a warm service, a new checkpoint lands in the directory (written
   under a temporary name and renamed, as training writes) at a random point of the poll interval,
   and a client asks for it every 50 ms until it answers: the seconds from the rename to the first
   image (10 steps), median and worst of ``--landings`` tries. The same
   with the admin API (``POST /admin/models/{name}/load``, then the request) in explicit mode.
2. **One model's latency while another reloads.** ``--clients`` clients ask ``a`` for one image (DDIM
   20 steps) back to back for ``--seconds``, first with nothing else happening, then while ``b``'s
   checkpoint is overwritten with other weights every ``--every`` seconds (each one picked up by the
   poller and swapped in beside the requests); ``--rounds`` times, interleaved. ``a``'s p50 and p99
   over all rounds of each phase (and each round's p99), their ratio, and how many reloads
   happened. The issue's goal: p99 within 1.2× of the quiet one.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from bench.cifar import ROOT, source_state
from bench.load import free_port

MODEL = ROOT / "checkpoints" / "mnist-text-compact.safetensors"
REQUEST = {"prompt": "nine", "scheduler": "ddim", "steps": 20}


def land(source: Path, target: Path) -> float:
    """Copy ``source`` to ``target`` as training writes (a temporary name, then a rename); the time of the rename."""
    tmp = target.with_name("." + target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)
    return time.perf_counter()


def other_weights(source: Path, target: Path, seed: int) -> None:
    """``source`` with every floating-point weight nudged: the same architecture, other weights."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    with safe_open(str(source), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    out = {k: (v + 1e-3 * torch.randn(v.shape, generator=g, dtype=v.dtype) if v.is_floating_point() else v).contiguous()
           for k, v in tensors.items()}
    from diffusion.checkpoint import _digest

    save_file(out, str(target), metadata={**meta, "weights_sha256": _digest(out)})


class Service:
    def __init__(self, directory: Path, device: str, log: Path, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "DIFFUSION_REQUEST_TIMEOUT_S": "600"}
        self.proc = subprocess.Popen([sys.executable, "-m", "service", "--port", str(self.port), "--checkpoint-dir",
                                      str(directory), "--device", device, "--default-model", "a",
                                      "--log-level", "warning", "--data-dir", str(log.parent / f"{log.stem}-data"),
                                      *args], cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=open(log, "w"), env=env)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 600:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the service exited with {self.proc.returncode}; see {log}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("the service never became ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def first_image(url: str, name: str, since: float, limit_s: float = 120, headers=None) -> float:
    """Ask for model ``name`` every 50 ms until it answers 200; seconds since ``since``."""
    with httpx.Client(base_url=url, timeout=600) as http:
        while time.perf_counter() - since < limit_s:
            r = http.post("/generate", json={**REQUEST, "model": name, "steps": 10}, headers=headers)
            if r.status_code == 200:
                return time.perf_counter() - since
            time.sleep(0.05)
    raise RuntimeError(f"{name} never answered")


async def drive(url: str, clients: int, seconds: float) -> list[float]:
    """Latencies of ``clients`` back-to-back clients of model ``a`` for ``seconds``."""
    stop = time.perf_counter() + seconds
    out: list[float] = []

    async def client(http: httpx.AsyncClient, k: int):
        n = 0
        while time.perf_counter() < stop:
            t0 = time.perf_counter()
            r = await http.post("/generate", json={**REQUEST, "model": "a", "seed": 1000 * k + n})
            if r.status_code != 200:
                raise RuntimeError(f"a request for a failed: {r.status_code} {r.text[:200]}")
            out.append(time.perf_counter() - t0)
            n += 1
    async with httpx.AsyncClient(base_url=url, timeout=600) as http:
        await asyncio.gather(*(client(http, k) for k in range(clients)))
    return out


def reloads(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(float(v) for v in re.findall(r'^diffusion_model_loads_total\{[^}]*kind="reload"[^}]*model="b"[^}]*\} '
                                             r'([0-9.e+]+)$', text, re.M))


def quantiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    return {"n": len(xs), "p50_s": statistics.median(xs), "p99_s": xs[min(len(xs) - 1, int(0.99 * len(xs)))]}


def run(device: str, work: Path, mini: bool = False, landings: int = 5, clients: int = 2, seconds: float = 40,
        every: float = 5.0, rounds: int = 3) -> dict:
    served = work / "served"
    served.mkdir()
    spare = work / "spare"
    spare.mkdir()
    shutil.copyfile(MODEL, served / "a.safetensors")
    shutil.copyfile(MODEL, served / "b.safetensors")
    other_weights(MODEL, spare / "b1.safetensors", 1)
    other_weights(MODEL, spare / "b2.safetensors", 2)
    if mini:
        landings, seconds, every, rounds = 1, 6.0, 2.0, 1
    result: dict = {"device": device, "model": MODEL.name, "request": REQUEST, "source": source_state()}

    service = Service(served, device, work / "poll.log")
    try:
        asyncio.run(drive(service.url, clients, 3 if mini else 10))  # warm: calibration, threads
        phase = random.Random(0)
        times = []
        for k in range(landings):
            time.sleep(phase.uniform(0, 5.0))  # land at any point of the poll interval
            times.append(first_image(service.url, f"new{k}", land(MODEL, served / f"new{k}.safetensors")))
        result["landing_poll"] = {"poll_s": 5.0, "median_s": statistics.median(times), "max_s": max(times),
                                  "times_s": times}
        print(json.dumps(result["landing_poll"]), flush=True)
        for k in range(landings):
            (served / f"new{k}.safetensors").unlink()
        quiet, busy, done, k = [], [], 0.0, 0
        for _ in range(rounds):  # interleaved, so that a slow spell of the machine touches both
            quiet.append(asyncio.run(drive(service.url, clients, seconds)))
            before = reloads(service.url)
            stop = threading.Event()

            def overwrite():
                nonlocal k
                while not stop.wait(every):
                    land(spare / f"b{1 + k % 2}.safetensors", served / "b.safetensors")
                    k += 1
            writer = threading.Thread(target=overwrite, daemon=True)
            writer.start()
            busy.append(asyncio.run(drive(service.url, clients, seconds)))
            stop.set()
            writer.join()
            done += reloads(service.url) - before
    finally:
        service.stop()
    result["quiet"], result["reloading"] = quantiles(sum(quiet, [])), quantiles(sum(busy, []))
    result["quiet"]["rounds_p99_s"] = [quantiles(q)["p99_s"] for q in quiet]
    result["reloading"]["rounds_p99_s"] = [quantiles(q)["p99_s"] for q in busy]
    result["reloads"], result["every_s"], result["clients"] = done, every, clients
    result["p99_ratio"] = result["reloading"]["p99_s"] / result["quiet"]["p99_s"]
    result["p50_ratio"] = result["reloading"]["p50_s"] / result["quiet"]["p50_s"]
    print(json.dumps({k: result[k] for k in ("quiet", "reloading", "reloads", "p99_ratio")}), flush=True)

    service = Service(served, device, work / "explicit.log", "--model-control", "explicit", "--admin-key", "bench")
    admin = {"Authorization": "Bearer bench"}
    try:
        asyncio.run(drive(service.url, clients, 3))  # warm
        times = []
        for k in range(landings):
            since = land(MODEL, served / f"late{k}.safetensors")
            r = httpx.post(f"{service.url}/admin/models/late{k}/load", headers=admin, timeout=600)
            assert r.status_code == 200, r.text
            times.append(first_image(service.url, f"late{k}", since))
        result["landing_explicit"] = {"median_s": statistics.median(times), "max_s": max(times), "times_s": times}
        print(json.dumps(result["landing_explicit"]), flush=True)
    finally:
        service.stop()
    return result


def table(r: dict) -> str:
    return "\n".join([
        f"Models that change while serving ({r['model']}, {r['device']}):", "",
        "| measurement | value |", "|---|---|",
        f"| landing → first image, poll (every {r['landing_poll']['poll_s']:g} s) | median "
        f"{r['landing_poll']['median_s']:.2f} s, worst {r['landing_poll']['max_s']:.2f} s |",
        f"| landing → first image, admin load | median {r['landing_explicit']['median_s']:.2f} s, worst "
        f"{r['landing_explicit']['max_s']:.2f} s |",
        f"| a's p50 / p99, quiet ({r['clients']} clients) | {r['quiet']['p50_s']:.3f} / {r['quiet']['p99_s']:.3f} s "
        f"({r['quiet']['n']} requests) |",
        f"| a's p50 / p99, b reloading every {r['every_s']:g} s | {r['reloading']['p50_s']:.3f} / "
        f"{r['reloading']['p99_s']:.3f} s ({r['reloading']['n']} requests, {r['reloads']:g} reloads) |",
        f"| p99 ratio (goal ≤ 1.2) | {r['p99_ratio']:.2f}× (p50: {r['p50_ratio']:.2f}×) |",
        f"| p99 per round, quiet / reloading | {' '.join(f'{x:.3f}' for x in r['quiet']['rounds_p99_s'])} / "
        f"{' '.join(f'{x:.3f}' for x in r['reloading']['rounds_p99_s'])} s |"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mini", action="store_true")
    parser.add_argument("--landings", type=int, default=5)
    parser.add_argument("--clients", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=40, help="per phase and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--every", type=float, default=5.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = run(args.device, Path(work), args.mini, args.landings, args.clients, args.seconds, args.every,
                     args.rounds)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
