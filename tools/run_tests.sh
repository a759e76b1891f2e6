#!/usr/bin/env bash
# The README's test command: set up .venv (idempotent; builds/caches mmcv on first use), lint the code
# (ruff, configured in pyproject.toml: a violation fails the run), then run the whole test suite.
# Extra arguments go to pytest (e.g. `bash tools/run_tests.sh -k cbn -x`).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/tools/setup_env.sh"
cd "$ROOT"
"$ROOT/.venv/bin/python" -m ruff check .
exec "$ROOT/.venv/bin/python" -m pytest tests -q "$@"
