"""Every query of the Grafana dashboard returns data from a real Prometheus scraping the real service.

Starts ``python -m service`` (as production does) on a tiny checkpoint made here, starts the
``prometheus`` binary scraping it every second, sends a few /generate requests (and one that
fails) so that counters move and histograms fill, then evaluates each PromQL expression of
docker/grafana/dashboards/diffusion.json through Prometheus's HTTP API.

Skips when the ``prometheus`` binary is absent (Debian/Ubuntu: ``apt-get install prometheus``).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.deploy.helpers import free_port, make_checkpoint, stop, wait_until

REPO = Path(__file__).resolve().parents[2]
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "diffusion.json"
PROMETHEUS = shutil.which("prometheus")
SCRAPE_INTERVAL_S = 1
# Grafana variables and what they stand for here: the "All" value of $model, and a rate window
# several scrape intervals wide (Grafana's $__rate_interval is at least 4 scrape intervals).
VARIABLES = {"$__rate_interval": "30s", "$__interval": "5s", "$__range": "5m", "$model": ".*"}

# The labels Kubernetes service discovery gives a serving pod's series (deploy/k8s).
POD = {"namespace": "diffusion", "pod": "diffusion-serve-7d9f8c6b5-x2x4q"}
ADAPTER_VALUES = REPO / "deploy" / "k8s" / "prometheus-adapter" / "values.yaml"
SCALED_OBJECT = REPO / "deploy" / "k8s" / "overlays" / "keda" / "scaledobject.yaml"

pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary on PATH (apt-get install prometheus)")


def dashboard_queries(dashboard: dict) -> list[tuple[str, str]]:
    """(where, expr) for every PromQL target, including panels nested in rows."""
    out = []

    def walk(panels):
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    out.append((f"{panel['title']!r} {target['refId']}", target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard["panels"])
    return out


def substitute(expr: str) -> str:
    for name in sorted(VARIABLES, key=len, reverse=True):
        expr = expr.replace(name, VARIABLES[name])
    assert "$" not in expr, f"unknown Grafana variable left in {expr!r}"
    return expr


@pytest.fixture(scope="module")
def service(tmp_path_factory):
    """The real service, started as in production, on a free port with a tiny checkpoint."""
    root = tmp_path_factory.mktemp("service")
    checkpoints = root / "checkpoints"
    checkpoints.mkdir()
    model = make_checkpoint(checkpoints)
    port = free_port()
    log = root / "service.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env = {k: v for k, v in env.items() if not k.startswith("DIFFUSION_")}  # only what we pass counts
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
             "--checkpoint-dir", str(checkpoints), "--device", "cpu", "--data-dir", str(root / "service-data")],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/readyz", timeout=2).status_code == 200, 180,
                   "service never became ready", proc, log)
        yield {"url": url, "model": model, "log": log}
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def prometheus(service, tmp_path_factory):
    """A real Prometheus scraping the service every second (job "diffusion", as in docker/prometheus.yml),
    the target labelled with a namespace and a pod as the ServiceMonitor and deploy/k8s/prometheus/scrape.yaml
    label theirs."""
    root = tmp_path_factory.mktemp("prometheus")
    target = service["url"].removeprefix("http://")
    config = root / "prometheus.yml"
    config.write_text(
        f"global:\n  scrape_interval: {SCRAPE_INTERVAL_S}s\n  scrape_timeout: {SCRAPE_INTERVAL_S}s\n"
        "scrape_configs:\n"
        "  - job_name: diffusion\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
        f"        labels: {json.dumps(POD)}\n")  # what Kubernetes discovery attaches
    port = free_port()
    log = root / "prometheus.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(f"{url}/-/ready", timeout=2).status_code == 200, 60,
                   "prometheus never became ready", proc, log)
        yield {"url": url, "log": log}
    finally:
        stop(proc)


def instant_query(prom_url: str, expr: str) -> list[dict]:
    r = httpx.get(f"{prom_url}/api/v1/query", params={"query": expr}, timeout=10)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", f"{expr!r}: {body}"
    return body["data"]["result"]


@pytest.fixture(scope="module")
def traffic(service, prometheus):
    """Requests spread over several scrapes, after Prometheus has seen the service once."""
    prom, url, model = prometheus["url"], service["url"], service["model"]
    wait_until(lambda: [s for s in instant_query(prom, 'up{job="diffusion"}') if s["value"][1] == "1"], 30,
               "prometheus never scraped the service", log=prometheus["log"])
    time.sleep(2 * SCRAPE_INTERVAL_S)
    requests = [
        {"class_label": 3, "scheduler": "ddim", "steps": 3, "seed": 1},
        {"prompt": "seven", "scheduler": "heun", "steps": 2, "seed": 2, "num_images": 2},
        {"class_label": 1, "scheduler": "dpmpp_2m", "steps": 3, "guidance": 1.5, "seed": 3},
    ]
    with httpx.Client(base_url=url, timeout=120) as client:
        for round_ in range(3):
            for body in requests:
                r = client.post("/generate", json={**body, "model": model})
                assert r.status_code == 200, r.text
            # A request the service refuses (unknown scheduler): "Errors by status" needs one.
            r = client.post("/generate", json={"model": model, "class_label": 0, "scheduler": "euler"})
            assert r.status_code == 422, r.text
            time.sleep(2 * SCRAPE_INTERVAL_S)
    time.sleep(3 * SCRAPE_INTERVAL_S)  # let the last increments be scraped
    return requests


def test_every_dashboard_query_returns_data(prometheus, traffic):
    queries = dashboard_queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 10
    empty = []
    for where, expr in queries:
        result = instant_query(prometheus["url"], substitute(expr))
        if not result:
            empty.append(f"{where}: {expr}")
    assert not empty, "dashboard queries without data:\n" + "\n".join(empty)


def test_latency_is_broken_down_by_scheduler(prometheus, traffic):
    expr = substitute(next(e for w, e in dashboard_queries(json.loads(DASHBOARD.read_text()))
                           if w.startswith("'Request latency by scheduler") and "0.95" in e))
    schedulers = {s["metric"]["scheduler"] for s in instant_query(prometheus["url"], expr)}
    assert {body["scheduler"] for body in traffic} <= schedulers


def test_template_variable_lists_the_model(prometheus, service, traffic):
    dashboard = json.loads(DASHBOARD.read_text())
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        query = variable["query"]["query"] if isinstance(variable["query"], dict) else variable["query"]
        metric, label = query.removeprefix("label_values(").removesuffix(")").replace(" ", "").split(",")
        r = httpx.get(f"{prometheus['url']}/api/v1/label/{label}/values", params={"match[]": metric}, timeout=10)
        assert service["model"] in r.json()["data"], (variable["name"], r.json())


def adapter_query(rule: dict, series: str) -> str:
    """The PromQL the Prometheus Adapter sends for ``GET .../namespaces/diffusion/pods/*/<metric>``: its
    template with the series, the request's label matchers and the pod grouping filled in."""
    matchers = f'namespace="{POD["namespace"]}",pod=~"{POD["pod"]}"'
    return (rule["metricsQuery"].replace("<<.Series>>", series).replace("<<.LabelMatchers>>", matchers)
            .replace("<<.GroupBy>>", "pod"))


def test_prometheus_adapter_rules_give_each_pod_its_value(prometheus, traffic):
    """What the HPA scales on: each adapter rule finds the series and returns one value for the pod."""
    yaml = pytest.importorskip("yaml")
    rules = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    assert rules
    for rule in rules:
        found = httpx.get(f"{prometheus['url']}/api/v1/series", params={"match[]": rule["seriesQuery"]},
                          timeout=10).json()["data"]
        assert found, f"the adapter's seriesQuery finds nothing: {rule['seriesQuery']}"
        (series,) = {s["__name__"] for s in found}
        result = instant_query(prometheus["url"], adapter_query(rule, series))
        assert [r["metric"] for r in result] == [{"pod": POD["pod"]}], (rule["metricsQuery"], result)
        assert float(result[0]["value"][1]) >= 0


def test_keda_triggers_return_the_fleet_total(prometheus, traffic):
    yaml = pytest.importorskip("yaml")
    triggers = yaml.safe_load(SCALED_OBJECT.read_text())["spec"]["triggers"]
    # The others read the jobs' Redis stream, not Prometheus (tests/deploy/test_k8s.py checks them).
    assert {t["type"] for t in triggers} == {"prometheus", "redis-streams"}
    triggers = [t for t in triggers if t["type"] == "prometheus"]
    assert len(triggers) == 2
    for trigger in triggers:
        result = instant_query(prometheus["url"], trigger["metadata"]["query"])
        assert len(result) == 1 and float(result[0]["value"][1]) >= 0, (trigger["name"], result)
