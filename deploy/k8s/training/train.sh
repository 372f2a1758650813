#!/bin/sh
# The training jobs' command (job.yaml, ddp.yaml), in the diffusion-train image: train RUN_NAME into
# /shared/runs/RUN_NAME, resuming its saved state when a pod is retried; then, on the first node,
# publish the inference checkpoint into /shared/models, the directory the serving pods serve.
set -eu
out=/shared/runs/$RUN_NAME
resume=""
if [ -f "$out/$RUN_NAME.state.safetensors" ]; then resume=--resume; fi
if [ -n "${NNODES:-}" ]; then
  # Several nodes (ddp.yaml): this pod's index in the Indexed Job is its node rank; index 0 is the
  # rendezvous, reached through the headless Service as MASTER_ADDR.
  set -- --nnodes "$NNODES" --node_rank "$JOB_COMPLETION_INDEX" --master_addr "$MASTER_ADDR" --master_port 29500
else
  set -- --standalone
fi
# shellcheck disable=SC2086  # TRAIN_ARGS is a list of flags
torchrun "$@" --nproc_per_node "$GPUS" -m training $TRAIN_ARGS --name "$RUN_NAME" --out "$out" $resume
if [ "${JOB_COMPLETION_INDEX:-0}" = 0 ]; then
  cp "$out/$RUN_NAME.safetensors" "/shared/models/.$RUN_NAME.tmp"
  mv "/shared/models/.$RUN_NAME.tmp" "/shared/models/$RUN_NAME.safetensors"   # atomic: never a half file
  echo "published models/$RUN_NAME.safetensors; serve it: kubectl -n diffusion rollout restart deployment/diffusion-serve"
fi
