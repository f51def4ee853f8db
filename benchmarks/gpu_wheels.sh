#!/usr/bin/env bash
# Run here, where the package registry is reachable, before carrying the repository to a lent GPU machine that can
# reach nothing: downloads into ./.whl (git-ignored) the wheels of the requirements that machine's image lacks, at the
# versions requirements.txt pins, for its Python (3.12 by default); .whl is emptied first.  benchmarks/gpu.sh installs
# them there (never a torch, torchvision, numpy or nvidia wheel: the machine's own CUDA stack stays).
#
#   bash benchmarks/gpu_wheels.sh                          # omegaconf, taming-transformers-rom1504, lpips
#   bash benchmarks/gpu_wheels.sh einops                   # other names from requirements.txt instead
#   PY_VERSION=3.11 bash benchmarks/gpu_wheels.sh          # for another Python
#
# The default list is what the lent machines' image lacked when last read (2026-11: it has torch, torchvision,
# pytorch-lightning, einops, numpy, pillow, safetensors, tqdm, scikit-image, torchmetrics).  The three are pure-Python
# wheels (about 0.2 MB); their own requirements are all in that image, so --no-deps is safe.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
PACKAGES=("$@")
[ ${#PACKAGES[@]} -eq 0 ] && PACKAGES=(omegaconf taming-transformers-rom1504 lpips)

SPECS=()
for name in "${PACKAGES[@]}"; do
  spec="$(grep -iE "^${name}==" requirements.txt || true)"
  if [ -z "$spec" ]; then
    echo "gpu_wheels.sh: '$name' is not pinned in requirements.txt (pinned: $(sed -n 's/==.*//p' requirements.txt |
      tr '\n' ' '))" >&2
    exit 2
  fi
  SPECS+=("$spec")
done

rm -rf .whl  # only what this run fetches: gpu.sh installs every wheel it finds there
mkdir -p .whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --dest .whl \
  --python-version "${PY_VERSION:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  "${SPECS[@]}"
echo "gpu_wheels.sh: .whl holds $(ls .whl | tr '\n' ' ')($(du -sh .whl | cut -f1)); carry '.whl' to the GPU machine"
