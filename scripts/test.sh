#!/usr/bin/env bash
# Set up a virtual environment and run every check: lint, format, types, import contract, tests.
# Extra arguments go to pytest (e.g. `bash scripts/test.sh -k health`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh --dev
# One command per line: under `set -e` a failure inside an `a && b` list would not stop the script.
echo "== ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
echo "== mypy"
.venv/bin/mypy
.venv/bin/mypy bench
echo "== import contract"
.venv/bin/lint-imports
# The Node.js client's packages, for tests/integration/test_node_client.py (which fails in CI without them).
if command -v npm >/dev/null; then
  echo "== npm ci (clients/node)"
  npm ci --prefix clients/node --no-audit --no-fund --loglevel=error
fi
# Two runs: most tests in parallel worker processes (see pyproject.toml), then the load, soak and fault tests
# (marker "slow") one at a time, so that their timings are not another test's. Extra arguments go to both;
# a run that selects nothing (exit status 5) is not a failure.
pytest_run() {
  local status=0
  .venv/bin/python -m pytest "$@" || status=$?
  if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
    exit "$status"
  fi
}
echo "== pytest (in parallel)"
pytest_run -m "not slow" "$@"
echo "== pytest (load, soak and fault tests, one at a time)"
pytest_run -m slow -n 0 "$@"
