#!/usr/bin/env bash
# The GPU figures the docs quote, in one command on a CUDA machine (run from the repo root):
#   bash bench/gpu_checks.sh            # results under ${OUT:-gpu_results}/
# On the offline GPU host, carry the wheels first (../shared/gpu/README.md): this script
# installs .whl/*.whl into /tmp/site when the folder exists.
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"
# 1. CAST-S vs ViT-S images/s, superpixels included (issue #14)
timeout 130 python3 bench/cast_throughput.py --device cuda --n-images 1024 --n-preprocess 64 \
  --n-forward 2048 --batch-size 256 --workers 14 --json "$OUT/cast_throughput.json" 2>&1 | tail -20
# 2. Step 3 at 24,576 latents x 50,000 images on the GPU (docs/metrics.md)
timeout 200 python3 bench/interp_scale.py --device cuda --moran-images 2048 2>&1 | tee "$OUT/interp_scale.txt" | tail -30
# 3. GPU-marked tests
timeout 90 python3 -m pytest -rs -m gpu -q -p no:cacheprovider 2>&1 | tail -5 | tee "$OUT/pytest_gpu.txt"
