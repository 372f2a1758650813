"""Goodput under overload: bursts of requests with a deadline, answered by three admission policies
side by side in one run. Not a test: it prints (and with --json writes) numbers.

    python -m bench.goodput --device cpu                  # the default model, as the README starts it
    python -m bench.goodput --device cpu --mini            # the CI's smoke run (seconds)
    python -m bench.goodput --device cuda                  # bench/gpu.py runs it as its "goodput" phase

Every request is one burst member: 8 images of the default model (``mnist-text-compact``), DDIM
50 steps, "nine", its own seed, and ``timeout_s`` = D (the deadline; 20 s by default, as in the issue
that asked for this). A burst of N requests (8, 16, 32, 64) is sent at once to each of three services
on the same model, started side by side and measured in turn:

- ``rows`` : today's admission before goodput (``--goodput false``, default settings otherwise:
  up to 64 images in flight);
- ``fifo`` : one request at a time (``--goodput false --admission fifo --max-batch-rows 8``);
- ``goodput``: the new policy (default settings).

For each: answered within D (a 200: a request past its deadline is a 504), refused early (503),
timed out (504), images/s over the burst, the median seconds to a refusal, and the admitted requests
that still missed their deadline (the cost model's mispredictions, from the service's own
``diffusion_goodput_total{on_time="false"}``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.cifar import ROOT, serving, source_state

MODEL = ROOT / "checkpoints" / "mnist-text-compact.safetensors"
SERVERS = (("rows", "service", ("--goodput", "false")),
           ("fifo", "service", ("--goodput", "false", "--admission", "fifo", "--max-batch-rows", "8")),
           ("goodput", "service", ()))


def _missed(metrics: str) -> float:
    """Admitted requests that ended past their deadline, so far (the service's own counter)."""
    found = re.findall(r'^diffusion_goodput_total\{[^}]*on_time="false"[^}]*\} ([0-9.e+]+)$', metrics, re.M)
    return sum(float(v) for v in found)


async def burst(url: str, n: int, deadline: float, steps: int, seed: int) -> dict:
    """n requests at once; what became of them."""
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)
    async with httpx.AsyncClient(base_url=url, timeout=deadline + 120, limits=limits) as http:
        missed = _missed((await http.get("/metrics")).text)

        async def one(k):
            t0 = time.perf_counter()
            r = await http.post("/generate", json={"prompt": "nine", "num_images": 8, "scheduler": "ddim",
                                                   "steps": steps, "seed": seed + 8 * k, "timeout_s": deadline})
            return r.status_code, time.perf_counter() - t0

        t0 = time.perf_counter()
        answers = await asyncio.gather(*(one(k) for k in range(n)))
        wall = time.perf_counter() - t0
        missed = _missed((await http.get("/metrics")).text) - missed
    codes = [c for c, _ in answers]
    refusals = [s for c, s in answers if c == 503]
    return {"n": n, "answered": codes.count(200), "refused": codes.count(503), "timed_out": codes.count(504),
            "other": len(codes) - codes.count(200) - codes.count(503) - codes.count(504),
            "images_per_s": 8 * codes.count(200) / wall, "wall_s": wall,
            "refusal_p50_s": statistics.median(refusals) if refusals else None, "admitted_missed": missed}


def run(device: str, work: Path, mini: bool = False, deadline: float | None = None,
        sizes: list[int] | None = None, steps: int | None = None) -> dict:
    deadline = deadline or (4.0 if mini else 20.0)
    sizes = sizes or ([4] if mini else [8, 16, 32, 64])
    steps = steps or (10 if mini else 50)
    rows = []
    with serving(SERVERS, MODEL, device, 64, work, "goodput") as (urls, ready):
        for _, url in urls.values():  # the first request calibrates the cost model, loads the threads' counts
            asyncio.run(burst(url, 1, 3600, steps, 999))
        for n in sizes:
            for label, (_, url) in urls.items():
                row = {"policy": label, **asyncio.run(burst(url, n, deadline, steps, 100 * n))}
                print(json.dumps(row), flush=True)
                rows.append(row)
    return {"device": device, "deadline_s": deadline, "steps": steps, "images_per_request": 8, "rows": rows,
            "ready_s": ready, "source": source_state()}


def table(result: dict) -> str:
    lines = [f"Bursts of N requests (8 images, DDIM {result['steps']}, deadline {result['deadline_s']:g} s) on "
             f"{result['device']}:", "",
             "| N | policy | answered in time | refused (503) | timed out (504) | images/s | refusal p50 s | "
             "admitted but late |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p50 = "–" if r["refusal_p50_s"] is None else f"{r['refusal_p50_s']:.1f}"
        lines.append(f"| {r['n']} | {r['policy']} | {r['answered']} | {r['refused']} | {r['timed_out']} | "
                     f"{r['images_per_s']:.2f} | {p50} | {r['admitted_missed']:g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mini", action="store_true")
    parser.add_argument("--deadline", type=float)
    parser.add_argument("--sizes", type=lambda v: [int(x) for x in v.split(",")])
    parser.add_argument("--steps", type=int)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        result = run(args.device, Path(work), args.mini, args.deadline, args.sizes, args.steps)
    print(table(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    sys.exit(main())
