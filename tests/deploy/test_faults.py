"""Replica faults survived: two service processes behind the project's nginx configuration, under load.

Runs for real, on loopback: replicas A and B (``python -m service`` on 127.0.0.2 and 127.0.0.3, one
port), docker/nginx.conf as compose runs it (only the resolver address, the listen address and the
replicas' port are rewritten; a tiny DNS server here answers "replica" with both addresses, as
Docker's embedded DNS does), and a steady load of small requests through nginx. Mid-run:

1. A is killed (SIGKILL), then restarted on the same address;
2. once A is back, B gets SIGTERM, as Kubernetes stops a pod, and drains.

Then: every request got a complete answer (200, its own request id, images and seeds) or a clean
429/503 with Retry-After; none ran past its deadline; no request id was answered twice; B exited
cleanly and answered every request it had accepted with a 200. Prints the counts.
Skips without an nginx binary (Debian: nginx-light). About 40 s on two cores.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from datetime import datetime
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import REPO, free_port, make_checkpoint, stop, wait_until

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
ADDRESSES = ("127.0.0.2", "127.0.0.3")
REQUEST_TIMEOUT_S = 20          # the service's deadline (504 past it)
CLIENT_DEADLINE_S = REQUEST_TIMEOUT_S + 10   # a request still open past this "hangs"
CLIENTS = 4

pytestmark = pytest.mark.skipif(NGINX is None, reason="no nginx binary (apt-get install nginx-light)")


class ReplicaDNS:
    """A one-name DNS server on loopback: "replica" resolves to every replica address (type A)."""

    def __init__(self, name: str, addresses: tuple[str, ...]):
        self.name, self.addresses = name, addresses
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.closed = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.closed:
            try:
                query, peer = self.sock.recvfrom(512)
            except (TimeoutError, OSError):
                continue
            labels, i = [], 12
            while query[i]:
                labels.append(query[i + 1:i + 1 + query[i]].decode().lower())
                i += 1 + query[i]
            qtype = struct.unpack(">H", query[i + 1:i + 3])[0]
            question = query[12:i + 5]
            known = ".".join(labels) == self.name
            answers = self.addresses if known and qtype == 1 else ()
            header = struct.pack(">HHHHHH", struct.unpack(">H", query[:2])[0], 0x8180 | (0 if known else 3),
                                 1, len(answers), 0, 0)
            records = b"".join(b"\xc0\x0c" + struct.pack(">HHIH", 1, 1, 5, 4) + socket.inet_aton(a) for a in answers)
            self.sock.sendto(header + question + records, peer)

    def close(self):
        self.closed = True
        self.thread.join()
        self.sock.close()


def nginx_config(directory: Path, dns_port: int, listen_port: int, replica_port: int) -> Path:
    """docker/nginx.conf with only its addresses changed for loopback (the replicas' port in each location:
    generation and /jobs)."""
    text = (REPO / "docker" / "nginx.conf").read_text()
    for old, new, times in [("resolver 127.0.0.11 ", f"resolver 127.0.0.1:{dns_port} ", 1),
                            ("listen 80;", f"listen 127.0.0.1:{listen_port};", 1),
                            ("proxy_pass http://$replicas:8000;", f"proxy_pass http://$replicas:{replica_port};", 2)]:
        assert text.count(old) == times, f"docker/nginx.conf changed: {old!r} not found {times} times"
        text = text.replace(old, new)
    path = directory / "nginx.conf"
    path.write_text(text)
    return path


class Replica:
    """One ``python -m service`` process; each start logs to its own file."""

    def __init__(self, name: str, address: str, port: int, checkpoints: Path, logs: Path):
        self.name, self.address, self.port, self.checkpoints, self.logs = name, address, port, checkpoints, logs
        self.starts = 0
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    def start(self):
        self.starts += 1
        self.log = self.logs / f"{self.name}-{self.starts}.log"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFUSION_")}
        env.update(PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "service", "--host", self.address, "--port", str(self.port),
                 "--checkpoint-dir", str(self.checkpoints), "--device", "cpu", "--max-batch-rows", "8",
                 "--request-timeout-s", str(REQUEST_TIMEOUT_S), "--shutdown-grace-s", "15",
                 "--data-dir", str(self.logs / f"{self.name}-data")],  # jobs: one process per data directory
                cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120):
        url = f"http://{self.address}:{self.port}/readyz"
        wait_until(lambda: httpx.get(url, timeout=2).status_code == 200, timeout, f"replica {self.name} never ready",
                   self.proc, self.log)

    def wait_busy(self, timeout: float = 10):
        """Until the replica has rows in flight (its own gauge), so that a signal finds work to drain."""
        url = f"http://{self.address}:{self.port}/metrics"

        def busy():
            text = httpx.get(url, timeout=2).text
            return any(line.startswith("diffusion_rows_in_flight ") and float(line.split()[1]) > 0
                       for line in text.splitlines())

        wait_until(busy, timeout, f"replica {self.name} never busy", self.proc, self.log)

    def request_lines(self) -> list[dict]:
        """The /generate request log lines of every start of this replica."""
        lines = []
        for log in sorted(self.logs.glob(f"{self.name}-*.log")):
            for line in log.read_text(errors="replace").splitlines():
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if record.get("event") == "request" and record.get("path") == "/generate":
                    lines.append(record)
        return lines


class Load:
    """CLIENTS threads sending small /generate requests through nginx until stopped."""

    def __init__(self, url: str, model: str):
        self.url, self.model = url, model
        self.results: list[dict] = []
        self.ids = itertools.count()
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, args=(k,), daemon=True) for k in range(CLIENTS)]

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stopping.set()
        for t in self.threads:
            t.join(CLIENT_DEADLINE_S + 5)

    def _client(self, k: int):
        with httpx.Client(base_url=self.url, timeout=CLIENT_DEADLINE_S) as client:
            while not self.stopping.is_set():
                n = next(self.ids)
                rid = f"fault-{n}"
                body = {"model": self.model, "class_label": n % 10, "scheduler": "ddim", "steps": 40 if n % 3 == 0 else 2 + n % 5,
                        "seed": n, "num_images": 1 + n % 2}
                start = time.monotonic()
                result = {"id": rid, "seed": n, "images": body["num_images"], "sent": start}
                try:
                    r = client.post("/generate", json=body, headers={"x-request-id": rid})
                    result.update(status=r.status_code, retry_after=r.headers.get("retry-after"),
                                  header_id=r.headers.get("x-request-id"), body=_json(r))
                except httpx.HTTPError as e:
                    result.update(status=None, error=f"{type(e).__name__}: {e}")
                result["elapsed"] = time.monotonic() - start
                with self.lock:
                    self.results.append(result)
                time.sleep(0.02)

    def count(self) -> int:
        with self.lock:
            return len(self.results)


def _json(r: httpx.Response):
    try:
        return r.json()
    except ValueError:
        return r.text[:200]


def complete(result: dict) -> bool:
    body = result.get("body")
    return (result["status"] == 200 and isinstance(body, dict) and body.get("request_id") == result["id"]
            and result["header_id"] == result["id"] and body.get("seeds") == list(range(result["seed"], result["seed"] + result["images"]))
            and len(body.get("images", [])) == result["images"])


def test_a_killed_and_a_terminated_replica_lose_no_request(tmp_path):
    checkpoints = tmp_path / "checkpoints"
    checkpoints.mkdir()
    model = make_checkpoint(checkpoints)
    port = free_port()
    a = Replica("A", ADDRESSES[0], port, checkpoints, tmp_path)
    b = Replica("B", ADDRESSES[1], port, checkpoints, tmp_path)
    dns = ReplicaDNS("replica", ADDRESSES)
    lb_port = free_port()
    config = nginx_config(tmp_path, dns.port, lb_port, port)
    nginx = None
    timeline: list[str] = []
    try:
        a.start()
        b.start()
        a.wait_ready()
        b.wait_ready()
        nginx = subprocess.Popen([NGINX, "-p", f"{tmp_path}/", "-c", str(config), "-g",
                                  f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/nginx-error.log warn;"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        url = f"http://127.0.0.1:{lb_port}"
        wait_until(lambda: httpx.get(f"{url}/lb-healthz", timeout=2).status_code == 200, 20, "nginx never answered",
                   nginx, tmp_path / "nginx-error.log")
        t0 = time.monotonic()

        def mark(what: str):
            timeline.append(f"{time.monotonic() - t0:5.1f}s {what} (requests sent so far: {load.count()})")

        with Load(url, model) as load:
            time.sleep(6)
            a.proc.send_signal(signal.SIGKILL)
            a.proc.wait()
            mark("A killed (SIGKILL)")
            time.sleep(3)
            a.start()
            a.wait_ready()
            mark("A restarted and ready")
            time.sleep(4)
            b.wait_busy()
            sigterm_at = time.time()
            b.proc.send_signal(signal.SIGTERM)
            mark("B sent SIGTERM")
            b_exit = b.proc.wait(timeout=60)
            mark(f"B exited with {b_exit}")
            time.sleep(4)
        mark("load stopped")
    finally:
        if nginx is not None:
            stop(nginx)
        for replica in (a, b):
            if replica.proc is not None:
                stop(replica.proc)
        dns.close()

    results = load.results
    statuses = Counter(r["status"] for r in results)
    ok = [r for r in results if complete(r)]
    clean_refusals = [r for r in results if r["status"] in (429, 503) and r.get("retry_after")]
    broken = [r for r in results if r not in ok and r not in clean_refusals]
    hung = [r for r in results if r["elapsed"] > CLIENT_DEADLINE_S]
    nginx_log = (tmp_path / "nginx-error.log").read_text(errors="replace") if (tmp_path / "nginx-error.log").exists() else ""
    errors = [line for line in nginx_log.splitlines() if "[error]" in line and "upstream" in line]
    cut = sum(1 for line in errors if "prematurely closed" in line or "reset by peer" in line)
    refused = sum(1 for line in errors if "Connection refused" in line)
    served = Counter(line["request_id"] for replica in (a, b) for line in replica.request_lines()
                     if line["status"] == 200)
    b_lines = b.request_lines()
    b_log = b.log.read_text(errors="replace")

    def started(line: dict) -> float:
        return datetime.fromisoformat(line["ts"]).timestamp() - line["total_s"]

    draining = [x for x in b_lines if started(x) < sigterm_at < datetime.fromisoformat(x["ts"]).timestamp()]
    print("\nreplica faults: " + "; ".join(timeline))
    print(f"replica faults: {len(results)} requests, statuses {dict(statuses)}, complete {len(ok)}, "
          f"clean 429/503 {len(clean_refusals)}, broken {len(broken)}, hung {len(hung)}, "
          f"passed to the other replica by nginx: {cut} cut off by the kill, {refused} refused while down; "
          f"max latency {max(r['elapsed'] for r in results):.2f} s; "
          f"B accepted {len(b_lines)}, answered {sum(1 for x in b_lines if x['status'] == 200)} with 200, "
          f"{len(draining)} of them in flight at SIGTERM")

    assert len(results) >= 50, "too little load to say anything"
    assert not broken, f"{len(broken)} requests without a complete answer or a clean refusal: {broken[:5]}"
    assert not hung
    assert all(n == 1 for n in served.values()), {k: n for k, n in served.items() if n > 1}
    assert {r["id"] for r in ok} == {k for k, n in served.items() if k.startswith("fault-")}
    # uvicorn drains, then re-raises the SIGTERM it caught: exit code 0 or -SIGTERM after a clean shutdown.
    assert b_exit in (0, -signal.SIGTERM)
    assert '"event": "shutdown"' in b_log and "Application shutdown complete" in b_log
    assert b_lines and all(x["status"] == 200 for x in b_lines), Counter(x["status"] for x in b_lines)
    assert draining, "SIGTERM found no request in flight on B"
    assert cut + refused > 0, "the kill should have sent some requests to the other replica"


def test_no_replica_reachable_is_a_json_503_with_retry_after(tmp_path):
    """Every replica down (the name resolves, nothing listens): nginx's own 502 would reach the client
    as an HTML page without Retry-After; docker/nginx.conf answers a JSON 503 with Retry-After instead,
    like a full replica."""
    dns = ReplicaDNS("replica", ADDRESSES)
    lb_port = free_port()
    config = nginx_config(tmp_path, dns.port, lb_port, free_port())
    nginx = subprocess.Popen([NGINX, "-p", f"{tmp_path}/", "-c", str(config), "-g",
                              f"daemon off; pid {tmp_path}/nginx.pid; error_log {tmp_path}/nginx-error.log crit;"],
                             stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{lb_port}"
        wait_until(lambda: httpx.get(f"{url}/lb-healthz", timeout=2).status_code == 200, 20, "nginx never answered",
                   nginx, tmp_path / "nginx-error.log")
        for r in (httpx.post(f"{url}/generate", json={"prompt": "nine"}, timeout=10),
                  httpx.get(f"{url}/readyz", timeout=10)):
            assert r.status_code == 503, (r.status_code, r.text[:200])
            assert int(r.headers["retry-after"]) > 0
            assert r.headers["content-type"].startswith("application/json")
            assert "no service replica" in r.json()["detail"]
    finally:
        stop(nginx)
        dns.close()
