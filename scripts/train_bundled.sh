#!/usr/bin/env bash
# Reproduce the bundled model seekwen/assets/seekwen-kjv-v3 (recipe and figures: docs/bundled-model.md).
# Needs Debian's King James Bible: apt-get install -y bible-kjv. Extra arguments go to `seekwen train`
# (e.g. --quiet). Run it with the seekwen virtual environment active. About 35 minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${RUN:-runs/kjv-v3}
mkdir -p "$(dirname "$RUN")"
command -v bible >/dev/null || { echo "bible not found: apt-get install -y bible-kjv" >&2; exit 1; }
bible Gen1:1-Rev22:21 | python3 scripts/prep_kjv.py > runs/kjv.txt
python3 -m seekwen train runs/kjv.txt --preset kjv-v3 --out "$RUN" \
    --vocab-size 4096 --seq-len 256 --batch-size 16 --steps 1500 \
    --lr 3e-3 --min-lr-ratio 0.1 --warmup 50 --weight-decay 0.1 --grad-clip 1.0 \
    --bias-update-rate 1e-2 --seq-aux-alpha 1e-4 --val-every 50 \
    --eval-interval 250 --save-interval 250 --log-interval 50 \
    --seed 1234 --threads 2 \
    --export seekwen/assets/seekwen-kjv-v3 --export-dtype bfloat16 "$@"
