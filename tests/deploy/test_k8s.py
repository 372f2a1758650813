"""deploy/k8s renders, validates, and agrees with the code and the images it deploys.

- Every kustomization (overlays and the training jobs) renders with ``kubectl kustomize`` and each
  object validates against the Kubernetes API schemas of a current release (kubernetes-validate,
  strict: unknown fields fail); the custom resources against the fields of their CRDs
  (tests/deploy/crd_schemas.py). Skips without kubectl or kubernetes-validate.
- The manifests are tied to the code: every metric the HPA, the Prometheus Adapter's rules, KEDA
  and the dashboard read is in the real app's /metrics; probe paths are the app's routes and the
  probe port is the one it listens on; every setting is in the ConfigMap and the ConfigMap is
  valid for ``Settings``; the grace period covers the drain; the image, its user and paths are
  docker/Dockerfile's.
- Jobs (components/jobs): every serving overlay points the pods at one Redis that keeps its data
  (append-only file on a volume, no eviction, one writer), and KEDA scales on the service's own
  job stream, counted the way the service keeps it.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
from urllib.parse import urlsplit

import pytest

from tests.deploy.crd_schemas import ADAPTER_RULE, CUSTOM_RESOURCES, TRIGGER_METADATA
from tests.deploy.helpers import REPO, make_checkpoint

yaml = pytest.importorskip("yaml", reason="PyYAML reads the manifests")

K8S = REPO / "deploy" / "k8s"
KUSTOMIZATIONS = ["overlays/gpu", "overlays/cpu", "overlays/keda", "training"]
SERVING = ["overlays/gpu", "overlays/cpu", "overlays/keda"]
# The API versions validated against: the oldest the manifests claim to support, and the newest known.
KUBERNETES_VERSIONS = ("1.30", "latest")
KUBECTL = shutil.which("kubectl")
DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
ADAPTER_VALUES = K8S / "prometheus-adapter" / "values.yaml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "diffusion.json"
REDIS_STORE = REPO / "service" / "jobs" / "redis_store.py"
# The job queues the service uses in Redis (issue "jobs that survive"): a stream per lane (long, short),
# one consumer group.
JOB_STREAMS, JOB_GROUP = ("diffusion:jobs:queue", "diffusion:jobs:queue:short"), "replicas"
# Settings that come from Secrets, not from the ConfigMap.
SECRET_SETTINGS = {"DIFFUSION_API_KEYS": ("diffusion-api-keys", False),
                   "DIFFUSION_ADMIN_KEY": ("diffusion-admin-key", True),
                   "DIFFUSION_WEBHOOK_SECRET": ("diffusion-webhook-secret", True)}
needs_kubectl = pytest.mark.skipif(KUBECTL is None, reason="kubectl not on PATH (it renders the kustomizations)")


@functools.cache
def render(path: str) -> tuple[dict, ...]:
    r = subprocess.run([KUBECTL, "kustomize", str(K8S / path)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return tuple(d for d in yaml.safe_load_all(r.stdout) if d)


def one(docs, kind: str, name: str | None = None) -> dict:
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
    return found[0]


def settings_of(docs) -> dict[str, str]:
    return one(docs, "ConfigMap", next(d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap"
                                       and d["metadata"]["name"].startswith("diffusion-settings")))["data"]


def service_container(docs) -> dict:
    pod = one(docs, "Deployment", "diffusion-serve")["spec"]["template"]["spec"]
    (container,) = [c for c in pod["containers"] if c["name"] == "service"]
    return container


def dockerfile_value(pattern: str) -> str:
    m = re.search(pattern, DOCKERFILE, re.M)
    assert m, pattern
    return m.group(1)


# --- rendering and schemas --------------------------------------------------------------------

def test_every_kustomization_is_tested():
    """Each directory with a kustomization.yaml that is not a base or a component is in the list."""
    found = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")}
    components = {str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml")
                  if "kind: Component" in p.read_text()}
    assert found - components - {"base"} == set(KUSTOMIZATIONS)


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_renders_and_validates_against_the_kubernetes_schemas(path):
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    import jsonschema

    docs = render(path)
    assert docs
    for version in KUBERNETES_VERSIONS:
        version = kv.latest_version() if version == "latest" else version
        for doc in docs:
            where = f"{path}: {doc['kind']}/{doc['metadata']['name']} (Kubernetes {version})"
            key = (doc["apiVersion"], doc["kind"])
            if key in CUSTOM_RESOURCES:
                jsonschema.validate(doc, CUSTOM_RESOURCES[key])
                for trigger in doc["spec"].get("triggers", []):
                    assert trigger["type"] in TRIGGER_METADATA, f"{where}: add the {trigger['type']} scaler's keys"
                    jsonschema.validate(trigger["metadata"], TRIGGER_METADATA[trigger["type"]])
                continue
            try:
                kv.validate(doc, version, strict=True)
            except kv.ValidationError as e:
                pytest.fail(f"{where}: {e}")
            except kv.SchemaNotFoundError:
                pytest.fail(f"{where}: not a built-in kind; add its CRD's fields to tests/deploy/crd_schemas.py")


@needs_kubectl
def test_keda_behaviour_is_a_valid_hpa_behaviour_and_the_same_as_the_hpas():
    kv = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    hpa = one(render("overlays/gpu"), "HorizontalPodAutoscaler")
    scaled = one(render("overlays/keda"), "ScaledObject")
    assert not [d for d in render("overlays/keda") if d["kind"] == "HorizontalPodAutoscaler"], "KEDA owns the HPA"
    behavior = scaled["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    kv.validate({**hpa, "spec": {**hpa["spec"], "behavior": behavior}}, kv.latest_version(), strict=True)
    assert behavior == hpa["spec"]["behavior"]
    assert (scaled["spec"]["minReplicaCount"], scaled["spec"]["maxReplicaCount"]) == \
        (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"])
    assert scaled["spec"]["scaleTargetRef"]["name"] == hpa["spec"]["scaleTargetRef"]["name"] == "diffusion-serve"
    # The same signals at the same per-replica targets.
    hpa_targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]}
    keda_targets = {}
    for trigger in scaled["spec"]["triggers"]:
        assert trigger["metricType"] == "AverageValue"
        if trigger["type"] != "prometheus":
            continue  # the job stream's trigger: test_keda_scales_on_the_job_stream
        (metric,) = re.findall(r"\b(diffusion_\w+)\{", trigger["metadata"]["query"])
        keda_targets[metric] = float(trigger["metadata"]["threshold"])
    assert keda_targets == hpa_targets


def test_prometheus_adapter_rules_are_well_formed():
    jsonschema = pytest.importorskip("jsonschema", reason="pip install kubernetes-validate (brings jsonschema)")

    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    assert values["rules"]["default"] is False
    for rule in values["rules"]["custom"]:
        jsonschema.validate(rule, ADAPTER_RULE)
        assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
        for placeholder in ("<<.Series>>", "<<.LabelMatchers>>", "<<.GroupBy>>"):
            assert placeholder in rule["metricsQuery"], (placeholder, rule["metricsQuery"])
        series = re.match(r"(\w+)\{", rule["seriesQuery"]).group(1)
        assert re.fullmatch(rule["name"]["matches"], series), rule["name"]


def test_prometheus_scrape_job_passes_promtool(tmp_path):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("no promtool on PATH (apt-get install prometheus)")
    jobs = yaml.safe_load((K8S / "prometheus" / "scrape.yaml").read_text())
    assert [j["job_name"] for j in jobs] == ["diffusion"]  # the dashboard counts up{job="diffusion"}
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({"scrape_configs": jobs}))
    r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    if "field kubernetes_sd_configs not found" in r.stdout + r.stderr:
        # Debian builds Prometheus without Kubernetes discovery: check the rest (the relabelling).
        for job in jobs:
            job["static_configs"] = [{"targets": ["127.0.0.1:8000"]}]
            del job["kubernetes_sd_configs"]
        config.write_text(yaml.safe_dump({"scrape_configs": jobs}))
        r = subprocess.run([promtool, "check", "config", str(config)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


# --- the manifests and the code -----------------------------------------------------------------

@pytest.fixture(scope="module")
def app_facts(tmp_path_factory):
    """The real app, started with its lifespan on a tiny model: its /metrics and its routes."""
    from fastapi.testclient import TestClient

    from service.api import create_app
    from service.settings import Settings

    checkpoints = tmp_path_factory.mktemp("checkpoints")
    model = make_checkpoint(checkpoints)
    app = create_app(Settings(checkpoint_dir=checkpoints, device="cpu"))
    with TestClient(app) as client:
        assert client.post("/generate", json={"model": model, "class_label": 1, "steps": 2}).status_code == 200
        text = client.get("/metrics").text
        probes = {path: client.get(path).status_code for path in ("/healthz", "/readyz")}
    from prometheus_client.parser import text_string_to_metric_families

    samples = {s.name for family in text_string_to_metric_families(text) for s in family.samples}
    routes = set(app.openapi()["paths"])
    return {"samples": samples, "routes": routes, "probes": probes}


def metric_names(expr: str) -> set[str]:
    """The service's series an expression reads, and ``up`` (Prometheus's own, one per scraped target)."""
    return set(re.findall(r"\b(diffusion_\w+|up(?=\{))", expr))


@needs_kubectl
def test_every_metric_the_autoscalers_and_the_dashboard_read_is_served(app_facts):
    served = app_facts["samples"] | {"up"}
    adapter = yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]
    exposed = {rule["name"]["as"]: metric_names(rule["seriesQuery"]) | metric_names(rule["metricsQuery"])
               for rule in adapter}
    read = {}
    for path in SERVING:
        docs = render(path)
        for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
            for m in hpa["spec"]["metrics"]:
                name = m["pods"]["metric"]["name"]
                assert name in exposed, f"the HPA reads {name}, which no adapter rule exposes"
                read[f"{path} HPA {name}"] = exposed[name]
        for so in (d for d in docs if d["kind"] == "ScaledObject"):
            for t in so["spec"]["triggers"]:
                if t["type"] == "prometheus":
                    read[f"{path} KEDA {t['name']}"] = metric_names(t["metadata"]["query"])
    dashboard = json.loads(DASHBOARD.read_text())

    def walk(panels):
        for p in panels:
            for t in p.get("targets", []):
                read[f"dashboard {p['title']!r} {t['refId']}"] = metric_names(t["expr"])
            walk(p.get("panels", []))

    walk(dashboard["panels"])
    assert all(read.values()), {k: v for k, v in read.items() if not v}
    missing = {k: v - served for k, v in read.items() if v - served}
    assert not missing, f"read but not in /metrics: {missing}"


@needs_kubectl
@pytest.mark.parametrize("path", SERVING)
def test_probes_are_the_services_routes_on_its_port(path, app_facts):
    docs = render(path)
    container = service_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    config = settings_of(docs)
    assert ports == {"http": int(config["DIFFUSION_PORT"])}
    assert int(config["DIFFUSION_PORT"]) == int(dockerfile_value(r"^EXPOSE (\d+)"))
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"
    assert probes["livenessProbe"]["path"] == probes["startupProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in app_facts["routes"] and probe["port"] in ports
    assert app_facts["probes"] == {"/healthz": 200, "/readyz": 200}
    service = one(docs, "Service", "diffusion-serve")
    assert service["spec"]["ports"][0]["targetPort"] in ports
    annotations = one(docs, "Deployment", "diffusion-serve")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == ports["http"] and annotations["prometheus.io/path"] == "/metrics"
    assert "/metrics" in app_facts["routes"]
    monitor = one(docs, "ServiceMonitor")
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in ports and endpoint["path"] == "/metrics"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    # The job label the dashboard's "Replicas up" counts: the Service's value of the jobLabel label.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "diffusion"


@needs_kubectl
@pytest.mark.parametrize("path", SERVING)
def test_configmap_holds_every_setting_and_is_valid(path):
    from service.settings import Settings

    docs = render(path)
    config = settings_of(docs)
    fields = {"DIFFUSION_" + name.upper() for name in Settings.model_fields}
    assert set(config) == fields - set(SECRET_SETTINGS), \
        f"not in the ConfigMap: {fields - set(SECRET_SETTINGS) - set(config)}; not settings: {set(config) - fields}"
    assert set(SECRET_SETTINGS) <= fields
    container = service_container(docs)
    for name, (secret, optional) in SECRET_SETTINGS.items():
        (env,) = [e for e in container["env"] if e["name"] == name]
        ref = env["valueFrom"]["secretKeyRef"]
        assert (ref["name"], ref["key"], ref.get("optional", False)) == (secret, name, optional), ref
    assert {e["configMapRef"]["name"] for e in container["envFrom"]} == {
        d["metadata"]["name"] for d in docs if d["kind"] == "ConfigMap" and "DIFFUSION_PORT" in d.get("data", {})}
    settings = Settings(**{k.removeprefix("DIFFUSION_").lower(): v for k, v in config.items()})
    device = {"overlays/gpu": "cuda", "overlays/keda": "cuda", "overlays/cpu": "cpu"}[path]
    assert settings.device == device and settings.default_model is None
    # The autoscaling targets are reachable: below the rows a pod runs and the queue it holds.
    for hpa in (d for d in docs if d["kind"] == "HorizontalPodAutoscaler"):
        targets = {m["pods"]["metric"]["name"]: float(m["pods"]["target"]["averageValue"]) for m in hpa["spec"]["metrics"]}
        assert 0 < targets["diffusion_rows_in_flight"] < settings.max_batch_rows
        assert 0 < targets["diffusion_queue_depth"] < settings.max_queue


@needs_kubectl
@pytest.mark.parametrize("path", SERVING)
def test_grace_period_covers_the_drain_and_scale_down_outlasts_startup(path):
    docs = render(path)
    pod = one(docs, "Deployment", "diffusion-serve")["spec"]["template"]["spec"]
    container = service_container(docs)
    command = container["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep"
    pre_stop = float(command[1])
    grace = float(settings_of(docs)["DIFFUSION_SHUTDOWN_GRACE_S"])
    # preStop, then uvicorn waits up to grace for open requests, then the engine drains up to grace.
    assert pod["terminationGracePeriodSeconds"] > pre_stop + 2 * grace
    assert pre_stop >= 2 * container["readinessProbe"]["periodSeconds"]  # endpoints drop the pod first
    startup = container["startupProbe"]["periodSeconds"] * container["startupProbe"]["failureThreshold"]
    for behaviour in [d["spec"]["behavior"] for d in docs if d["kind"] == "HorizontalPodAutoscaler"] + \
                     [d["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
                      for d in docs if d["kind"] == "ScaledObject"]:
        assert behaviour["scaleDown"]["stabilizationWindowSeconds"] >= startup
        assert behaviour["scaleUp"]["stabilizationWindowSeconds"] > 0
    assert "replicas" not in one(docs, "Deployment", "diffusion-serve")["spec"], "the autoscaler owns the replica count"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs).items()


def pod_labels(docs) -> dict:
    return one(docs, "Deployment", "diffusion-serve")["spec"]["template"]["metadata"]["labels"]


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_pods_run_the_images_as_built_and_hardened(path):
    docs = render(path)
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    images = {compose["service"]["image"].split(":")[0], compose["train"]["image"].split(":")[0]}
    uid = int(dockerfile_value(r"^ARG APP_UID=(\d+)"))
    workloads = {d["metadata"]["name"]: d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")}
    assert workloads
    redis = workloads.pop("diffusion-redis", None)
    assert (redis is not None) == (path in SERVING), "every serving overlay has the jobs' Redis"
    if redis is not None:  # Redis's own image and user (uid 999, "redis"), hardened the same way
        security = redis["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == security["fsGroup"] == 999
        assert redis["automountServiceAccountToken"] is False
        for c in redis["containers"]:
            assert c["image"] == redis_image()
            s = c["securityContext"]
            assert s["readOnlyRootFilesystem"] is True and s["allowPrivilegeEscalation"] is False
            assert s["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
    for pod in workloads.values():
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid and security["fsGroup"] == uid
        assert pod["automountServiceAccountToken"] is False
        volumes = {v["name"]: v for v in pod["volumes"]}
        for c in pod.get("initContainers", []) + pod["containers"]:
            assert c["image"].split(":")[0] in images, c["image"]
            s = c["securityContext"]
            assert s["readOnlyRootFilesystem"] is True and s["allowPrivilegeEscalation"] is False
            assert s["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["requests"] and c["resources"]["limits"]
            for mount in c["volumeMounts"]:
                assert mount["name"] in volumes
            if c["name"] in ("service", "train"):  # a writable HOME and /tmp on the read-only root
                assert {"name": "HOME", "value": "/tmp"} in c["env"]
                (tmp,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/tmp"]
                assert "emptyDir" in volumes[tmp["name"]]
    if path in SERVING:
        container = service_container(docs)
        assert container["image"].split(":")[0] == compose["service"]["image"].split(":")[0]
        (models,) = [m for m in container["volumeMounts"] if m.get("subPath") == "models"]
        assert models["readOnly"] is True
        assert models["mountPath"] == settings_of(docs)["DIFFUSION_CHECKPOINT_DIR"] \
            == dockerfile_value(r"DIFFUSION_CHECKPOINT_DIR=(\S+)")
        gpus = container["resources"]["limits"].get("nvidia.com/gpu")
        assert gpus == (None if path == "overlays/cpu" else 1)


# --- jobs: one Redis, and KEDA on its stream -------------------------------------------------------

def redis_image() -> str:
    """The image compose.scale.yaml runs Redis from; the cluster runs the same one."""
    m = re.search(r"^  redis:\n(?:    .*\n|\s*\n)*?    image: (\S+)$", (REPO / "compose.scale.yaml").read_text(), re.M)
    assert m, "no redis service with an image in compose.scale.yaml"
    return m.group(1)


def quantity_bytes(value: str) -> int:
    """A Kubernetes memory quantity (2Gi, 512Mi, 1G) or a Redis size (1536mb, 2gb: both 1024-based), in bytes."""
    m = re.fullmatch(r"(\d+)([KMGT]i?|[kmgt]b)?", value)
    assert m, value
    number, unit = int(m.group(1)), m.group(2) or ""
    power = {"k": 1, "m": 2, "g": 3, "t": 4}[unit[0].lower()] if unit else 0
    base = 1000 if unit in ("K", "M", "G", "T") else 1024
    return number * base ** power


def redis_flags(args: list[str]) -> dict[str, str]:
    assert args[0] == "redis-server" and len(args) % 2 == 1, args
    return dict(zip(args[1::2], args[2::2]))


@needs_kubectl
@pytest.mark.parametrize("path", SERVING)
def test_jobs_live_in_one_redis_that_keeps_them(path):
    docs = render(path)
    config = settings_of(docs)
    url = urlsplit(config["DIFFUSION_JOBS_URL"])
    assert url.scheme == "redis" and url.port and re.fullmatch(r"/\d+", url.path), url
    # The URL names the Redis Service, which reaches the Redis pod on its port.
    service, redis = one(docs, "Service", url.hostname), one(docs, "Deployment", url.hostname)
    pod = redis["spec"]["template"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    assert not service["spec"]["selector"].items() <= pod_labels(docs).items(), "the Service must not pick serving pods"
    (port,) = service["spec"]["ports"]
    (container,) = pod["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert port["port"] == url.port and ports[port["targetPort"]] == 6379
    # Redis 7+ (KEDA's lag and XAUTOCLAIM's deleted-entry handling need it), the image compose runs.
    assert container["image"] == redis_image() and int(re.match(r"redis:(\d+)", container["image"]).group(1)) >= 7
    # Nothing lost: every write in an append-only file on a persistent volume, replayed at start; no eviction.
    flags = redis_flags(container.get("command", []) + container["args"])
    assert flags["--appendonly"] == "yes" and flags["--appendfsync"] in ("always", "everysec")
    assert flags["--maxmemory-policy"] == "noeviction"
    (data,) = [m for m in container["volumeMounts"] if m["mountPath"] == flags["--dir"]]
    assert not data.get("readOnly")
    volume = {v["name"]: v for v in pod["spec"]["volumes"]}[data["name"]]
    claim = one(docs, "PersistentVolumeClaim", volume["persistentVolumeClaim"]["claimName"])
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    # Redis refuses writes at maxmemory before the kernel kills it at the limit (room for the rewrite's fork).
    assert quantity_bytes(flags["--maxmemory"]) <= 0.8 * quantity_bytes(container["resources"]["limits"]["memory"])
    # One writer of those files: one pod, the old one gone before the new one starts; no autoscaler on it.
    assert redis["spec"]["replicas"] == 1 and redis["spec"]["strategy"] == {"type": "Recreate"}
    for scaler in (d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "ScaledObject")):
        assert scaler["spec"]["scaleTargetRef"]["name"] == "diffusion-serve"
    # Ready once it answers PONG (not while replaying the file); alive while it listens.
    assert "PONG" in " ".join(container["readinessProbe"]["exec"]["command"])
    assert container["livenessProbe"]["tcpSocket"]["port"] in ports
    # The serving pods get the URL from the ConfigMap they load, not overridden in the Deployment.
    assert "DIFFUSION_JOBS_URL" not in {e["name"] for e in service_container(docs)["env"]}
    # DIFFUSION_DATA_DIR is a writable volume (the root file system is read-only).
    mounts = [m for m in service_container(docs)["volumeMounts"] if m["mountPath"] == config["DIFFUSION_DATA_DIR"]]
    assert len(mounts) == 1 and not mounts[0].get("readOnly"), mounts


@needs_kubectl
def test_keda_scales_on_the_job_stream():
    docs = render("overlays/keda")
    config = settings_of(docs)
    triggers = [t for t in one(docs, "ScaledObject")["spec"]["triggers"] if t["type"] == "redis-streams"]
    assert sorted(t["metadata"]["stream"] for t in triggers) == sorted(JOB_STREAMS)
    for trigger in triggers:
        check_stream_trigger(docs, config, trigger)


def check_stream_trigger(docs, config, trigger):
    meta = trigger["metadata"]
    assert trigger["metricType"] == "AverageValue"
    # XLEN: the jobs not yet delivered plus those pending (see the next test). KEDA reads XLEN only
    # without a consumer group; with one it would read XPENDING (running only) or the lag (waiting only).
    assert not {"consumerGroup", "pendingEntriesCount", "lagCount"} & set(meta), meta
    assert 0 < int(meta["streamLength"]) <= int(config["DIFFUSION_MAX_BATCH_ROWS"])
    # KEDA's operator, in a namespace of its own, reaches the Redis the pods use: the same Service by its
    # cluster name, the same port and database.
    url = urlsplit(config["DIFFUSION_JOBS_URL"])
    service = one(docs, "Service", url.hostname)
    host, port = meta["address"].rsplit(":", 1)
    namespace = service["metadata"]["namespace"]
    assert host in (f"{url.hostname}.{namespace}.svc", f"{url.hostname}.{namespace}.svc.cluster.local"), host
    assert int(port) == url.port == service["spec"]["ports"][0]["port"]
    assert int(meta.get("databaseIndex", "0")) == int(url.path.strip("/"))
    for value in meta.values():
        assert isinstance(value, str)


def test_the_job_stream_is_the_services_and_holds_only_work_not_done():
    """KEDA's streamLength trigger counts XLEN; that is "not yet delivered + pending" only because the service
    deletes (XDEL) every entry it acknowledges (XACK). If that changes, change the trigger (overlays/keda)."""
    if not REDIS_STORE.exists():
        pytest.skip("service/jobs/redis_store.py not written yet")
    source = REDIS_STORE.read_text()
    assert re.search(r'^PREFIX = "diffusion:jobs:"$', source, re.M)
    assert 'STREAMS = {"long": PREFIX + "queue", "short": PREFIX + "queue:short"}' in source
    assert JOB_STREAMS == ("diffusion:jobs:" + "queue", "diffusion:jobs:" + "queue:short")
    assert re.search(rf'^GROUP = "{JOB_GROUP}"$', source, re.M)
    lines = source.splitlines()
    acks = [i for i, line in enumerate(lines) if "'XACK'" in line or '"XACK"' in line]
    assert acks
    for i in acks:  # a Lua script: redis.call('XACK', stream, group, entry) then redis.call('XDEL', stream, entry)
        entry = re.search(r"XACK'?\"?,\s*([^,]+),\s*[^,]+,\s*([^)]+)\)", lines[i])
        assert entry, lines[i]
        stream, which = entry.group(1).strip(), entry.group(2).strip()
        assert re.search(rf"XDEL'?\"?,\s*{re.escape(stream)},\s*{re.escape(which)}\)", lines[i + 1]), \
            f"line {i + 1}: acknowledged but not deleted: {lines[i].strip()!r}"
    for i, line in enumerate(lines):  # the client's own XACK: only for an entry already deleted
        if ".xack(" in line:
            assert "not fields" in " ".join(lines[max(0, i - 2):i]), f"line {i + 1}: {line.strip()!r}"


@needs_kubectl
def test_dashboard_configmap_is_the_compose_dashboard():
    for path in ("overlays/gpu", "overlays/cpu"):
        cm = one(render(path), "ConfigMap", "diffusion-dashboard")
        assert cm["metadata"]["labels"] == {"grafana_dashboard": "1"}
        assert cm["data"] == {"diffusion.json": DASHBOARD.read_text()}


@needs_kubectl
def test_training_writes_where_the_service_reads():
    serving, training = render("overlays/gpu"), render("training")
    claim = one(serving, "PersistentVolumeClaim", "diffusion-shared")["metadata"]["name"]
    assert "ReadWriteMany" in one(serving, "PersistentVolumeClaim", claim)["spec"]["accessModes"]
    script = one(training, "ConfigMap")["data"]["train.sh"]
    assert script == (K8S / "training" / "train.sh").read_text()
    r = subprocess.run(["sh", "-n"], input=script, text=True, capture_output=True)
    assert r.returncode == 0, r.stderr
    # the script publishes into <volume>/models, the subPath the service mounts as its checkpoints
    (models,) = [m for m in service_container(serving)["volumeMounts"] if m.get("subPath")]
    jobs = [d for d in training if d["kind"] == "Job"]
    assert len(jobs) == 2
    for job in jobs:
        pod = job["spec"]["template"]["spec"]
        (shared,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
        assert shared["persistentVolumeClaim"]["claimName"] == claim
        (c,) = pod["containers"]
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == shared["name"]]
        assert f'"{mount["mountPath"]}/{models["subPath"]}/$RUN_NAME.safetensors"' in script
        env = {e["name"]: e["value"] for e in c["env"]}
        assert {"RUN_NAME", "TRAIN_ARGS", "GPUS"} <= set(env)
        assert int(c["resources"]["limits"]["nvidia.com/gpu"]) == int(env["GPUS"])
        assert not {"--out", "--name"} & set(env["TRAIN_ARGS"].split())
    # Multi-node: an Indexed Job, one pod per node, rank 0 reached through a headless Service.
    ddp = one(training, "Job", "diffusion-train-ddp")
    spec, pod = ddp["spec"], ddp["spec"]["template"]["spec"]
    env = {e["name"]: e["value"] for e in pod["containers"][0]["env"]}
    assert spec["completionMode"] == "Indexed" and spec["completions"] == spec["parallelism"] == int(env["NNODES"]) > 1
    service = one(training, "Service", pod["subdomain"])
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"].items() <= ddp["spec"]["template"]["metadata"]["labels"].items()
    assert env["MASTER_ADDR"] == f"{ddp['metadata']['name']}-0.{service['metadata']['name']}"
    assert "--master_port 29500" in script and service["spec"]["ports"][0]["port"] == 29500
