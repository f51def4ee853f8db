#!/usr/bin/env bash
# One command for a lent GPU machine (CUDA, bf16): refinement images/s at 256 and 1024 px, training steps/s at the real
# config, the UNet's achieved FLOP/s against the card's bf16 peak, and the CUDA peak memory of a Stable-Diffusion-v1-
# sized expert refining 512 and 1024 px with a guided prompt, fp32 and bf16.  Everything comes from this repository:
# random weights at the real sizes (configs/latesteps_500_750.yaml, configs/stable-diffusion/v1-inference.yaml), random
# images where scikit-image is missing; no downloads.
#
#   bash benchmarks/gpu.sh                 # all parts (about 13 minutes on an H100)
#   bash benchmarks/gpu.sh refine          # or: train | flops | memory   (one part, each well under 10 minutes)
#   bash benchmarks/gpu.sh --dry-run       # here, on CPU: the same commands at tiny sizes, to check the plumbing
#
# memory: the SD v1 text encoder is CLIP ViT-L/14's text model (random weights, config-only folder) where the Python
# imports transformers, else benchmarks/bench_memory.py's parameter-free stand-in of the same output shape [n, 77, 768]
# (printed; the UNet and VAE figures are the same, host memory lacks CLIP's 0.46 GiB).
#
# Python: $PYTHON if set, else ./.venv/bin/python or python3 - the first that imports torch with CUDA (any torch in
# --dry-run).  The project's other requirements (omegaconf, taming-transformers-rom1504, lpips, pytorch-lightning,
# einops, ...) must import too.  Where some do not and a wheelhouse ./.whl exists (git-ignored; made here with
# `bash benchmarks/gpu_wheels.sh`, then carried along), its wheels are installed with --no-index --no-deps into
# ${TMPDIR:-/tmp}/latesteps-gpu-site and put first on PYTHONPATH; the machine's torch and torchvision are never replaced.
# Results: benchmarks/results/*.json (one per benchmark) and benchmarks/results/gpu-<time>.log (everything printed);
# $LATESTEPS_BENCH_RESULTS, if set, names another folder for both.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"

DRY=0
PARTS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    refine|train|flops|memory) PARTS+=("$arg") ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument '$arg' (use refine, train, flops, memory and/or --dry-run)" >&2; exit 2 ;;
  esac
