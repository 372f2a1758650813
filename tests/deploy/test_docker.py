"""The image build keeps build-time trust out of the images, uses the wheelhouse alone, and caches.

Static checks of docker/Dockerfile and docker/smoke.sh run everywhere. With a Docker engine and
the images docker/smoke.sh builds (``diffusion-serve:smoke``, ``diffusion-train:smoke``), the
images themselves are inspected: no build-time CA in their history or file system, the user the
Kubernetes manifests run as.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.deploy.helpers import REPO

DOCKERFILE = (REPO / "docker" / "Dockerfile").read_text()
SMOKE = (REPO / "docker" / "smoke.sh").read_text()
SHIPPED = ("serve", "train")
BUILD_ONLY_ARGS = {"EXTRA_CA_CERT", "TORCH_SPEC", "TORCH_PIP_ARGS", "PIP_EXTRA_ARGS"}


def stages() -> dict[str, dict]:
    """name -> {"parent": the stage or image it starts FROM, "lines": its instructions (continuations joined)}."""
    text = re.sub(r"\\\n", " ", DOCKERFILE)
    out, current = {}, None
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.I)
        if m:
            current = m.group(2)
            out[current] = {"parent": m.group(1), "lines": []}
        elif current is not None:
            out[current]["lines"].append(line)
    return out


def ancestry(name: str) -> list[str]:
    all_stages, chain = stages(), []
    while name in all_stages:
        chain.append(name)
        name = all_stages[name]["parent"]
    return chain


def test_the_shipped_images_do_not_descend_from_the_build_stage():
    all_stages = stages()
    assert set(SHIPPED) <= set(all_stages)
    build_stages = {name for name, s in all_stages.items()
                    if any(re.match(rf"ARG\s+{arg}\b", line) for line in s["lines"] for arg in BUILD_ONLY_ARGS)}
    assert build_stages == {"deps"}, build_stages
    for target in SHIPPED:
        assert not set(ancestry(target)) & build_stages, f"{target} descends from {ancestry(target)}"


def test_the_ca_and_pip_configuration_live_only_in_the_build_stage():
    for name, stage in stages().items():
        body = "\n".join(stage["lines"])
        for word in ("EXTRA_CA_CERT", "ca-certificates", "pip.conf", "PIP_EXTRA_ARGS", "TORCH_PIP_ARGS"):
            if name != "deps":
                assert word not in body, f"stage {name} mentions {word}"
    # Global build arguments (before the first FROM) are visible to every FROM line only: the base image.
    before = DOCKERFILE.split("\nFROM ", 1)[0]
    assert re.findall(r"^ARG\s+(\w+)", before, re.M) == ["BASE_IMAGE"]


def test_the_shipped_images_take_only_the_virtual_environment_from_the_build_stage():
    for name in stages():
        for line in stages()[name]["lines"]:
            if "--from=deps" in line:
                assert line.split() == ["COPY", "--from=deps", "/opt/venv", "/opt/venv"], line


def test_the_code_installs_offline_in_the_shipped_stages():
    for name in ancestry("serve") + ancestry("train"):
        for line in stages()[name]["lines"]:
            if line.startswith("RUN") and "pip install" in line:
                assert "--no-index" in line, f"stage {name} installs from an index: {line}"


def test_smoke_installs_torch_from_the_wheelhouse_alone_and_on_a_fixed_port():
    block = SMOKE[SMOKE.index('if [[ -n "${WHEELHOUSE:-}" ]]; then'):]
    block = block[:block.index("\nfi\n")]
    assert re.search(r'TORCH_PIP_ARGS="--no-index --find-links http://127\.0\.0\.1:\$WHEEL_PORT/"', block)
    # A random port would change a build argument, and with it the torch layer's cache key, every run.
    assert re.search(r"^WHEEL_PORT=\$\{WHEEL_PORT:-\d+\}$", SMOKE, re.M)
    assert "bind((" not in SMOKE and "random" not in SMOKE.lower()
    # and it checks that the server handed out torch (or that the layer came from the cache)
    assert "GET /torch-" in SMOKE and "Using cache|CACHED" in SMOKE


def test_smoke_checks_the_images_for_the_ca_and_runs_the_service_hardened():
    assert "docker history --no-trunc" in SMOKE
    assert "/usr/local/share/ca-certificates" in SMOKE and "/etc/pip.conf" in SMOKE
    for flag in ("--read-only", "--cap-drop ALL", "--security-opt no-new-privileges", "--user 10001:10001"):
        assert flag in SMOKE, flag


# --- the images docker/smoke.sh built, when there is an engine ------------------------------------

def docker(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def images():
    if shutil.which("docker") is None or docker("info").returncode != 0:
        pytest.skip("no Docker engine")
    tags = [f"diffusion-{t}:smoke" for t in SHIPPED]
    missing = [t for t in tags if docker("image", "inspect", t).returncode != 0]
    if missing:
        pytest.skip(f"{', '.join(missing)} not built (run docker/smoke.sh)")
    return tags


def ca_probes() -> list[str]:
    """One line of key material from each CA this machine trusts besides Debian's: what a build here
    would pass as EXTRA_CA_CERT."""
    probes = []
    for pem in sorted(Path("/usr/local/share/ca-certificates").glob("**/*.crt")):
        body = [line for line in pem.read_text(errors="replace").splitlines() if line and "-----" not in line]
        if len(body) > 2:
            probes.append(body[1])
    return probes


def test_built_images_carry_no_build_time_ca(images):
    probes = ca_probes()
    if not probes:
        pytest.skip("this machine trusts no extra CA")
    for image in images:
        history = docker("history", "--no-trunc", image).stdout
        assert not [p for p in probes if p in history], f"{image}: a CA is in the history"
        r = docker("run", "--rm", "--user", "0", "--entrypoint", "sh", image, "-c",
                   "ls -A /usr/local/share/ca-certificates; test -e /etc/pip.conf && echo pip.conf;"
                   "cat /etc/ssl/certs/ca-certificates.crt")
        assert r.returncode == 0, r.stderr
        leftovers = r.stdout.split("-----BEGIN", 1)[0].split()
        assert leftovers == [], f"{image}: {leftovers}"
        assert not [p for p in probes if p in r.stdout], f"{image}: a CA is in the trust store"


def test_built_images_run_as_the_user_the_manifests_name(images):
    uid = re.search(r"^ARG APP_UID=(\d+)", DOCKERFILE, re.M).group(1)
    for image in images:
        assert docker("image", "inspect", "-f", "{{.Config.User}}", image).stdout.strip() == "app"
        r = docker("run", "--rm", "--entrypoint", "id", image, "-u")
        assert r.stdout.strip() == uid, r.stdout + r.stderr
