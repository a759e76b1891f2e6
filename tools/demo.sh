#!/usr/bin/env bash
# The README's first command: set up (or reuse) .venv, then run the end-to-end demo on CPU:
# synthetic COCO-format shapes -> Mask R-CNN R-18-FPN with six FPN/head norms (baseline, BN, SyncBN,
# GN, CBN, CBN grad_through_window), each trained by tools/dist_train.sh on 2 gloo processes x 1 image,
# PreciseBN -> COCO evaluation with bootstrap intervals -> work_dirs/demo/{results.md,results.json,
# loss_curves.png}. About 10 minutes on 2 idle cores. Extra arguments go to tools/demo.py (e.g.
# --seeds 3 for mean ± std over seeds, --variants baseline cbn).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
bash tools/setup_env.sh
.venv/bin/python tools/demo.py "$@"
echo "tools/demo.sh: total $((SECONDS - START)) s (environment check included)"
