#!/usr/bin/env bash
# Create (or reuse) .venv in the repo root and install everything cbn_mmdet needs. Idempotent: a second
# run only checks a stamp. mmcv 2.1.0 has no wheel reachable here, so it is compiled from source with its
# C++ ops ONCE into a wheel cached outside the repo ($CBN_MMDET_CACHE, default ~/.cache/cbn_mmdet) and
# reused by every later .venv (a fresh .venv then installs in about a minute).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
CACHE="${CBN_MMDET_CACHE:-$HOME/.cache/cbn_mmdet}"
PYTHON="${PYTHON:-python3}"

TORCH_VERSION=2.13.0      # the CPU build on disk; a looser pin pulls a multi-GB CUDA build
MMCV_VERSION=2.1.0        # mmdet 3.3.0 needs mmcv>=2.0.0rc4,<2.2.0
MMENGINE_VERSION=0.10.7
MMDET_VERSION=3.3.0

log() { printf '[setup_env %s] %s\n' "$(date +%H:%M:%S)" "$*"; }

STAMP="$VENV/.cbn_mmdet_stamp"
WANT_STAMP="torch=$TORCH_VERSION mmcv=$MMCV_VERSION mmengine=$MMENGINE_VERSION mmdet=$MMDET_VERSION \
$(cat "$ROOT/pyproject.toml" "$ROOT/tools/setup_env.sh" | sha1sum | cut -c1-12)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$WANT_STAMP" ]] \
    && "$VENV/bin/python" -c 'import mmcv._ext, mmdet, cbn_mmdet' 2>/dev/null; then
  log "environment up to date ($VENV)"
  exit 0
fi

if [[ ! -x "$VENV/bin/python" ]]; then
  log "creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP_BIN=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
# pip warns about every empty local index directory configured on these machines: keep the log readable.
pip_quiet() { "${PIP_BIN[@]}" "$@" 2>&1 | { grep -v 'is ignored: it is neither a file nor a directory' || true; }; }
PIP=(pip_quiet)

log "installing torch $TORCH_VERSION (CPU), mmengine $MMENGINE_VERSION and build tools"
"${PIP[@]}" install "torch==$TORCH_VERSION" "setuptools<82" wheel ninja psutil \
  "mmengine==$MMENGINE_VERSION" opencv-python-headless numpy pycocotools pytest matplotlib scikit-learn ruff

PYTAG="$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"
WHEELS="$CACHE/wheels/mmcv-$MMCV_VERSION-$PYTAG-torch$TORCH_VERSION"
mkdir -p "$WHEELS"
MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl 2>/dev/null | head -n1 || true)"
if [[ -z "$MMCV_WHEEL" ]]; then
  BUILD_LOG="$CACHE/mmcv-build.log"
  log "building mmcv $MMCV_VERSION from source with its ops (one time, ~9-10 min on 2 cores); log: $BUILD_LOG"
  # --no-build-isolation: with isolation mmcv silently builds WITHOUT mmcv._ext (no RoIAlign/NMS).
  (cd "$CACHE" && MMCV_WITH_OPS=1 MAX_JOBS="${MAX_JOBS:-2}" "$VENV/bin/python" -m pip wheel \
     --no-build-isolation --no-deps -w "$WHEELS.tmp" "mmcv==$MMCV_VERSION" >"$BUILD_LOG" 2>&1) &
  BUILD_PID=$!
  START=$SECONDS
  while kill -0 "$BUILD_PID" 2>/dev/null; do
    sleep 30
    log "  mmcv build running: $((SECONDS - START)) s elapsed"
  done
  if ! wait "$BUILD_PID"; then
    log "mmcv build FAILED; last lines of $BUILD_LOG:"; tail -n 30 "$BUILD_LOG"; exit 1
  fi
  mv "$WHEELS.tmp"/mmcv-*.whl "$WHEELS"/ && rmdir "$WHEELS.tmp"
  MMCV_WHEEL="$(ls "$WHEELS"/mmcv-"$MMCV_VERSION"-*.whl | head -n1)"
  log "mmcv wheel cached: $MMCV_WHEEL ($((SECONDS - START)) s)"
else
  log "reusing cached mmcv wheel $MMCV_WHEEL"
fi
"${PIP[@]}" install --no-deps "$MMCV_WHEEL"
# mmcv's own pure-python requirements (installed --no-deps above).
"${PIP[@]}" install addict packaging pillow pyyaml yapf
if ! "$VENV/bin/python" -c 'import mmcv._ext' 2>/dev/null; then
  log "ERROR: mmcv._ext does not import: the cached wheel $MMCV_WHEEL was built without ops; delete it and rerun"
  exit 1
fi

log "installing mmdet $MMDET_VERSION and cbn_mmdet (editable)"
"${PIP[@]}" install "mmdet==$MMDET_VERSION"
"${PIP[@]}" install --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -c 'import mmcv._ext, mmdet, cbn_mmdet; print("mmdet", mmdet.__version__, "cbn_mmdet", cbn_mmdet.__version__)'
echo "$WANT_STAMP" > "$STAMP"
log "environment ready ($VENV)"
