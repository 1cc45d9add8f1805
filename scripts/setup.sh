#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Idempotent.
# torch==2.13.0 goes first: it is the local CPU wheel, and with it installed the project's
# torch range is already satisfied, so pip never pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[dev]"
