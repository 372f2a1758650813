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
#     wheels, served to the build over http://127.0.0.1 (hosts that cannot reach download.pytorch.org).
# Then: the serve and train images build, the service container becomes ready and healthy,
# POST /generate returns images (JSON and PNG), /metrics counts them, it runs as non-root.
#
# Behind a TLS-intercepting proxy: EXTRA_CA_CERT_FILE=/path/to/proxy-ca.pem (trusted by pip in the build).
# Knobs (environment): BASE_IMAGE, TORCH_SPEC, TORCH_PIP_ARGS, WHEELHOUSE, PIP_EXTRA_ARGS, EXTRA_CA_CERT_FILE,
# TAG (default smoke), SMOKE_PORT (default 18000), READY_TIMEOUT (default 300 s), KEEP=1 (leave it running).
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
if [[ -n "${WHEELHOUSE:-}" ]]; then
  WHEEL_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  python3 -m http.server "$WHEEL_PORT" --bind 127.0.0.1 --directory "$WHEELHOUSE" >"$WORK/wheels.log" 2>&1 &
  PIDS+=($!)
  TORCH_PIP_ARGS="--find-links http://127.0.0.1:$WHEEL_PORT/"
  say "serving $WHEELHOUSE on :$WHEEL_PORT for $TORCH_SPEC"
fi

# 3. Build both targets (the classic builder builds the stages in file order; BuildKit is optional).
build() {
  docker build --network host -f docker/Dockerfile --target "$1" -t "diffusion-$1:$TAG" \
    --build-arg BASE_IMAGE="$BASE_IMAGE" --build-arg TORCH_SPEC="$TORCH_SPEC" \
    --build-arg TORCH_PIP_ARGS="$TORCH_PIP_ARGS" --build-arg PIP_EXTRA_ARGS="$PIP_EXTRA_ARGS" --build-arg EXTRA_CA_CERT="$EXTRA_CA_CERT" . \
    >"$WORK/build-$1.log" 2>&1 || { tail -40 "$WORK/build-$1.log"; exit 1; }
}
say "building diffusion-serve:$TAG on $BASE_IMAGE"; build serve
say "building diffusion-train:$TAG"; build train
docker image ls "diffusion-*:$TAG" --format '  {{.Repository}}:{{.Tag}} {{.Size}}'
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
docker run -d --name "$NAME" -p "127.0.0.1:$SMOKE_PORT:8000" -e DIFFUSION_DEVICE=cpu "${MOUNT[@]}" \
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
