"""The latency/throughput trade-off of the engine's admission policy, in-process (no HTTP).

A saturating stream of bulk requests (DDIM, ``--bulk-steps``, ``--bulk-images`` images each, always
``--backlog`` of them waiting) and a trickle of short requests (``--short-steps``, every sampler in
turn, one at a time) go through one Engine; for each policy it reports the bulk throughput and the
short requests' latency, also as a multiple of their latency on an idle engine. Not a test.

    python -m bench.policy --size compact --device cpu
    python -m bench.policy --size small --device cuda --max-rows 512 --bulk-images 32 --cuda-graphs
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

SCHEDULERS = ("ddim", "dpmpp_2m", "pndm", "heun", "ddpm")


def policies(max_rows: int) -> dict:
    from service.engine.scheduler import Policy
    return {
        "fifo": (Policy(order="fifo"), 0),
        "short-first": (Policy(), 0),
        f"short-first, reserve {max(1, max_rows // 8)}": (Policy(reserve_rows=max(1, max_rows // 8)), 0),
        f"short-first, reserve {max(1, max_rows // 8)}, latency-rows {max(1, max_rows // 4)}":
            (Policy(reserve_rows=max(1, max_rows // 8)), max(1, max_rows // 4)),
    }


def run(pipe, name: str, policy, latency_rows: int, args, accel) -> dict:
    from service.engine import Engine, GenerationSpec

    eng = Engine({"m": pipe}, max_rows=args.max_rows, max_steps=max(args.bulk_steps, args.short_steps) * 2,
                 accel=accel, policy=policy, latency_rows=latency_rows)
    eng.warm_up()
    cond = pipe.resolve(class_label=9)
    bulk = lambda k: GenerationSpec("m", cond, "ddim", args.bulk_steps, 2.0,  # noqa: E731
                                    tuple(range(k * 1000, k * 1000 + args.bulk_images)))
    short = lambda k: GenerationSpec("m", cond, SCHEDULERS[k % 5], args.short_steps, 2.0, (k,))  # noqa: E731
    idle = []
    for k in range(5):  # the short requests' latency on an idle engine
        t0 = time.perf_counter()
        job = eng.submit(short(k), 600)
        while not job.future.done():
            eng.iterate()
        idle.append(time.perf_counter() - t0)
    waiting, k_bulk, shorts, latencies, evaluations = [], 0, 0, [], 0
    probe, probe_t0 = None, 0.0
    start = time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        while sum(1 for j in waiting if not j.future.done()) < args.backlog:
            waiting.append(eng.submit(bulk(k_bulk), 600))
            k_bulk += 1
        if probe is None and eng.iterations % 3 == 0:
            probe, probe_t0 = eng.submit(short(shorts), 600), time.perf_counter()
            shorts += 1
        evaluations += eng.iterate()
        if probe is not None and probe.future.done():
            latencies.append(time.perf_counter() - probe_t0)
            probe = None
        waiting = [j for j in waiting if not j.future.done()]
    wall = time.perf_counter() - start
    idle_p50 = statistics.median(idle)
    p99 = statistics.quantiles(latencies, n=100, method="inclusive")[98] if len(latencies) > 1 else float("nan")
    # throughput as model evaluations (rows stepped) per second: completed images would quantise it
    return {"policy": name, "evaluations_per_s": round(evaluations / wall, 1), "short_requests": len(latencies),
            "short_p50_s": round(statistics.median(latencies), 3) if latencies else None,
            "short_p99_s": round(p99, 3) if latencies else None, "idle_p50_s": round(idle_p50, 3),
            "p99_over_idle": round(p99 / idle_p50, 2) if len(latencies) > 1 else None}


def main(argv=None) -> None:
    import diffusion
    from bench.gpu import DIGITS
    from diffusion import Acceleration
    from diffusion.runner import power_of_two_buckets

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", default="compact")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--max-rows", type=int, default=32)
    ap.add_argument("--bulk-steps", type=int, default=50)
    ap.add_argument("--bulk-images", type=int, default=8)
    ap.add_argument("--backlog", type=int, default=8)
    ap.add_argument("--short-steps", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--cuda-graphs", action="store_true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    cfg = diffusion.model_config(args.size, (1, 28, 28), num_classes=10, class_names=DIGITS)
    path = Path(tempfile.mkdtemp()) / "m.safetensors"
    diffusion.save(diffusion.DiffusionModel(cfg), path)
    pipe = diffusion.load(str(path), args.device)
    accel = Acceleration(compile="default", cuda_graphs=True, buckets=power_of_two_buckets(args.max_rows)) \
        if args.cuda_graphs else Acceleration()
    results = []
    for name, (policy, latency_rows) in policies(args.max_rows).items():
        results.append(run(pipe, name, policy, latency_rows, args, accel))
        print(json.dumps(results[-1]), flush=True)
    print(f"\n{args.size} on {args.device}, max rows {args.max_rows}, bulk DDIM {args.bulk_steps} x "
          f"{args.bulk_images} images, short {args.short_steps} steps (every sampler), w = 2")
    print(f"{'policy':44s} {'NFE/s':>10s} {'short p50':>9s} {'short p99':>9s} {'idle p50':>8s} {'p99/idle':>8s}")
    fmt = lambda v, w: f"{v:{w}.3f}" if isinstance(v, float) else f"{'-':>{w}s}"  # noqa: E731
    for r in results:
        print(f"{r['policy']:44s} {fmt(r['evaluations_per_s'], 10)} {fmt(r['short_p50_s'], 9)} "
              f"{fmt(r['short_p99_s'], 9)} {fmt(r['idle_p50_s'], 8)} {fmt(r['p99_over_idle'], 8)}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
