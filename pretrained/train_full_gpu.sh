#!/usr/bin/env bash
# The lecture's full model (6 layers, 6 heads, 384 dims, block 256, dropout 0.2) on one GPU,
# saved in half precision. nanoGPT's shakespeare_char recipe (lr 1e-3 cosine to 1e-4), shortened to
# 3000 steps because the model overfits after ~2000; --keep-best saves the step with the best val loss.
# Usage: GPT_EXPLORER_DATA=path/to/input.txt bash pretrained/train_full_gpu.sh OUT_NAME
set -euo pipefail
out=${1:-pretrained/full-gpu}
python3 -m core.train --preset full --device cuda --threads 8 --seed 1337 \
  --max-iters 3000 --batch-size 64 --lr 1e-3 --min-lr 1e-4 --warmup-iters 100 \
  --eval-interval 250 --eval-iters 200 --save-dtype float16 --no-state --keep-best --overwrite --out "$out"
