#!/usr/bin/env bash
# Add one DeepSeek-V3 multi-token-prediction layer to the bundled model seekwen/assets/seekwen-kjv-v3
# (recipe and figures: docs/bundled-model.md). The main model is frozen (--train-only mtp), so its
# logits, samples and validation perplexity stay exactly what they were; only the MTP layer learns,
# with the V3 report's objective (cross-entropy of the token after next). Needs runs/kjv.txt from
# scripts/train_bundled.sh's first step. Extra arguments go to `seekwen train` (e.g. --quiet).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/kjv-v3-mtp}
BASE=${BASE:-seekwen/assets/seekwen-kjv-v3}
test -f runs/kjv.txt || { echo "runs/kjv.txt missing: see scripts/train_bundled.sh" >&2; exit 1; }
python3 -m seekwen train runs/kjv.txt --init-from "$BASE" --mtp-layers 1 --train-only mtp --out "$RUN" \
    --seq-len 256 --batch-size 16 --steps 600 \
    --lr 3e-3 --min-lr-ratio 0.1 --warmup 30 --weight-decay 0.1 --grad-clip 1.0 \
    --bias-update-rate 1e-2 --seq-aux-alpha 1e-4 --val-every 50 \
    --eval-interval 100 --save-interval 100 --log-interval 50 \
    --seed 1234 --threads 2 \
    --export "${EXPORT:-$BASE}" --export-dtype bfloat16 "$@"
