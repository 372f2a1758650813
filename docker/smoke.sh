#!/usr/bin/env bash
# Build the images on a local base image and check that the service container answers.
#
#   sudo docker/smoke.sh                 # from anywhere; needs a running Docker engine
#
# No registry needed: the base image is Debian bookworm + Debian's python3, made with debootstrap
# and `docker import` when it is not there yet (root, a Debian mirror). Builds run with
# --network host, so pip reaches PyPI. torch and torchvision (always from the same build):
#   - default: TORCH_SPEC='torch torchvision' from https://download.pytorch.org/whl/cpu (no CUDA wheels)
#   - WHEELHOUSE=/dir/with/wheels TORCH_SPEC='torch==X torchvision==Y': from a local directory of
#     wheels ALONE (pip --no-index: it must hold torch, torchvision and everything they depend on, e.g.
#     made by `pip download torch==X torchvision==Y -d DIR`), served to the build over
#     http://127.0.0.1:$WHEEL_PORT (hosts that cannot reach download.pytorch.org). The port is fixed
#     (default 18089): it is part of a build argument, and a fixed one keeps the layer cache valid.
#     The smoke fails unless torch came from that server (or from a cached layer built that way).
# Then: the serve and train images build, the service container becomes ready and healthy while
# running as Kubernetes runs it (deploy/k8s: uid 10001, read-only root filesystem, no
# capabilities, no privilege escalation, a writable /tmp only), POST /generate returns images
# (JSON and PNG), /metrics counts them.
#
# Behind a TLS-intercepting proxy: EXTRA_CA_CERT_FILE=/path/to/proxy-ca.pem (trusted by pip in the
# build only). The smoke then checks that neither image carries it: not in `docker history`, not in
# /usr/local/share/ca-certificates, /etc/ssl/certs or /etc/pip.conf.
# Knobs (environment): BASE_IMAGE, TORCH_SPEC, TORCH_PIP_ARGS, WHEELHOUSE, WHEEL_PORT, PIP_EXTRA_ARGS,
# EXTRA_CA_CERT_FILE, TAG (default smoke), SMOKE_PORT (default 18000), READY_TIMEOUT (default 300 s),
# KEEP=1 (leave it running).
set -euo pipefail
cd "$(dirname "$0")/.."

