#!/usr/bin/env bash
# The GPU check, as one short script for a session that is lent a GPU through the device tool
# (15 minutes of device time in all). Prepare on the CPU machine, then run it there:
#
#   EXTRA="diffusers==0.42.1 regex importlib_metadata zipp" ../shared/device/wheels.sh   # fills .whl/
#   run: bash bench/gpu.sh          (timeout ~420 s; results come back under $OUT)
#
# It measures, side by side in one run on the same GPU, the service with 16 concurrent clients
# eager and under each --compile mode, the same requests one at a time, and the diffusers
# DDIMScheduler loop around the same weights.
# Nothing here trains or writes checkpoints.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/gpu.txt"
for size in ${SIZES:-small}; do
  timeout "${BENCH_TIMEOUT:-300}" python3 -m bench.load --synthetic "$size" --device cuda --clients 16 \
    --requests "${REQUESTS:-64}" --steps 10,20,30 --max-batch-rows 64 --compile "${MODES:-off,reduce-overhead}" \
    --json "$OUT/bench-$size.json" 2>&1 | tail -n 12 | tee "$OUT/bench-$size.txt"
done
