#!/usr/bin/env bash
# One checkpoint per lecture stage, all at one CPU-sized shape and one iteration budget so the
# comparison is fair: 64 dims, 64 characters of context, 4 heads (1 for one_head), the preset's
# own depth (1 block for the early stages, 4 from residual on), 3000 steps of 32 sequences at
# learning rate 3e-3 (1e-3 leaves the one-block stages far from converged at this budget).
# Usage: GPT_EXPLORER_DATA=path/to/input.txt bash pretrained/train_stages.sh [OUT_DIR]
set -euo pipefail
out=${1:-pretrained}
common=(--n-embd 64 --block-size 64 --max-iters 3000 --batch-size 32 --lr 3e-3 --min-lr 3e-4
        --warmup-iters 100 --eval-interval 500 --eval-iters 50 --seed 1337 --threads 2 --no-state)
for stage in bigram one_head multi_head ffn residual layernorm full; do
  case $stage in
    one_head) shape=(--n-head 1) ;;
    residual|layernorm) shape=(--n-head 4 --n-layer 4) ;;
    full) shape=(--n-head 4 --n-layer 4 --dropout 0.1) ;;
    *) shape=(--n-head 4) ;;
  esac
  python3 -m core.train --preset "$stage" "${shape[@]}" "${common[@]}" --overwrite --out "$out/stage-$stage"
done
