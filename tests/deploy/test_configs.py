"""The deployment files hang together: dashboard, Grafana provisioning, Prometheus, nginx, compose.

Structural checks always run. Tool checks (`promtool check config`, `nginx -t`,
`docker compose config`) run when the tool is installed and skip otherwise.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml", reason="PyYAML is needed to read the compose and provisioning files")

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "diffusion.json"
DATASOURCES = DOCKER / "grafana" / "provisioning" / "datasources" / "prometheus.yaml"
DASHBOARD_PROVIDERS = DOCKER / "grafana" / "provisioning" / "dashboards" / "diffusion.yaml"
COMPOSE_FILES = sorted(REPO.glob("compose*.yaml"))
# Every stack the docs tell users to run; each must pass `docker compose config`.
STACKS = [["compose.yaml"], ["compose.yaml", "compose.cpu.yaml"], ["compose.yaml", "compose.scale.yaml"]]

# The service's metric families (issue 4: fixed names) and the series they expose.
HISTOGRAMS = {"diffusion_request_duration_seconds", "diffusion_queue_wait_seconds",
              "diffusion_batch_rows", "diffusion_forward_duration_seconds", "diffusion_prediction_ratio",
              "diffusion_model_load_seconds"}
SERIES = ({"diffusion_requests_total", "diffusion_images_generated_total", "diffusion_queue_depth",
           "diffusion_rows_in_flight", "diffusion_streamed_requests_total", "diffusion_previews_total",
           "diffusion_goodput_total", "diffusion_refusals_total", "diffusion_model_loads_total",
           "diffusion_model_load_failures_total", "diffusion_model_evictions_total", "diffusion_model_unloads_total",
           "diffusion_model_resident_bytes", "up"}
          | {h + suffix for h in HISTOGRAMS for suffix in ("_bucket", "_sum", "_count")})
# Jobs (issue "jobs that survive"). The first two describe the job store, which every replica sees
# whole (one Redis, or a single replica's SQLite): the dashboard takes their max over replicas, as a
# sum would count each job once per replica. The counters are per replica and are summed.
JOB_STORE_GAUGES = {"diffusion_jobs", "diffusion_jobs_queue_age_seconds"}
JOB_SERIES = JOB_STORE_GAUGES | {"diffusion_jobs_submitted_total", "diffusion_jobs_finished_total",
                                 "diffusion_jobs_reclaimed_total", "diffusion_jobs_claimed_total",
                                 "diffusion_webhook_deliveries_total"}
SERIES |= JOB_SERIES
PROMQL_WORDS = {"sum", "by", "rate", "histogram_quantile", "le", "irate", "increase", "avg", "max",
                "min", "without", "on", "or", "and", "count"}


def load_yaml(path: Path) -> dict:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that accepts compose's merge tags (!reset, !override) as plain values."""


_ComposeLoader.add_constructor("!reset", lambda loader, node: None)
_ComposeLoader.add_constructor(
    "!override", lambda loader, node: loader.construct_sequence(node, deep=True)
    if isinstance(node, yaml.SequenceNode) else loader.construct_mapping(node, deep=True))


def dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict]) -> list[dict]:
    out = []
    for p in panels:
        out.append(p)
        out += all_panels(p.get("panels", []))
    return out


# --- Grafana ----------------------------------------------------------------------------------

