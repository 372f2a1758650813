#!/usr/bin/env bash
# The study on one GPU, as one script for a short device lease (issue 6): train the small
# class-conditional model with the linear and the cosine β-schedule on MNIST and Fashion-MNIST
# (four runs side by side, each for a wall-clock budget), retrain the Fashion-MNIST domain
# classifier, then run the study grid on each checkpoint (four studies side by side, each cut off
# at its budget; every finished cell is already in its results.csv). Results come back under $OUT.
#
#   DATA=data TRAIN_S=240 STUDY_S=240 N=1000 bash scripts/study_gpu.sh
#
# DATA holds mnist-10k/ and fashion-mnist/ (the IDX .gz files). Merge the four study folders and
# draw the report afterwards with `python -m training.study --merge ...` (docs/study.md).
set -uo pipefail
OUT=${OUT:-/tmp/study-out}
DATA=${DATA:-data}
RUNS=${RUNS:-runs/gpu}
TRAIN_S=${TRAIN_S:-240}      # training budget per model, seconds
STUDY_S=${STUDY_S:-240}      # study budget per checkpoint, seconds
N=${N:-1000}                 # samples per cell
MODEL=${MODEL:-small}
BATCH=${BATCH:-256}
STEPS=${STEPS:-10 20 50 100}
LONG=${LONG:-1000}
ANCHOR=${ANCHOR:-50}         # the guidance sweep's DDIM step count
PYTHON=${PYTHON:-python3}
CLF_EPOCHS=${CLF_EPOCHS:-10}
CLF_S=${CLF_S:-$TRAIN_S}     # the classifier's budget, seconds (without a file the repository's is used)
CLF_ARGS=${CLF_ARGS:-}         # e.g. "--limit 500" for a quick check on a CPU
STUDY_ARGS=${STUDY_ARGS:-}     # more training.study options, e.g. "--num-real 500" for a quick check on a CPU
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
mkdir -p "$OUT" "$RUNS"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 )) s] $*"; }
(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true) > "$RUNS/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available())" >> "$RUNS/gpu.txt"
cat "$RUNS/gpu.txt"

# CUDA MPS lets the four processes' small kernels run side by side instead of time-slicing the GPU.
# Guarded: if a CUDA program cannot start under it, it is stopped and everything runs without.
if [ "${MPS:-1}" = 1 ] && command -v nvidia-cuda-mps-control > /dev/null; then
  if nvidia-cuda-mps-control -d && timeout 60 "$PYTHON" -c "import torch; assert torch.ones(1, device='cuda').item() == 1"; then
    echo "CUDA MPS: on" | tee -a "$RUNS/gpu.txt"
  else
    timeout 10 bash -c 'echo quit | nvidia-cuda-mps-control'; echo "CUDA MPS: failed, off" | tee -a "$RUNS/gpu.txt"
  fi
else
  echo "CUDA MPS: off" | tee -a "$RUNS/gpu.txt"
fi

dir_of() { [ "$1" = mnist ] && echo "$DATA/mnist-10k" || echo "$DATA/fashion-mnist"; }

stamp "training: 4 models x ${TRAIN_S} s, and the fashion_mnist classifier"
for ds in mnist fashion_mnist; do
  for s in linear cosine; do
    timeout $((TRAIN_S + 120)) "$PYTHON" -m training --preset "$ds-small-$s-class" --model "$MODEL" \
      --data-dir "$(dir_of $ds)" --out "$RUNS/$ds-$s" --name "$ds-$MODEL-$s" --time-limit "$TRAIN_S" \
      --max-steps 1000000 --batch-size "$BATCH" --lr 6e-4 --warmup-steps 200 --sample-every 0 \
      --save-every 1000 --log-every 100 > "$RUNS/train-$ds-$s.log" 2>&1 &
  done
done
timeout "$CLF_S" "$PYTHON" -m training.classifier --dataset fashion_mnist --data-dir "$DATA/fashion-mnist" \
  --out "$RUNS/fashion_mnist-classifier.safetensors" --epochs "$CLF_EPOCHS" $CLF_ARGS > "$RUNS/classifier.log" 2>&1 &
wait
stamp "training done"
for f in "$RUNS"/*/loss.csv; do echo "$f: $(tail -n 1 "$f")"; done
tail -n 3 "$RUNS/classifier.log" | tr '\r' '\n' | tail -n 3

for ds in mnist fashion_mnist; do for s in linear cosine; do
  cp "$RUNS/$ds-$s/$ds-$MODEL-$s.safetensors" "$OUT"/ 2>/dev/null
done; done

clf_for() {
  if [ "$1" = fashion_mnist ] && [ -f "$RUNS/fashion_mnist-classifier.safetensors" ]; then
    echo "--classifier $RUNS/fashion_mnist-classifier.safetensors"
  fi
}
study() {  # dataset schedule: the cheap cells first, so a cut-off study keeps the most useful ones
  local ds=$1 s=$2 ck="$RUNS/$1-$2/$1-$MODEL-$2.safetensors" out="$RUNS/study-$1-$2"
  [ -f "$ck" ] || { echo "no checkpoint $ck"; return 1; }
  local common="--checkpoints $ck --data-dir $(dir_of $ds) --out $out --num-samples $N --clip static
    --steps $STEPS --guidance 0 0.5 1 2 4 --anchor-steps $ANCHOR --anchor-guidance 2 --batch-size 1000 $(clf_for $ds) $STUDY_ARGS"
  "$PYTHON" -m training.study $common --long-steps --repeat-seeds &&
  "$PYTHON" -m training.study $common --long-steps --repeat-seeds 1 2 &&
  "$PYTHON" -m training.study $common --long-steps $LONG --repeat-seeds 1 2
}
export RUNS MODEL N STEPS LONG ANCHOR DATA PYTHON STUDY_ARGS
stamp "studies: 4 checkpoints x ${STUDY_S} s, $N samples per cell"
for ds in mnist fashion_mnist; do
  for s in linear cosine; do
    ( export -f study clf_for dir_of; timeout "$STUDY_S" bash -c "study $ds $s" > "$RUNS/study-$ds-$s.log" 2>&1 ) &
  done
done
wait
stamp "studies done"
for f in "$RUNS"/study-*/results.csv; do echo "$f: $(( $(wc -l < "$f") - 1 )) cells"; done

(cd "$RUNS" && tar czf "$OUT/study.tgz" --exclude='*.state.safetensors' --exclude="*-$MODEL-*.safetensors" --exclude=tb .)
ls -la "$OUT"
stamp "end"