BASE_IMAGE=${BASE_IMAGE:-local/debian-python:bookworm}
TAG=${TAG:-smoke}
SMOKE_PORT=${SMOKE_PORT:-18000}
READY_TIMEOUT=${READY_TIMEOUT:-300}
TORCH_SPEC=${TORCH_SPEC:-torch torchvision}
TORCH_PIP_ARGS=${TORCH_PIP_ARGS:---index-url https://download.pytorch.org/whl/cpu --extra-index-url https://pypi.org/simple}
PIP_EXTRA_ARGS=${PIP_EXTRA_ARGS:-}
EXTRA_CA_CERT=""
if [[ -n "${EXTRA_CA_CERT_FILE:-}" ]]; then EXTRA_CA_CERT=$(cat "$EXTRA_CA_CERT_FILE"); fi
NAME=diffusion-smoke-$$
WORK=$(mktemp -d)
T0=$(date +%s)
PIDS=()

say() { printf '[smoke %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }
cleanup() {
  if [[ "${KEEP:-0}" != 1 ]]; then docker rm -f "$NAME" >/dev/null 2>&1 || true; fi
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# 1. The local base image.
if ! docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
  [[ "$BASE_IMAGE" == local/debian-python:bookworm ]] || { echo "base image $BASE_IMAGE not found" >&2; exit 1; }
  command -v debootstrap >/dev/null || { echo "need debootstrap (apt-get install debootstrap) to make $BASE_IMAGE" >&2; exit 1; }
  say "making $BASE_IMAGE with debootstrap"
  debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates,passwd \
    bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log"
  rm -rf "$WORK"/rootfs/var/lib/apt/lists/* "$WORK"/rootfs/var/cache/apt/archives/*.deb
  tar -C "$WORK/rootfs" -c . | docker import -c 'ENV LANG=C.UTF-8' - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

# 2. Optional local wheelhouse for torch, served to the build (which runs on the host network).
WHEEL_PORT=${WHEEL_PORT:-18089}
if [[ -n "${WHEELHOUSE:-}" ]]; then
  ls "$WHEELHOUSE"/torch-*.whl >/dev/null 2>&1 || { echo "no torch-*.whl in WHEELHOUSE=$WHEELHOUSE" >&2; exit 1; }
  python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELHOUSE" >"$WORK/wheels.log" 2>&1 &
  PIDS+=($!)
  sleep 1
  kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$WORK/wheels.log"; echo "cannot serve the wheelhouse on 127.0.0.1:$WHEEL_PORT (set WHEEL_PORT)" >&2; exit 1; }
  # --no-index: the wheelhouse is the only source; a wheel missing there fails the build.
  TORCH_PIP_ARGS="--no-index --find-links http://127.0.0.1:$WHEEL_PORT/"
  say "serving $WHEELHOUSE on :$WHEEL_PORT for $TORCH_SPEC (pip --no-index)"
fi

# 3. Build both targets (the classic builder builds the stages in file order; BuildKit is optional).
build() {
  local t0; t0=$(date +%s)
  docker build --network host -f docker/Dockerfile --target "$1" -t "diffusion-$1:$TAG" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg TORCH_PIP_ARGS="$TORCH_PIP_ARGS" --build-arg PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS" --build-arg EXTRA_CA_CERT="$EXTRA_CA_CERT" . \
    >"$WORK/build-$1.log" 2>&1 || { tail -40 "$WORK/build-$1.log"; exit 1; }
  say "  built in $(($(date +%s) - t0)) s; steps from the layer cache: $(grep -cE 'Using cache|CACHED' "$WORK/build-$1.log" || true)"
}
say "building diffusion-serve:$TAG on $BASE_IMAGE"; build serve
say "building diffusion-train:$TAG"; build train
docker image ls "diffusion-*:$TAG" --format '  {{.Repository}}:{{.Tag}} {{.Size}}'
say "torch in the images: $(docker run --rm --entrypoint cat "diffusion-serve:$TAG" /opt/venv/torch-pin.txt | tr '\n' ' ')"

# The wheelhouse was the source of torch: its server handed out the wheels, or the torch layer came
# from the cache (built by an earlier run, from the same --no-index source).
if [[ -n "${WHEELHOUSE:-}" ]]; then
  if grep -qE '"GET /torch-[^ ]+\.whl' "$WORK/wheels.log"; then
    say "wheelhouse served: $(grep -oE 'GET /[^ ]+\.whl' "$WORK/wheels.log" | sed 's|GET /||' | sort -u | wc -l) wheels, torch among them"
  elif grep -A1 'RUN if \[ -n "\$TORCH_SPEC" \]' "$WORK/build-serve.log" | grep -qE 'Using cache|CACHED'; then
    say "torch layer from the layer cache (an earlier build made it from the wheelhouse, --no-index)"
  else
    echo "torch was neither fetched from the wheelhouse nor cached" >&2; exit 1
  fi
fi

# A build-time CA must not ship: not in the history (build arguments), not in the file system.
if [[ -n "$EXTRA_CA_CERT" ]]; then
  probe=$(printf '%s\n' "$EXTRA_CA_CERT" | grep -v -- '-----' | sed -n 2p)   # one line of the key material
  for image in "diffusion-serve:$TAG" "diffusion-train:$TAG"; do
    if docker history --no-trunc "$image" | grep -qF -- "$probe"; then
      echo "$image: the build-time CA is in its docker history" >&2; exit 1
    fi
    docker run --rm --user 0 --entrypoint sh "$image" -c "
      test ! -e /usr/local/share/ca-certificates/extra-ca.crt && test ! -e /etc/pip.conf \
      && ! grep -rqF -- '$probe' /etc/ssl/certs /usr/local/share/ca-certificates" \
      || { echo "$image: the build-time CA is in its file system" >&2; exit 1; }
  done
  say "build-time CA: in neither image's history nor file system"
fi
docker run --rm "diffusion-train:$TAG" --help >"$WORK/train-help.txt" 2>&1 \
  || { cat "$WORK/train-help.txt"; echo "train image: python -m training --help failed" >&2; exit 1; }
say "train image runs: $(head -1 "$WORK/train-help.txt")"

# 4. The image's default checkpoint, or a tiny one made by the image itself when checkpoints/ has none.
MOUNT=()
if ! ls checkpoints/*.safetensors >/dev/null 2>&1; then
  mkdir -m 777 "$WORK/ckpt"
  docker run --rm -v "$WORK/ckpt:/out" "diffusion-serve:$TAG" python -c '
from diffusion.checkpoint import save
from diffusion.models.model import DiffusionModel, model_config
names = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
cfg = model_config("tiny", (1, 16, 16), num_classes=10, class_names=names, num_timesteps=100)
save(DiffusionModel(cfg).eval(), "/out/tiny-digits.safetensors", provenance={"purpose": "docker/smoke.sh"})'
  MOUNT=(-v "$WORK/ckpt:/app/checkpoints:ro")
  say "checkpoints/ holds no model: serving a tiny untrained one made in the image"
fi

# 5. Run the service container as compose does on a CPU machine, and call it.
# Hardened as deploy/k8s/base/deployment.yaml runs it: its uid, nothing writable but /tmp.
docker run -d --name "$NAME" -p "127.0.0.1:$SMOKE_PORT:8000" -e DIFFUSION_DEVICE=cpu "${MOUNT[@]}" \
  --user 10001:10001 --read-only --tmpfs /tmp -e HOME=/tmp --cap-drop ALL --security-opt no-new-privileges \
  "diffusion-serve:$TAG" >/dev/null
URL=http://127.0.0.1:$SMOKE_PORT
say "container $NAME started; waiting for /readyz"
deadline=$(($(date +%s) + READY_TIMEOUT))
until curl -fsS "$URL/readyz" >/dev/null 2>&1; do
  if (($(date +%s) > deadline)) || [[ "$(docker inspect -f '{{.State.Running}}' "$NAME")" != true ]]; then
    docker logs --tail 60 "$NAME"; echo "service not ready" >&2; exit 1
  fi
  sleep 1
done
say "ready"
[[ "$(docker exec "$NAME" id -u)" != 0 ]] || { echo "service runs as root" >&2; exit 1; }

MODEL=$(curl -fsS "$URL/models" | python3 -c 'import json, sys; d = json.load(sys.stdin); m = d["models"] if isinstance(d, dict) else d; print(m[0]["name"])')
BODY="{\"model\": \"$MODEL\", \"class_label\": 3, \"scheduler\": \"ddim\", \"steps\": 4, \"seed\": 7}"
curl -fsS -X POST "$URL/generate" -H 'content-type: application/json' -d "$BODY" -o "$WORK/out.json"
python3 - "$WORK/out.json" <<'EOF'
import base64, json, sys
r = json.load(open(sys.argv[1]))
png = base64.b64decode(r["images"][0])
assert png[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
print(f"  /generate: {len(r['images'])} image(s), seeds {r['seeds']}, model {r['model']}, scheduler {r['scheduler']}, {len(png)} PNG bytes")
EOF
curl -fsS -X POST "$URL/generate" -H 'content-type: application/json' -H 'accept: image/png' -d "$BODY" -o "$WORK/out.png"
[[ "$(head -c 4 "$WORK/out.png" | tail -c 3)" == PNG ]] || { echo "Accept: image/png did not return a PNG" >&2; exit 1; }
curl -fsS "$URL/metrics" | grep -E '^diffusion_(requests_total|images_generated_total)\{' | sed 's/^/  /'

# 6. The image's HEALTHCHECK (first probe after its 15 s interval).
for _ in $(seq 60); do
  health=$(docker inspect -f '{{.State.Health.Status}}' "$NAME")
  [[ "$health" == starting ]] || break
  sleep 1
done
[[ "$health" == healthy ]] || { echo "HEALTHCHECK says $health" >&2; exit 1; }
say "HEALTHCHECK: $health"
say "PASS"
