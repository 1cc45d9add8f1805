#!/usr/bin/env bash
# The one command that runs the tests: sets up .venv if needed, then runs the default suite
# (slow suites are marked and excluded; run them with `scripts/test.sh -m slow`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
