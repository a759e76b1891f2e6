#!/usr/bin/env bash
# The README's first command: set up (or reuse) .venv, then run the end-to-end demo on CPU:
# synthetic COCO-format shapes -> Mask R-CNN R-18-FPN baseline and CBN (+ GN, SyncBN if time allows)
# -> COCO evaluation -> work_dirs/demo/{results.md,results.json,loss_curves.png}. About 10 minutes on
# 2 cores. Extra arguments go to tools/demo.py (e.g. --variants baseline cbn, --budget 400).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
START=$SECONDS
bash tools/setup_env.sh
.venv/bin/python tools/demo.py "$@"
echo "tools/demo.sh: total $((SECONDS - START)) s (environment check included)"