def test_dashboard_is_well_formed():
    d = dashboard()
    assert d["uid"] and d["title"] and isinstance(d["schemaVersion"], int)
    panels = all_panels(d["panels"])
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in panels:
        assert p["type"] in {"timeseries", "stat", "gauge", "bargauge", "row", "table"}, p["title"]
        grid = p["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24 and grid["h"] > 0, p["title"]
        refs = [t["refId"] for t in p.get("targets", [])]
        assert len(refs) == len(set(refs)), f"duplicate refId in {p['title']!r}"
        if p["type"] != "row":
            assert p.get("targets"), f"panel {p['title']!r} has no query"


def test_dashboard_has_the_panels_issue_5_asks_for():
    titles = " | ".join(p["title"].lower() for p in all_panels(dashboard()["panels"]))
    for words in ["request rate", "latency by scheduler", "queue wait", "queue depth",
                  "rows per forward pass", "images generated per second", "errors by status",
                  "rows in flight"]:
        assert words in titles, f"no panel about {words!r} in: {titles}"
    latency = next(p for p in all_panels(dashboard()["panels"]) if "latency by scheduler" in p["title"].lower())
    exprs = " ".join(t["expr"] for t in latency["targets"])
    for q in ("0.5", "0.95", "0.99"):
        assert f"histogram_quantile({q}," in exprs
    assert "scheduler" in exprs


def test_dashboard_panels_do_not_overlap():
    panels = [p for p in dashboard()["panels"]]  # top level: the grid Grafana lays out
    cells = {}
    for p in panels:
        g = p["gridPos"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{p['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = p["title"]


def test_dashboard_shows_the_jobs():
    panels = all_panels(dashboard()["panels"])
    titles = " | ".join(p["title"].lower() for p in panels)
    for words in ["jobs by status", "oldest queued job", "claimed", "reclaimed", "webhook deliveries by outcome"]:
        assert words in titles, f"no panel about {words!r} in: {titles}"
    exprs = " ".join(t["expr"] for p in panels for t in p.get("targets", []))
    for metric in JOB_SERIES:
        assert re.search(rf"\b{metric}\b", exprs), f"no panel reads {metric}"
    by_status = next(p for p in panels if p["title"].lower() == "jobs by status")
    assert [t["expr"] for t in by_status["targets"]] == ["max by (status) (diffusion_jobs)"]
    webhooks = next(p for p in panels if "webhook deliveries" in p["title"].lower())
    assert any("sum by (outcome)" in t["expr"] for t in webhooks["targets"])


def test_dashboard_queries_use_only_the_service_metrics_and_sum_over_replicas():
    for p in all_panels(dashboard()["panels"]):
        for t in p.get("targets", []):
            expr = t["expr"]
            assert expr.count("(") == expr.count(")"), expr
            words = set(re.findall(r"\b([a-z_][a-z0-9_]*)\s*(?=[{\[(]|$|\s*\))", expr))
            metrics = {w for w in words if w.startswith("diffusion_") or w == "up"}
            assert metrics, f"no metric in {expr!r}"
            assert metrics <= SERIES, f"unknown series {metrics - SERIES} in {expr!r}"
            # One line per fleet, not per replica: every query aggregates (or is the per-instance view);
            # the job store's gauges, the same on every replica, by max.
            if metrics & JOB_STORE_GAUGES:
                assert metrics <= JOB_STORE_GAUGES and expr.startswith("max"), expr
            else:
                assert expr.startswith(("sum", "histogram_quantile(")), expr
            if "histogram_quantile(" in expr:
                assert re.search(r"sum by \((le|le, \w+)\)", expr), f"quantile not summed over replicas: {expr}"


def test_dashboard_datasource_is_the_provisioned_one():
    (source,) = load_yaml(DATASOURCES)["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    d = dashboard()
    refs = [p["datasource"] for p in all_panels(d["panels"]) if "datasource" in p]
    refs += [t["datasource"] for p in all_panels(d["panels"]) for t in p.get("targets", []) if "datasource" in t]
    refs += [v["datasource"] for v in d["templating"]["list"] if "datasource" in v]
    assert refs and all(r == {"type": "prometheus", "uid": source["uid"]} for r in refs), refs


def test_grafana_mounts_match_the_provisioning_paths():
    grafana = load_yaml(REPO / "compose.yaml")["services"]["grafana"]
    mounts = dict(reversed(v.removesuffix(":ro").split(":", 1)) for v in grafana["volumes"] if v.startswith("./"))
    (provider,) = load_yaml(DASHBOARD_PROVIDERS)["providers"]
    assert provider["type"] == "file"
    dash_dir = provider["options"]["path"]
    assert (REPO / mounts[dash_dir] / DASHBOARD.name).is_file(), (mounts, dash_dir)
    assert (REPO / mounts["/etc/grafana/provisioning"] / "datasources" / DATASOURCES.name).is_file()
    env = grafana["environment"]
    assert env["GF_AUTH_ANONYMOUS_ENABLED"] == "true" and env["GF_AUTH_ANONYMOUS_ORG_ROLE"] == "Viewer"
    assert env["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"] == f"{dash_dir}/{DASHBOARD.name}"
    assert "127.0.0.1:3000:3000" in grafana["ports"]


# --- compose ----------------------------------------------------------------------------------

def test_compose_service_reserves_a_gpu_and_cpu_override_removes_it():
    base = load_yaml(REPO / "compose.yaml")["services"]
    (device,) = base["service"]["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "replica" in base["service"]["networks"]["default"]["aliases"]
    assert base["train"]["profiles"] == ["train"]
    cpu = load_yaml(REPO / "compose.cpu.yaml")["services"]
    assert cpu["service"]["environment"]["DIFFUSION_DEVICE"] == "cpu"
    assert cpu["service"]["deploy"]["resources"]["reservations"]["devices"] is None  # !reset


def test_scale_out_pins_one_gpu_per_replica():
    services = load_yaml(REPO / "compose.scale.yaml")["services"]
    replicas = {name: s for name, s in services.items() if name.startswith("replica-")}
    assert len(replicas) >= 2
    gpus = [s["deploy"]["resources"]["reservations"]["devices"][0]["device_ids"] for s in replicas.values()]
    assert len({tuple(g) for g in gpus}) == len(gpus), f"two replicas share a GPU: {gpus}"
    assert services["lb"]["volumes"] == ["./docker/nginx.conf:/etc/nginx/nginx.conf:ro"]


def test_single_node_keeps_jobs_in_a_volume():
    """compose.yaml: jobs in SQLite under DIFFUSION_DATA_DIR, a named volume, so a restart keeps them."""
    compose = load_yaml(REPO / "compose.yaml")
    service = compose["services"]["service"]
    data_dir = service["environment"]["DIFFUSION_DATA_DIR"]
    assert "DIFFUSION_JOBS_URL" not in service["environment"]  # SQLite
    (volume,) = [v.split(":")[0] for v in service["volumes"] if v.split(":")[1] == data_dir]
    assert volume in compose["volumes"], "a named volume (a bind mount would be root's on a fresh host)"
    # The image makes the directory and gives it to its user, so Docker copies that ownership into a
    # new named volume and the service (not root) can write there.
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert re.search(rf"mkdir -p [^\n]*{re.escape(data_dir)}\b", dockerfile)
    assert re.search(rf"chown app:app [^\n]*{re.escape(data_dir)}\b", dockerfile)


def test_scale_out_shares_one_redis_that_keeps_its_data():
    scale = load_yaml(REPO / "compose.scale.yaml")
    services = scale["services"]
    redis = services["redis"]
    assert re.fullmatch(r"redis:(\d+)(\.\d+)*", redis["image"]) and int(redis["image"][6:].split(".")[0]) >= 7
    command = redis["command"]
    assert command[0] == "redis-server"
    flags = dict(zip(command[1::2], command[2::2]))
    assert flags["--appendonly"] == "yes" and flags["--maxmemory-policy"] == "noeviction"
    (volume,) = [v.split(":")[0] for v in redis["volumes"] if v.split(":")[1] == flags["--dir"]]
    assert volume in scale["volumes"]
    assert "ports" not in redis, "Redis stays on the compose network"
    assert "redis-cli ping" in " ".join(redis["healthcheck"]["test"])
    replicas = {name: s for name, s in services.items() if name.startswith("replica-")}
    assert replicas
    for name, s in replicas.items():
        url = s["environment"]["DIFFUSION_JOBS_URL"]
        assert url == "redis://redis:6379/0", (name, url)
        assert s["depends_on"]["redis"]["condition"] == "service_healthy", name
    # nginx stays in front; the job routes are never sent twice once a replica has the request.
    assert "replica-gpu0" in services["lb"]["depends_on"]
    nginx = (DOCKER / "nginx.conf").read_text()
    jobs = re.search(r"location /jobs \{(.*?)\n        \}", nginx, re.S)
    assert jobs, "no location for /jobs in docker/nginx.conf"
    assert "non_idempotent" not in jobs.group(1) and "proxy_buffering off" in jobs.group(1)


def test_prometheus_discovers_every_replica_by_dns():
    config = load_yaml(DOCKER / "prometheus.yml")
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "diffusion")
    (sd,) = job["dns_sd_configs"]
    assert sd["names"] == ["replica"] and sd["type"] == "A" and sd["port"] == 8000
    assert "replica" in (DOCKER / "nginx.conf").read_text()


@pytest.mark.parametrize("files", STACKS, ids=["+".join(f) for f in STACKS])
def test_docker_compose_config(files):
    if shutil.which("docker") is None or subprocess.run(["docker", "compose", "version"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("docker compose v2 CLI not installed")
    args = [a for f in files for a in ("-f", f)]
    r = subprocess.run(["docker", "compose", *args, "config", "--quiet"], cwd=REPO, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_every_compose_file_is_in_a_checked_stack():
    assert {f.name for f in COMPOSE_FILES} == {f for stack in STACKS for f in stack}


# --- tools ------------------------------------------------------------------------------------

def test_promtool_check_config():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool on PATH (apt-get install prometheus)")
    r = subprocess.run([promtool, "check", "config", str(DOCKER / "prometheus.yml")], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout + r.stderr


def test_nginx_config(tmp_path):
    nginx = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if Path(p).exists()), None)
    if nginx is None:
        pytest.skip("no nginx binary (apt-get install nginx-light)")
    r = subprocess.run([nginx, "-t", "-e", "stderr", "-p", f"{tmp_path}/", "-c", str(DOCKER / "nginx.conf")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