done
[ ${#PARTS[@]} -eq 0 ] && PARTS=(refine train flops memory)

if [ "$DRY" = 1 ]; then
  TORCH_CHECK="import torch"
else
  TORCH_CHECK="import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"
fi
PROJECT_CHECK="import torch, pytorch_lightning, omegaconf, einops, taming, ldm.refine, ldm.models.diffusion.latesteps"

pick_python() {
  local candidate
  for candidate in "${PYTHON:-}" "$REPO/.venv/bin/python" "$(command -v python3 || true)"; do
    [ -n "$candidate" ] && [ -x "$candidate" ] || continue
    if "$candidate" -c "$TORCH_CHECK" 2>/dev/null; then echo "$candidate"; return 0; fi
  done
  return 1
}

if ! PY="$(pick_python)"; then
  echo "gpu.sh: no Python with a CUDA torch found (tried \$PYTHON, .venv/bin/python, python3); set PYTHON=/path/to/python" >&2
  exit 1
fi
if ! "$PY" -c "$PROJECT_CHECK" 2>/dev/null; then
  # never the machine's own torch stack: a carried torch/numpy would shadow its CUDA build on PYTHONPATH
  WHEELS=()
  for wheel in "$REPO"/.whl/*.whl; do
    case "$(basename "$wheel" | tr '[:upper:]' '[:lower:]')" in
      torch-*|torchvision-*|torchaudio-*|triton-*|numpy-*|nvidia_*|nvidia-*) echo "gpu.sh: skipping $wheel" ;;
      *) [ -f "$wheel" ] && WHEELS+=("$wheel") ;;
    esac
  done
  if [ ${#WHEELS[@]} -gt 0 ]; then
    SITE="${TMPDIR:-/tmp}/latesteps-gpu-site"
    rm -rf "$SITE"
    echo "gpu.sh: installing ${WHEELS[*]##*/} into $SITE (torch from $PY)"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${WHEELS[@]}"
    export PYTHONPATH="$SITE:$PYTHONPATH"
  fi
  if ! "$PY" -c "$PROJECT_CHECK"; then
    echo "gpu.sh: $PY has torch but not all of the project's requirements (see the traceback above); carry the" \
         "missing ones as wheels: 'bash benchmarks/gpu_wheels.sh [package ...]' here, then carry .whl" >&2
    exit 1
  fi
fi

RESULTS="${LATESTEPS_BENCH_RESULTS:-benchmarks/results}"
mkdir -p "$RESULTS"
LOG="$RESULTS/gpu-$(date +%Y%m%d-%H%M%S)$([ "$DRY" = 1 ] && echo -dry).log"
exec > >(tee -a "$LOG") 2>&1
echo "gpu.sh: python $PY; parts: ${PARTS[*]}; dry run: $DRY; log: $LOG"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
          torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true

if [ "$DRY" = 1 ]; then
  # Same scripts and arguments, at sizes a CPU finishes in a few minutes.
  DEVICE=cpu; THREADS=2
  REFINE_ARGS=(--models tiny --sizes 64 128 --batch 1 2 --tail-steps 2 --repeats 1)
  TRAIN_ARGS=(--configs tiny --steps 2 --warmup 1 --batch-size 2)
  FLOPS_ARGS=(--model tiny --image-size 64 --batch 1 2 --iters 1 --warmup 1)
  MEMORY_ARGS=(--unet sd-v1-tiny --sizes 64 --tilings off --precision fp32 bf16)
else
  DEVICE=cuda; THREADS=8
  REFINE_ARGS=(--models real --sizes 256 1024 --batch 1 4 --tail-steps 25 --repeats 3)
  TRAIN_ARGS=(--configs real --steps 20 --warmup 3)
  FLOPS_ARGS=(--model real --image-size 256 --batch 1 8 48 --iters 10 --warmup 3)
  MEMORY_ARGS=(--unet sd-v1 --sizes 512 1024 --tilings off auto --precision fp32 bf16)
fi

for part in "${PARTS[@]}"; do
  case "$part" in
    refine)
      # 25 DDIM steps from t=499 (half of a 50-step grid), two experts; batched kernels (not batch-invariant);
      # fp32 for reference, bf16 autocast, channels_last.
      "$PY" benchmarks/bench_refine.py --device "$DEVICE" --threads "$THREADS" "${REFINE_ARGS[@]}" \
        --precisions bf16 fp32 --layouts nchw channels_last --batch-invariant off ;;
    train)
      # The real config's batch size (48 at 256 px) on CUDA; random images so data loading does not limit.
      "$PY" benchmarks/bench_train.py --device "$DEVICE" --threads "$THREADS" "${TRAIN_ARGS[@]}" \
        --precisions bf16-mixed 32-true --data random ;;
    flops)
      "$PY" benchmarks/bench_flops.py --device "$DEVICE" --threads "$THREADS" "${FLOPS_ARGS[@]}" --precisions bf16 ;;
    memory)
      # SD v1 (860M UNet, KL-f8, CLIP-L text): 2 steps from t=200 with Prompt(..., guidance_scale=7.5), one batched
      # call per step (batch 2: the refiner's default on CUDA); CUDA peak allocated/reserved and s/step per case.
      if "$PY" -c "import transformers" 2>/dev/null; then TEXT=clip; else
        TEXT=stub; echo "gpu.sh: transformers is not importable: SD v1's text encoder is the stand-in (see bench_memory.py)"
      fi
      "$PY" benchmarks/bench_memory.py --device "$DEVICE" --threads "$THREADS" "${MEMORY_ARGS[@]}" \
        --guidance 7.5 --text-encoder "$TEXT" ;;
  esac
done
echo "gpu.sh: done; JSON results in $RESULTS/, log in $LOG"
