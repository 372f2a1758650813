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
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess

import pytest

from tests.deploy.crd_schemas import ADAPTER_RULE, CUSTOM_RESOURCES
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
    annotations = one(docs, "Deployment")["spec"]["template"]["metadata"]["annotations"]
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
    assert set(config) == fields - {"DIFFUSION_API_KEYS", "DIFFUSION_ADMIN_KEY"}
    container = service_container(docs)
    (keys,) = [e for e in container["env"] if e["name"] == "DIFFUSION_API_KEYS"]
    assert keys["valueFrom"]["secretKeyRef"]["name"] == "diffusion-api-keys"
    (admin,) = [e for e in container["env"] if e["name"] == "DIFFUSION_ADMIN_KEY"]
    assert admin["valueFrom"]["secretKeyRef"] == {"name": "diffusion-admin-key", "key": "DIFFUSION_ADMIN_KEY",
                                                  "optional": True}
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
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
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
    assert "replicas" not in one(docs, "Deployment")["spec"], "the autoscaler owns the replica count"
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs).items()


def pod_labels(docs) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


@needs_kubectl
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_pods_run_the_images_as_built_and_hardened(path):
    docs = render(path)
    compose = yaml.safe_load((REPO / "compose.yaml").read_text())["services"]
    images = {compose["service"]["image"].split(":")[0], compose["train"]["image"].split(":")[0]}
    uid = int(dockerfile_value(r"^ARG APP_UID=(\d+)"))
    pods = [d["spec"]["template"]["spec"] for d in docs if d["kind"] in ("Deployment", "Job")]
    assert pods
    for pod in pods:
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


@needs_kubectl
def test_dashboard_configmap_is_the_compose_dashboard():
    for path in ("overlays/gpu", "overlays/cpu"):
        cm = one(render(path), "ConfigMap", "diffusion-dashboard")
        assert cm["metadata"]["labels"] == {"grafana_dashboard": "1"}
        assert cm["data"] == {"diffusion.json": DASHBOARD.read_text()}


@needs_kubectl
def test_training_writes_where_the_service_reads():
    serving, training = render("overlays/gpu"), render("training")
    claim = one(serving, "PersistentVolumeClaim")["metadata"]["name"]
    assert "ReadWriteMany" in one(serving, "PersistentVolumeClaim")["spec"]["accessModes"]
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
