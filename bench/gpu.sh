#!/usr/bin/env bash
# The GPU benchmark (bench/gpu.py) as one command for a session that is lent a GPU through the device
# tool (15 minutes of device time in all; this script is sized for about 7.5). Prepare on the CPU machine:
#
#   EXTRA="diffusers==0.42.1 regex importlib_metadata zipp httpx httpcore h11 anyio sniffio python-multipart
#     annotated-doc opentelemetry-api requests certifi charset-normalizer urllib3 idna transformers==5.24.0
#     tokenizers==0.23.3 safetensors==0.8.0 huggingface_hub==2.4.0 httpx2 httpcore2 truststore hf-xet filelock
#     fsspec click pyyaml tqdm packaging" ../shared/device/wheels.sh
#   run: bash bench/gpu.sh          (timeout_s ~570; results come back under $OUT)
#
# (fastapi 0.165 imports annotated-doc and opentelemetry-api, diffusers checks for requests when imported;
# transformers and tokenizers are the sd phase's CLIP text encoder and tokenizer, and transformers checks the
# versions of tokenizers, huggingface_hub, safetensors, regex, tqdm, pyyaml, packaging and filelock when
# imported, so they come too, with huggingface_hub 2's own dependencies. That set, on Python 3.12 with
# numpy, imports everything but torch's part: checked on the CPU machine.)
#
# It measures, side by side in one run on the same GPU: this project's runner (eager; compiled with
# every iteration a CUDA graph), the service over HTTP (one request, saturation, mixed traffic), the
# same weights in diffusers' DDIMScheduler loop (eager) and as the best a diffusers user can do
# (compiled, the whole loop one CUDA graph), diffusers' UNet2DModel of the same size both ways, the
# CIFAR-10 DDPM architecture served by this service against diffusers' DDIMPipeline behind FastAPI
# (eager and compiled), SD 1.5's architecture (random weights, 512 px) against StableDiffusionPipeline
# behind FastAPI (eager and with a compiled UNet), and training images/s against a plain diffusers
# training step. Commit $OUT/results.{json,md} to bench/results/ and put the figures in the README.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
export PYTHONUNBUFFERED=1
export TORCHINDUCTOR_CACHE_DIR=${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor-cache}  # the service reuses the bench's compilations
PYTHON=${PYTHON:-python3}
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
fi
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
# MINI=1 DEVICE=cpu: the miniature the CI runs (tests/bench), so this script cannot rot unnoticed
timeout "${BENCH_TIMEOUT:-510}" "$PYTHON" -m bench.gpu --device "${DEVICE:-cuda}" --sizes "${SIZES:-small,large}" \
  --phases "${PHASES:-engine,reference,service,cifar,sd,goodput,train}" --budget-s "${BUDGET_S:-390}" --out "$OUT" \
  ${MINI:+--mini} 2>&1 | tee "$OUT/bench.log" | grep -v '^{'
status=${PIPESTATUS[0]}
cat "$OUT"/service-*.log 2>/dev/null | tail -n 40 > "$OUT/service-tail.log"
rm -f "$OUT"/service-small.log "$OUT"/service-large.log
exit "$status"
