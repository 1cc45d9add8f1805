#!/usr/bin/env bash
# Set up (or refresh) the project's virtual environment in .venv. Idempotent.
# torch==2.13.0 goes first: it is the local CPU wheel, and with it installed the project's
# torch range is already satisfied, so pip never pulls a CUDA build.
# A .venv set up from the same pyproject.toml and this script is left as it is (the editable
# install sees code changes by itself; refreshing it took 20 s at every `scripts/test.sh`), if
# it imports this checkout's code from elsewhere (/): a moved or copied checkout's .venv, whose
# editable install points at the first one, is redone.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
STAMP=.venv/.cones-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ -x .venv/bin/cones ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want" ] \
    && [ "$(cd / && "$OLDPWD/.venv/bin/python" -c "import cns_daemon, cones_cli, cones_store, pytest; print(cns_daemon.__file__)" 2>/dev/null)" = "$PWD/cns_daemon/__init__.py" ]; then
    exit 0
fi
[ -x .venv/bin/python ] || "$PY" -m venv .venv
rm -f "$STAMP"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# pip's output is shown only when a step fails (the editable build prints a page of warnings)
if ! { .venv/bin/python -m pip install -q --upgrade pip || true; } >"$log" 2>&1 \
    || ! .venv/bin/python -m pip install -q torch==2.13.0 >>"$log" 2>&1 \
    || ! .venv/bin/python -m pip install -q -e ".[dev]" >>"$log" 2>&1; then
    cat "$log" >&2
    echo "setup failed: see pip's output above" >&2
    exit 1
fi
echo "$want" > "$STAMP"
